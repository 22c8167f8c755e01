// CPU kernels of the BN-statistic loss: one read of x for the per-channel
// statistics (shifted sums, double accumulation), one elementwise pass backward.
// The folded form reads a folded conv's output y = s x + t and maps the
// statistics back to x; its backward is the same elementwise pass over y.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../bn_stats_math.h"
#include "../op_prep.h"

namespace nrrdd {
namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Statistics of x_in (or of y = s x + t when `affine` maps back to x), the loss
// and the coefficients w.r.t. x_in. mean/var returned are x_in's own.
Result bn_stats_impl(const at::Tensor& x_in, const ChannelView& v, const at::Tensor& running_mean,
                     const at::Tensor& running_var, Affine<double> affine) {
  const auto acc = acc_type(x_in);
  const int64_t C = v.C, outer = v.outer, inner = v.inner;
  std::vector<double> s1(C, 0.0), s2(C, 0.0), shift(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "bn_stats_cpu", [&] {
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    if (outer * inner == 0) return;
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(xp[c * inner]);
    if (inner > 1) {
      // (N, C, S): each channel is N contiguous planes; channels in parallel.
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double a = 0, b = 0;
          const double sh = shift[c];
          for (int64_t o = 0; o < outer; ++o) {
            const scalar_t* p = xp + (o * C + c) * inner;
            for (int64_t i = 0; i < inner; ++i) {
              const double d = static_cast<double>(p[i]) - sh;
              a += d;
              b += d * d;
            }
          }
          s1[c] = a;
          s2[c] = b;
        }
      });
    } else {
      // (rows, C): channels-last; rows split over threads, per-thread sums merged.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), outer));
      std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t r0 = outer * k / chunks, r1 = outer * (k + 1) / chunks;
          double* a = p1.data() + k * C;
          double* b = p2.data() + k * C;
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* p = xp + r * C;
            for (int64_t c = 0; c < C; ++c) {
              const double d = static_cast<double>(p[c]) - shift[c];
              a[c] += d;
              b[c] += d * d;
            }
          }
        }
      });
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += p1[k * C + c];
          s2[c] += p2[k * C + c];
        }
    }
  });
  const double n = static_cast<double>(outer * inner);
  at::Tensor rm = running_mean.to(at::kDouble).contiguous();
  at::Tensor rv = running_var.to(at::kDouble).contiguous();
  const double* rmp = rm.data_ptr<double>();
  const double* rvp = rv.data_ptr<double>();
  at::Tensor mean = at::empty({C}, x_in.options().dtype(at::kDouble));
  at::Tensor var = at::empty({C}, x_in.options().dtype(at::kDouble));
  at::Tensor coef = at::empty({2, C}, x_in.options().dtype(at::kDouble));
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  double* cp = coef.data_ptr<double>();
  double nm = 0, nv = 0;
  std::vector<double> dmean(C), dvar(C);  // statistics of the BN input minus the running ones
  for (int64_t c = 0; c < C; ++c) {
    channel_stats<double>(shift[c], s1[c], s2[c], n, mp + c, vp + c);
    dmean[c] = affine.mean_of_input(c, mp[c]) - rmp[c];
    dvar[c] = affine.var_of_input(c, vp[c]) - rvp[c];
    nm += dmean[c] * dmean[c];
    nv += dvar[c] * dvar[c];
  }
  nm = std::sqrt(nm);
  nv = std::sqrt(nv);
  const double im = safe_inverse(nm) / n, iv = safe_inverse(nv) / n;
  for (int64_t c = 0; c < C; ++c) {
    cp[c] = affine.mean_coef(c, dmean[c] * im);
    cp[C + c] = affine.var_coef(c, 2.0 * dvar[c] * iv);
  }
  at::Tensor loss = at::scalar_tensor(nm + nv, x_in.options().dtype(at::kDouble));
  return {loss.to(acc), mean.to(acc), var.to(acc), coef.to(acc)};
}

Result bn_stat_loss_cpu(const at::Tensor& x, const at::Tensor& running_mean,
                        const at::Tensor& running_var) {
  ChannelView v = channel_view(x);
  check_running(running_mean, v.C, x, "running_mean");
  check_running(running_var, v.C, x, "running_var");
  return bn_stats_impl(x, v, running_mean, running_var, {nullptr, nullptr});
}

Result folded_bn_stat_loss_cpu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& running_mean, const at::Tensor& running_var) {
  ChannelView v = channel_view(y);
  check_running(running_mean, v.C, y, "running_mean");
  check_running(running_var, v.C, y, "running_var");
  const auto [s, t] = prepare_affine(scale, shift, v.C, y, at::kDouble);
  return bn_stats_impl(y, v, running_mean, running_var, {s.data_ptr<double>(), t.data_ptr<double>()});
}

at::Tensor bn_stat_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                     const at::Tensor& mean, const at::Tensor& coef) {
  ChannelView v = channel_view(x_in);
  TORCH_CHECK(mean.numel() == v.C && coef.numel() == 2 * v.C, "mean/coef do not match x's channels");
  at::Tensor gx = at::empty_like(v.x);
  const int64_t C = v.C, inner = v.inner, total = v.x.numel();
  if (total == 0) return gx;
  const double g = grad_loss.item<double>();
  at::Tensor md = mean.to(at::kDouble).contiguous(), cd = coef.to(at::kDouble).contiguous();
  const double* mp = md.data_ptr<double>();
  const double* cp = cd.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "bn_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    // per channel: dL/dx = a_c + b_c (x - mean_c), a = g A_c, b = g B_c (not folded
    // into one offset: x - mean first keeps precision when the mean is large)
    std::vector<acc_t> a(C), b(C), mu(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = static_cast<acc_t>(g * cp[c]);
      b[c] = static_cast<acc_t>(g * cp[C + c]);
      mu[c] = static_cast<acc_t>(mp[c]);
    }
    const int64_t rows = total / (C * inner);
    if (inner > 1) {  // (N, C, S): one (n, c) plane at a time, no index division
      at::parallel_for(0, rows * C, std::max<int64_t>(1, 32768 / inner), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C;
          const acc_t ac = a[c], bc = b[c], mc = mu[c];
          const scalar_t* xs = xp + p * inner;
          scalar_t* os = op + p * inner;
          for (int64_t i = 0; i < inner; ++i) os[i] = static_cast<scalar_t>(ac + bc * (static_cast<acc_t>(xs[i]) - mc));
        }
      });
    } else {  // (rows, C): channels-last
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xs = xp + r * C;
          scalar_t* os = op + r * C;
          for (int64_t c = 0; c < C; ++c) os[c] = static_cast<scalar_t>(a[c] + b[c] * (static_cast<acc_t>(xs[c]) - mu[c]));
        }
      });
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(nrrdd, CPU, m) {
  m.impl("bn_stat_loss", &bn_stat_loss_cpu);
  m.impl("folded_bn_stat_loss", &folded_bn_stat_loss_cpu);
  m.impl("bn_stat_loss_backward", &bn_stat_loss_backward_cpu);
}

}  // namespace nrrdd
