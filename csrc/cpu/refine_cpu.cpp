// CPU kernels: normalised CAM, the non-critical mask, and the masked Adam / SGD
// steps that upsample the CAM on the fly (the full-resolution mask is never stored).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../kernel_math.h"
#include "../op_prep.h"

namespace nrrdd {
namespace {

at::Tensor cam_cpu(const at::Tensor& features, const at::Tensor& fc_weight, const at::Tensor& labels) {
  CamInputs in = prepare_cam(features, fc_weight, labels);
  const int64_t hw = in.h * in.w;
  at::Tensor out = at::empty({in.B, in.h, in.w}, features.options());
  if (in.B == 0) return out;
  const int64_t* y = in.labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < in.B; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < in.classes, "labels[", b, "] = ", y[b], " is outside [0, ",
                in.classes, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "cam_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = in.features.data_ptr<scalar_t>();
    const scalar_t* wt = in.weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t K = in.K;
    const int64_t wstride_k = in.spatial_weight ? hw : 1;
    const int64_t wstride_p = in.spatial_weight ? 1 : 0;
    at::parallel_for(0, in.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> c(hw);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* fb = f + b * K * hw;
        const scalar_t* wy = wt + y[b] * K * wstride_k;
        std::fill(c.begin(), c.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t p = 0; p < hw; ++p) {
            c[p] += static_cast<acc_t>(wy[k * wstride_k + p * wstride_p]) *
                    static_cast<acc_t>(fb[k * hw + p]);
          }
        }
        acc_t lo = c[0], hi = c[0];
        bool nan = false;
        for (int64_t p = 0; p < hw; ++p) {
          nan |= std::isnan(c[p]);
          lo = std::min(lo, c[p]);
          hi = std::max(hi, c[p]);
        }
        if (nan) lo = hi = std::numeric_limits<acc_t>::quiet_NaN();
        const acc_t inv = acc_t(1) / (hi - lo + acc_t(1e-8));
        for (int64_t p = 0; p < hw; ++p) o[b * hw + p] = static_cast<scalar_t>((c[p] - lo) * inv);
      }
    });
  });
  return out;
}

at::Tensor non_critical_mask_cpu(const at::Tensor& cam, c10::SymIntArrayRef size, double eps) {
  TORCH_CHECK(cam.dim() == 3, "cam must be (B,h,w), got ", cam.sizes());
  TORCH_CHECK(size.size() == 2, "size must be (H, W)");
  const int64_t H = size[0].expect_int(), W = size[1].expect_int();
  TORCH_CHECK(H > 0 && W > 0, "size must be positive, got (", H, ", ", W, ")");
  const int64_t B = cam.size(0), h = cam.size(1), w = cam.size(2);
  at::Tensor out = at::empty({B, 1, H, W}, cam.options());
  at::Tensor c = cam.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "mask_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor ca = c.to(c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* cp = ca.data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t sy = static_cast<acc_t>(h) / H, sx = static_cast<acc_t>(w) / W;
    at::parallel_for(0, B * H, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, yy = r % H;
        const auto ay = lerp_axis<acc_t>(yy, sy, h);
        for (int64_t xx = 0; xx < W; ++xx) {
          const auto ax = lerp_axis<acc_t>(xx, sx, w);
          o[r * W + xx] = static_cast<scalar_t>(mask_at<acc_t>(cp + b * h * w, w, ay, ax, acc_t(eps)));
        }
      }
    });
  });
  return out;
}

// One pass over the pixels of x for either step; `adam` selects the update.
template <bool adam>
void masked_step_cpu(InPlace& x, const StepInputs& in, InPlace* m, InPlace* v, double lr,
                     double beta1, double beta2, double eps, double t, double cam_eps) {
  const float* lo = data_or_null(in.clamp_min);
  const float* hi = data_or_null(in.clamp_max);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.work.scalar_type(), "step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.work.data_ptr<scalar_t>();
    const scalar_t* gp = in.grad.data_ptr<scalar_t>();
    scalar_t* mp = adam ? m->work.data_ptr<scalar_t>() : nullptr;
    scalar_t* vp = adam ? v->work.data_ptr<scalar_t>() : nullptr;
    const acc_t* cp = in.cam.data_ptr<acc_t>();
    const acc_t sy = static_cast<acc_t>(in.h) / in.H, sx = static_cast<acc_t>(in.w) / in.W;
    const auto k = adam_step_constants<acc_t>(acc_t(lr), acc_t(beta1), acc_t(beta2), acc_t(eps), acc_t(t));
    // rows of W pixels: (b, c, y)
    at::parallel_for(0, in.B * in.C * in.H, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t yy = r % in.H, c = (r / in.H) % in.C, b = r / (in.H * in.C);
        const auto ay = lerp_axis<acc_t>(yy, sy, in.h);
        const acc_t* cam_b = cp + b * in.h * in.w;
        for (int64_t xx = 0; xx < in.W; ++xx) {
          const int64_t i = r * in.W + xx;
          const acc_t mask = mask_at<acc_t>(cam_b, in.w, ay, lerp_axis<acc_t>(xx, sx, in.w), acc_t(cam_eps));
          const acc_t g = static_cast<acc_t>(gp[i]);
          acc_t nx;
          if constexpr (adam) {
            acc_t mm = static_cast<acc_t>(mp[i]), vv = static_cast<acc_t>(vp[i]);
            nx = masked_adam_update<acc_t>(static_cast<acc_t>(xp[i]), g, mm, vv, mask, k);
            mp[i] = static_cast<scalar_t>(mm);
            vp[i] = static_cast<scalar_t>(vv);
          } else {
            nx = static_cast<acc_t>(xp[i]) - mask * acc_t(lr) * g;
          }
          xp[i] = static_cast<scalar_t>(clamp_optional<acc_t>(nx, lo, hi, c));
        }
      }
    });
  });
}

void masked_adam_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& cam,
                          const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                          const c10::optional<at::Tensor>& lr_scale, double lr, double beta1,
                          double beta2, double eps, double cam_eps,
                          const c10::optional<at::Tensor>& clamp_min,
                          const c10::optional<at::Tensor>& clamp_max) {
  StepInputs in = prepare_step(x, grad, cam, clamp_min, clamp_max);
  const at::Tensor ls = check_adam_state(x, exp_avg, exp_avg_sq, step, lr_scale);
  const double t = step.item<double>() + 1.0;
  if (ls.defined()) lr *= ls.item<double>();
  InPlace xi(x), mi(exp_avg), vi(exp_avg_sq);
  masked_step_cpu<true>(xi, in, &mi, &vi, lr, beta1, beta2, eps, t, cam_eps);
  xi.commit();
  mi.commit();
  vi.commit();
  step.fill_(t);
}

void masked_sgd_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& cam, double lr,
                         double cam_eps, const c10::optional<at::Tensor>& clamp_min,
                         const c10::optional<at::Tensor>& clamp_max) {
  StepInputs in = prepare_step(x, grad, cam, clamp_min, clamp_max);
  InPlace xi(x);
  masked_step_cpu<false>(xi, in, nullptr, nullptr, lr, 0, 0, 0, 1, cam_eps);
  xi.commit();
}

}  // namespace

TORCH_LIBRARY_IMPL(nrrdd, CPU, m) {
  m.impl("cam", &cam_cpu);
  m.impl("non_critical_mask", &non_critical_mask_cpu);
  m.impl("masked_adam_step_", &masked_adam_step_cpu);
  m.impl("masked_sgd_step_", &masked_sgd_step_cpu);
}

}  // namespace nrrdd
