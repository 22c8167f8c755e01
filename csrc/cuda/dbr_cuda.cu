// CUDA kernels of the per-row cross-entropy pair, the DBR / label-refinement
// rows and their shared backward. One warp per row: an online log-sum-exp over
// the row (16-byte loads where aligned), both distances, the row's loss and its
// gradient coefficients; backward forms (c0 + c1) softmax - c0 e_org - c1 e_aug.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "../kernel_math.h"
#include "../op_prep.h"
#include "launch.cuh"

namespace nrrdd {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename acc_t>
__device__ __forceinline__ void lse_push(acc_t& m, acc_t& s, acc_t v) {
  if (v == -INFINITY) return;  // a masked class adds 0
  if (v > m) {
    s = s * exp(m - v) + acc_t(1);
    m = v;
  } else {
    s += exp(v - m);
  }
}

// Row log-sum-exp computed by one warp; NaN in the row gives NaN.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ acc_t warp_row_lse(const scalar_t* row, int64_t V) {
  using Vv = Vec<scalar_t, VEC>;
  const int lane = threadIdx.x % 32;
  acc_t m = -INFINITY, s = 0;
  bool nan = false;
  for (int64_t j = lane; j < V / VEC; j += 32) {
    const Vv val = reinterpret_cast<const Vv*>(row)[j];
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      const acc_t v = static_cast<acc_t>(val.v[t]);
      nan |= v != v;
      lse_push(m, s, v);
    }
  }
  for (int64_t j = (V / VEC) * VEC + lane; j < V; j += 32) {
    const acc_t v = static_cast<acc_t>(row[j]);
    nan |= v != v;
    lse_push(m, s, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const acc_t mx = m > m2 ? m : m2;
    if (mx == -INFINITY) {
      s = s + s2;
    } else {
      s = s * exp(m - mx) + s2 * exp(m2 - mx);
    }
    m = mx;
  }
  nan = __any_sync(0xffffffffu, nan);
  return nan ? acc_t(NAN) : m + log(s);
}

// MODE 0: ce_pair -> out0 = d_org, out1 = d_aug. MODE 1: dbr rows -> out0 = loss, out1 = coef (B,4).
template <typename scalar_t, typename acc_t, int VEC, int MODE>
__global__ void __launch_bounds__(kRowsPerBlock * 32) rows_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ y_org,
    const int64_t* __restrict__ y_aug, const acc_t* __restrict__ t_org, const acc_t* __restrict__ t_aug,
    acc_t* __restrict__ out0, acc_t* __restrict__ out1, acc_t* __restrict__ lse_out, int64_t B,
    int64_t V, acc_t r, acc_t alpha) {
  const int64_t b = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / 32;
  if (b >= B) return;
  const scalar_t* row = logits + b * V;
  const acc_t lse = warp_row_lse<scalar_t, acc_t, VEC>(row, V);
  if (threadIdx.x % 32 != 0) return;
  const int64_t yo = y_org[b], ya = y_aug[b];
  CUDA_KERNEL_ASSERT(yo >= 0 && yo < V && "y_org out of range [0, num_classes)");
  CUDA_KERNEL_ASSERT(ya >= 0 && ya < V && "y_aug out of range [0, num_classes)");
  const acc_t d_org = lse - static_cast<acc_t>(row[yo]);
  const acc_t d_aug = lse - static_cast<acc_t>(row[ya]);
  lse_out[b] = lse;
  if (MODE == 0) {
    out0[b] = d_org;
    out1[b] = d_aug;
  } else {
    const bool has_t = t_org != nullptr;
    out0[b] = dbr_row<acc_t>(d_org, d_aug, has_t, has_t ? t_org[b] : acc_t(0),
                             has_t ? t_aug[b] : acc_t(0), r, alpha, out1 + 4 * b);
  }
}

template <int MODE>
void launch_rows(const at::Tensor& logits, const at::Tensor& y_org, const at::Tensor& y_aug,
                 const at::Tensor& t_org, const at::Tensor& t_aug, at::Tensor& out0, at::Tensor& out1,
                 at::Tensor& lse, double r, double alpha) {
  const int64_t B = logits.size(0), V = logits.size(1);
  if (B == 0) return;
  TORCH_CHECK(V > 0, "logits must have at least one class");
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const acc_t* to = t_org.defined() ? t_org.data_ptr<acc_t>() : nullptr;
    const acc_t* ta = t_aug.defined() ? t_aug.data_ptr<acc_t>() : nullptr;
    auto go = [&](auto kernel) {
      kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(
          lp, y_org.data_ptr<int64_t>(), y_aug.data_ptr<int64_t>(), to, ta, out0.data_ptr<acc_t>(),
          out1.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), B, V, acc_t(r), acc_t(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (V % kVec == 0 && aligned_for<kVec>(lp)) go(rows_kernel<scalar_t, acc_t, kVec, MODE>);
    else go(rows_kernel<scalar_t, acc_t, 1, MODE>);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_pair_cuda(const at::Tensor& logits_in,
                                                            const at::Tensor& y_org,
                                                            const at::Tensor& y_aug) {
  check_logits(logits_in, y_org, y_aug);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  auto opts = logits.options().dtype(acc_type(logits));
  const int64_t B = logits.size(0);
  at::Tensor d_org = at::empty({B}, opts), d_aug = at::empty({B}, opts), lse = at::empty({B}, opts);
  launch_rows<0>(logits, y_org.contiguous(), y_aug.contiguous(), at::Tensor(), at::Tensor(), d_org,
                 d_aug, lse, 0, 0);
  return {d_org, d_aug, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dbr_rows_cuda(
    const at::Tensor& logits_in, const at::Tensor& y_org, const at::Tensor& y_aug,
    const c10::optional<at::Tensor>& d_org_t, const c10::optional<at::Tensor>& d_aug_t, double r,
    double alpha) {
  check_logits(logits_in, y_org, y_aug);
  TORCH_CHECK(d_org_t.has_value() == d_aug_t.has_value(), "give both d_org_t and d_aug_t, or neither");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  at::Tensor to = target_or_undefined(d_org_t, logits, "d_org_t");
  at::Tensor ta = target_or_undefined(d_aug_t, logits, "d_aug_t");
  auto opts = logits.options().dtype(acc_type(logits));
  const int64_t B = logits.size(0);
  at::Tensor loss = at::empty({B}, opts), coef = at::empty({B, 4}, opts), lse = at::empty({B}, opts);
  launch_rows<1>(logits, y_org.contiguous(), y_aug.contiguous(), to, ta, loss, coef, lse, r, alpha);
  return {loss, coef, lse};
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowsPerBlock * 32) two_ce_backward_kernel(
    const acc_t* __restrict__ coef, const scalar_t* __restrict__ logits, const acc_t* __restrict__ lse,
    const int64_t* __restrict__ y_org, const int64_t* __restrict__ y_aug, scalar_t* __restrict__ grad,
    int64_t B, int64_t V) {
  using Vv = Vec<scalar_t, VEC>;
  const int64_t b = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / 32;
  if (b >= B) return;
  const int lane = threadIdx.x % 32;
  const acc_t c0 = coef[2 * b], c1 = coef[2 * b + 1], l = lse[b], cs = c0 + c1;
  const int64_t yo = y_org[b], ya = y_aug[b];
  CUDA_KERNEL_ASSERT(yo >= 0 && yo < V && ya >= 0 && ya < V && "labels out of range [0, num_classes)");
  const scalar_t* row = logits + b * V;
  scalar_t* grow = grad + b * V;
  auto value = [&](int64_t j, acc_t v) {
    return static_cast<scalar_t>(cs * exp(v - l) - (j == yo ? c0 : acc_t(0)) - (j == ya ? c1 : acc_t(0)));
  };
  for (int64_t j = lane; j < V / VEC; j += 32) {
    const Vv val = reinterpret_cast<const Vv*>(row)[j];
    Vv out;
#pragma unroll
    for (int t = 0; t < VEC; ++t) out.v[t] = value(j * VEC + t, static_cast<acc_t>(val.v[t]));
    reinterpret_cast<Vv*>(grow)[j] = out;
  }
  for (int64_t j = (V / VEC) * VEC + lane; j < V; j += 32) grow[j] = value(j, static_cast<acc_t>(row[j]));
}

at::Tensor two_ce_backward_cuda(const at::Tensor& coef_in, const at::Tensor& logits_in,
                                const at::Tensor& lse_in, const at::Tensor& y_org_in,
                                const at::Tensor& y_aug_in) {
  check_logits(logits_in, y_org_in, y_aug_in);
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(coef_in.dim() == 2 && coef_in.size(0) == B && coef_in.size(1) == 2, "coef must be (B, 2)");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  const auto acc = acc_type(logits);
  at::Tensor coef = coef_in.to(acc).contiguous(), lse = lse_in.to(acc).contiguous();
  at::Tensor y_org = y_org_in.contiguous(), y_aug = y_aug_in.contiguous();
  at::Tensor grad = at::empty_like(logits);
  if (B == 0 || V == 0) return grad;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "two_ce_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    auto go = [&](auto kernel) {
      kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(coef.data_ptr<acc_t>(), lp, lse.data_ptr<acc_t>(),
                                                       y_org.data_ptr<int64_t>(), y_aug.data_ptr<int64_t>(),
                                                       gp, B, V);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (V % kVec == 0 && aligned_for<kVec>(lp, static_cast<const scalar_t*>(gp)))
      go(two_ce_backward_kernel<scalar_t, acc_t, kVec>);
    else
      go(two_ce_backward_kernel<scalar_t, acc_t, 1>);
  });
  return grad;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nrrdd, CUDA, m) {
  m.impl("ce_pair", &cuda::ce_pair_cuda);
  m.impl("dbr_rows", &cuda::dbr_rows_cuda);
  m.impl("two_ce_backward", &cuda::two_ce_backward_cuda);
}

}  // namespace nrrdd
