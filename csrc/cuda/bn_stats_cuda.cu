// CUDA kernels of the BN-statistic loss.
//
// Forward: one read of x. Per-channel sums of (x - shift) and (x - shift)^2 in
// fp32 (fp64 for double), shift = the channel's first element, taken by blocks
// that each cover a slice of one channel (NCHW) or a 32-channel strip of rows
// (channels-last), then merged in a fixed order by one small finalize kernel that
// also forms the loss and the gradient coefficients. Backward: one elementwise
// pass, dL/dx = g (A_c + B_c (x - mean_c)). No copy of x is made or saved.
// The folded form (a conv's output y = s x + t) only changes the finalize.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../bn_stats_math.h"
#include "../op_prep.h"
#include "launch.cuh"

namespace nrrdd {
namespace cuda {
namespace {

constexpr int kPlaneThreads = 256;

// Layout (outer, C, inner), inner > 1. grid = (C, splits). VEC elements per load.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kPlaneThreads) plane_sums_kernel(
    const scalar_t* __restrict__ x, acc_t* __restrict__ partial, int64_t outer, int64_t C,
    int64_t inner) {
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t scratch[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const acc_t shift = static_cast<acc_t>(x[c * inner]);
  const int64_t per_plane = inner / VEC;
  const int64_t o0 = outer * split / splits, o1 = outer * (split + 1) / splits;
  const int64_t n = (o1 - o0) * per_plane;
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = threadIdx.x; j < n; j += kPlaneThreads) {
    const int64_t o = o0 + j / per_plane, i = j % per_plane;
    const V val = reinterpret_cast<const V*>(x + (o * C + c) * inner)[i];
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      const acc_t d = static_cast<acc_t>(val.v[t]) - shift;
      s1 += d;
      s2 += d * d;
    }
  }
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    partial[(split * C + c) * 2] = s1;
    partial[(split * C + c) * 2 + 1] = s2;
  }
}

// Layout (rows, C), channels contiguous. block = (32, 8), grid = (ceil(C/32), splits).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) row_sums_kernel(const scalar_t* __restrict__ x,
                                                       acc_t* __restrict__ partial, int64_t rows,
                                                       int64_t C) {
  __shared__ acc_t sh1[8][33], sh2[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t r0 = rows * split / splits, r1 = rows * (split + 1) / splits;
  acc_t s1 = 0, s2 = 0;
  if (c < C) {
    const acc_t shift = static_cast<acc_t>(x[c]);
    int64_t r = r0 + threadIdx.y;
    // four independent rows in flight per thread
    for (; r + 24 < r1; r += 32) {
      acc_t v[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) v[t] = static_cast<acc_t>(x[(r + 8 * t) * C + c]) - shift;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        s1 += v[t];
        s2 += v[t] * v[t];
      }
    }
    for (; r < r1; r += 8) {
      const acc_t d = static_cast<acc_t>(x[r * C + c]) - shift;
      s1 += d;
      s2 += d * d;
    }
  }
  sh1[threadIdx.y][threadIdx.x] = s1;
  sh2[threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int t = 1; t < 8; ++t) {
      s1 += sh1[t][threadIdx.x];
      s2 += sh2[t][threadIdx.x];
    }
    partial[(split * C + c) * 2] = s1;
    partial[(split * C + c) * 2 + 1] = s2;
  }
}

// One block: merges the partial sums of each channel in split order, writes mean,
// var, the loss and the gradient coefficients.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024) finalize_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ partial, int64_t splits, int64_t C,
    int64_t inner, acc_t n, const acc_t* __restrict__ rm, const acc_t* __restrict__ rv,
    Affine<acc_t> affine, acc_t* __restrict__ loss, acc_t* __restrict__ mean, acc_t* __restrict__ var,
    acc_t* __restrict__ coef) {
  __shared__ acc_t scratch[32];
  acc_t dm = 0, dv = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s1 = 0, s2 = 0;
    for (int64_t k = 0; k < splits; ++k) {
      s1 += partial[(k * C + c) * 2];
      s2 += partial[(k * C + c) * 2 + 1];
    }
    acc_t mu, va;
    channel_stats<acc_t>(static_cast<acc_t>(x[c * inner]), s1, s2, n, &mu, &va);
    mean[c] = mu;
    var[c] = va;
    const acc_t d_mean = affine.mean_of_input(c, mu) - rm[c];
    const acc_t d_var = affine.var_of_input(c, va) - rv[c];
    dm += d_mean * d_mean;
    dv += d_var * d_var;
  }
  const acc_t nm = sqrt(block_sum(dm, scratch));
  const acc_t nv = sqrt(block_sum(dv, scratch));
  const acc_t im = safe_inverse(nm) / n, iv = safe_inverse(nv) / n;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    coef[c] = affine.mean_coef(c, (affine.mean_of_input(c, mean[c]) - rm[c]) * im);
    coef[C + c] = affine.var_coef(c, acc_t(2) * (affine.var_of_input(c, var[c]) - rv[c]) * iv);
  }
  if (threadIdx.x == 0) *loss = nm + nv;
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Statistics of x_in; with `scale`/`shift` defined, x_in is a folded conv's
// output y = s x + t and the loss is on the statistics of x.
Result bn_stats_impl(const at::Tensor& x_in, const ChannelView& v, const at::Tensor& running_mean,
                     const at::Tensor& running_var, const at::Tensor& scale, const at::Tensor& shift) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_type(x_in);
  auto opts = x_in.options().dtype(acc);
  const int64_t C = v.C;
  at::Tensor loss = at::empty({}, opts), mean = at::empty({C}, opts), var = at::empty({C}, opts),
             coef = at::empty({2, C}, opts);
  if (C == 0) return {loss.zero_(), mean, var, coef};
  if (v.x.numel() == 0) {
    loss.fill_(NAN);
    mean.fill_(NAN);
    var.fill_(NAN);
    coef.fill_(NAN);
    return {loss, mean, var, coef};
  }
  at::Tensor rm = running_mean.to(acc).contiguous(), rv = running_var.to(acc).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    int64_t splits;
    at::Tensor partial;
    const int64_t target_blocks = int64_t(sms) * 8;
    if (v.inner > 1) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = v.inner % kVec == 0 && aligned_for<kVec>(xp);
      const int64_t per_channel = v.outer * v.inner;
      // enough blocks to fill the device, each with at least a few thousand elements
      splits = std::max<int64_t>(1, std::min<int64_t>({(target_blocks + C - 1) / C, v.outer,
                                                        std::max<int64_t>(1, per_channel / 4096)}));
      partial = at::empty({splits, C, 2}, opts);
      const dim3 grid(C, splits);
      if (vec)
        plane_sums_kernel<scalar_t, acc_t, kVec><<<grid, kPlaneThreads, 0, stream>>>(
            xp, partial.data_ptr<acc_t>(), v.outer, C, v.inner);
      else
        plane_sums_kernel<scalar_t, acc_t, 1><<<grid, kPlaneThreads, 0, stream>>>(
            xp, partial.data_ptr<acc_t>(), v.outer, C, v.inner);
    } else {
      const int64_t strips = (C + 31) / 32;
      splits = std::max<int64_t>(1, std::min<int64_t>((target_blocks + strips - 1) / strips,
                                                      std::max<int64_t>(1, v.outer / 64)));
      partial = at::empty({splits, C, 2}, opts);
      row_sums_kernel<scalar_t, acc_t><<<dim3(strips, splits), dim3(32, 8), 0, stream>>>(
          xp, partial.data_ptr<acc_t>(), v.outer, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<scalar_t, acc_t><<<1, 1024, 0, stream>>>(
        xp, partial.data_ptr<acc_t>(), splits, C, v.inner, acc_t(v.outer * v.inner),
        rm.data_ptr<acc_t>(), rv.data_ptr<acc_t>(),
        Affine<acc_t>{scale.defined() ? scale.data_ptr<acc_t>() : nullptr,
                      shift.defined() ? shift.data_ptr<acc_t>() : nullptr},
        loss.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, mean, var, coef};
}

Result bn_stat_loss_cuda(const at::Tensor& x, const at::Tensor& running_mean,
                         const at::Tensor& running_var) {
  ChannelView v = channel_view(x);
  check_running(running_mean, v.C, x, "running_mean");
  check_running(running_var, v.C, x, "running_var");
  return bn_stats_impl(x, v, running_mean, running_var, at::Tensor(), at::Tensor());
}

Result folded_bn_stat_loss_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& running_mean, const at::Tensor& running_var) {
  ChannelView v = channel_view(y);
  check_running(running_mean, v.C, y, "running_mean");
  check_running(running_var, v.C, y, "running_var");
  const auto [s, t] = prepare_affine(scale, shift, v.C, y, acc_type(y));
  return bn_stats_impl(y, v, running_mean, running_var, s, t);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(256) bn_backward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ gx, const acc_t* __restrict__ g,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ coef, int64_t total, int64_t C,
    int64_t inner) {
  using V = Vec<scalar_t, VEC>;
  const acc_t gl = *g;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total / VEC;
       i += int64_t(gridDim.x) * blockDim.x) {
    const V xv = reinterpret_cast<const V*>(x)[i];
    V out;
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      const int64_t c = ((i * VEC + t) / inner) % C;
      out.v[t] = static_cast<scalar_t>(gl * (coef[c] + coef[C + c] * (static_cast<acc_t>(xv.v[t]) - mean[c])));
    }
    reinterpret_cast<V*>(gx)[i] = out;
  }
}

at::Tensor bn_stat_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                      const at::Tensor& mean_in, const at::Tensor& coef_in) {
  ChannelView v = channel_view(x_in);
  TORCH_CHECK(mean_in.numel() == v.C && coef_in.numel() == 2 * v.C, "mean/coef do not match x's channels");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor gx = at::empty_like(v.x);
  const int64_t total = v.x.numel();
  if (total == 0) return gx;
  const auto acc = acc_type(x_in);
  at::Tensor g = grad_loss.to(acc).contiguous(), mean = mean_in.to(acc).contiguous(),
             coef = coef_in.to(acc).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "bn_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    const int threads = 256;
    if (total % kVec == 0 && aligned_for<kVec>(xp, static_cast<const scalar_t*>(op))) {
      bn_backward_kernel<scalar_t, acc_t, kVec><<<elementwise_blocks(total / kVec, threads), threads, 0, stream>>>(
          xp, op, g.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), total, v.C, v.inner);
    } else {
      bn_backward_kernel<scalar_t, acc_t, 1><<<elementwise_blocks(total, threads), threads, 0, stream>>>(
          xp, op, g.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), total, v.C, v.inner);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nrrdd, CUDA, m) {
  m.impl("bn_stat_loss", &cuda::bn_stat_loss_cuda);
  m.impl("folded_bn_stat_loss", &cuda::folded_bn_stat_loss_cuda);
  m.impl("bn_stat_loss_backward", &cuda::bn_stat_loss_backward_cuda);
}

}  // namespace nrrdd
