// CPU kernels of the per-row cross-entropy pair, the DBR / label-refinement rows,
// and their shared backward. One pass per row: an online log-sum-exp, then both
// distances, the loss and the gradient coefficients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../kernel_math.h"
#include "../op_prep.h"

namespace nrrdd {
namespace {

template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* row, int64_t V) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  for (int64_t j = 0; j < V; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    if (std::isnan(v)) return v;
    if (v == -std::numeric_limits<acc_t>::infinity()) continue;  // a masked class adds 0
    if (v > m) {
      s = s * std::exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += std::exp(v - m);
    }
  }
  return m + std::log(s);
}

void check_label_range(const int64_t* y, int64_t B, int64_t V, const char* name) {
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(y[b] >= 0 && y[b] < V, name, "[", b, "] = ", y[b], " is outside [0, ", V, ")");
}

// Calls body(b, lse, d_org, d_aug) for each row, in parallel.
template <typename Body>
void for_each_row(const at::Tensor& logits, const at::Tensor& y_org, const at::Tensor& y_aug,
                  Body body) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const int64_t* yo = y_org.data_ptr<int64_t>();
  const int64_t* ya = y_aug.data_ptr<int64_t>();
  check_label_range(yo, B, V, "y_org");
  check_label_range(ya, B, V, "y_aug");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row = lp + b * V;
        const acc_t lse = row_logsumexp<scalar_t, acc_t>(row, V);
        body(b, static_cast<double>(lse), static_cast<double>(lse - static_cast<acc_t>(row[yo[b]])),
             static_cast<double>(lse - static_cast<acc_t>(row[ya[b]])));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_pair_cpu(const at::Tensor& logits_in,
                                                           const at::Tensor& y_org,
                                                           const at::Tensor& y_aug) {
  check_logits(logits_in, y_org, y_aug);
  TORCH_CHECK(logits_in.size(1) > 0 || logits_in.size(0) == 0, "logits must have at least one class");
  at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0);
  auto opts = logits.options().dtype(at::kDouble);
  at::Tensor d_org = at::empty({B}, opts), d_aug = at::empty({B}, opts), lse = at::empty({B}, opts);
  double *po = d_org.data_ptr<double>(), *pa = d_aug.data_ptr<double>(), *pl = lse.data_ptr<double>();
  for_each_row(logits, y_org.contiguous(), y_aug.contiguous(), [&](int64_t b, double l, double o, double a) {
    pl[b] = l;
    po[b] = o;
    pa[b] = a;
  });
  const auto acc = acc_type(logits_in);
  return {d_org.to(acc), d_aug.to(acc), lse.to(acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dbr_rows_cpu(
    const at::Tensor& logits_in, const at::Tensor& y_org, const at::Tensor& y_aug,
    const c10::optional<at::Tensor>& d_org_t, const c10::optional<at::Tensor>& d_aug_t, double r,
    double alpha) {
  check_logits(logits_in, y_org, y_aug);
  TORCH_CHECK(d_org_t.has_value() == d_aug_t.has_value(), "give both d_org_t and d_aug_t, or neither");
  at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0);
  at::Tensor to = target_or_undefined(d_org_t, logits, "d_org_t");
  at::Tensor ta = target_or_undefined(d_aug_t, logits, "d_aug_t");
  const bool has_t = to.defined();
  at::Tensor tod = has_t ? to.to(at::kDouble) : at::Tensor(), tad = has_t ? ta.to(at::kDouble) : at::Tensor();
  const double* pto = has_t ? tod.data_ptr<double>() : nullptr;
  const double* pta = has_t ? tad.data_ptr<double>() : nullptr;
  auto opts = logits.options().dtype(at::kDouble);
  at::Tensor loss = at::empty({B}, opts), coef = at::empty({B, 4}, opts), lse = at::empty({B}, opts);
  double *pl = loss.data_ptr<double>(), *pc = coef.data_ptr<double>(), *ps = lse.data_ptr<double>();
  for_each_row(logits, y_org.contiguous(), y_aug.contiguous(), [&](int64_t b, double l, double o, double a) {
    ps[b] = l;
    pl[b] = dbr_row<double>(o, a, has_t, has_t ? pto[b] : 0.0, has_t ? pta[b] : 0.0, r, alpha, pc + 4 * b);
  });
  const auto acc = acc_type(logits_in);
  return {loss.to(acc), coef.to(acc), lse.to(acc)};
}

at::Tensor two_ce_backward_cpu(const at::Tensor& coef_in, const at::Tensor& logits_in,
                               const at::Tensor& lse_in, const at::Tensor& y_org_in,
                               const at::Tensor& y_aug_in) {
  check_logits(logits_in, y_org_in, y_aug_in);
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(coef_in.dim() == 2 && coef_in.size(0) == B && coef_in.size(1) == 2, "coef must be (B, 2)");
  at::Tensor logits = logits_in.contiguous();
  at::Tensor coef = coef_in.to(at::kDouble).contiguous(), lse = lse_in.to(at::kDouble).contiguous();
  at::Tensor y_org = y_org_in.contiguous(), y_aug = y_aug_in.contiguous();
  at::Tensor grad = at::empty_like(logits);
  const double* pc = coef.data_ptr<double>();
  const double* pl = lse.data_ptr<double>();
  const int64_t* yo = y_org.data_ptr<int64_t>();
  const int64_t* ya = y_aug.data_ptr<int64_t>();
  check_label_range(yo, B, V, "y_org");
  check_label_range(ya, B, V, "y_aug");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "two_ce_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t c0 = static_cast<acc_t>(pc[2 * b]), c1 = static_cast<acc_t>(pc[2 * b + 1]);
        const acc_t l = static_cast<acc_t>(pl[b]);
        for (int64_t j = 0; j < V; ++j) {
          acc_t gj = (c0 + c1) * std::exp(static_cast<acc_t>(lp[b * V + j]) - l);
          gj -= (j == yo[b] ? c0 : acc_t(0)) + (j == ya[b] ? c1 : acc_t(0));
          gp[b * V + j] = static_cast<scalar_t>(gj);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(nrrdd, CPU, m) {
  m.impl("ce_pair", &ce_pair_cpu);
  m.impl("dbr_rows", &dbr_rows_cpu);
  m.impl("two_ce_backward", &two_ce_backward_cpu);
}

}  // namespace nrrdd
