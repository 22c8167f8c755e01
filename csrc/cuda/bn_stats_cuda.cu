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

#include <utility>

#include "../bn_stats_math.h"
#include "../op_prep.h"
#include "launch.cuh"

namespace nrrdd {
namespace cuda {
namespace {

constexpr int kPlaneThreads = 256;

// Layout (outer, C, inner), inner > 1. grid = (C, splits): a block sums the planes
// [o0, o1) of channel c, VEC elements per load. Large planes are walked plane by
// plane (no index division); planes smaller than the block are flattened.
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
  acc_t s1 = 0, s2 = 0;
  auto add = [&](const V& val) {
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      const acc_t d = static_cast<acc_t>(val.v[t]) - shift;
      s1 += d;
      s2 += d * d;
    }
  };
  if (per_plane >= kPlaneThreads) {
    for (int64_t o = o0; o < o1; ++o) {
      const V* plane = reinterpret_cast<const V*>(x + (o * C + c) * inner);
      int64_t i = threadIdx.x;
      for (; i + kPlaneThreads < per_plane; i += 2 * kPlaneThreads) {
        const V a = plane[i], b = plane[i + kPlaneThreads];  // two loads in flight
        add(a);
        add(b);
      }
      if (i < per_plane) add(plane[i]);
    }
  } else {
    const uint32_t pp = static_cast<uint32_t>(per_plane);
    const uint32_t n = static_cast<uint32_t>((o1 - o0) * per_plane);
    for (uint32_t j = threadIdx.x; j < n; j += kPlaneThreads) {
      const int64_t o = o0 + j / pp, i = j % pp;
      add(reinterpret_cast<const V*>(x + (o * C + c) * inner)[i]);
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

// One block: merges the partial sums of each channel in split order and, in
// float64 as the CPU kernel does, forms the statistics, the loss and the gradient
// coefficients (an fp32 mean of data near 1e4 is off by half an ulp, 5e-4, which
// the difference to running_mean would carry into the loss).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024) finalize_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ partial, int64_t splits, int64_t C,
    int64_t inner, double n, const double* __restrict__ rm, const double* __restrict__ rv,
    Affine<double> affine, acc_t* __restrict__ loss, acc_t* __restrict__ mean, acc_t* __restrict__ var,
    acc_t* __restrict__ coef) {
  __shared__ double scratch[32];
  // (mean, var) of the BN layer's input for channel c, minus the running statistics
  auto deltas = [&](int64_t c, double* mu, double* va) {
    double s1 = 0, s2 = 0;
    for (int64_t k = 0; k < splits; ++k) {
      s1 += static_cast<double>(partial[(k * C + c) * 2]);
      s2 += static_cast<double>(partial[(k * C + c) * 2 + 1]);
    }
    channel_stats<double>(static_cast<double>(x[c * inner]), s1, s2, n, mu, va);
    return std::pair<double, double>(affine.mean_of_input(c, *mu) - rm[c], affine.var_of_input(c, *va) - rv[c]);
  };
  double dm = 0, dv = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    double mu, va;
    const auto [d_mean, d_var] = deltas(c, &mu, &va);
    mean[c] = static_cast<acc_t>(mu);
    var[c] = static_cast<acc_t>(va);
    dm += d_mean * d_mean;
    dv += d_var * d_var;
  }
  const double nm = sqrt(block_sum(dm, scratch));
  const double nv = sqrt(block_sum(dv, scratch));
  const double im = safe_inverse(nm) / n, iv = safe_inverse(nv) / n;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    double mu, va;
    const auto [d_mean, d_var] = deltas(c, &mu, &va);
    coef[c] = static_cast<acc_t>(affine.mean_coef(c, d_mean * im));
    coef[C + c] = static_cast<acc_t>(affine.var_coef(c, 2.0 * d_var * iv));
  }
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(nm + nv);
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
  // the finalize works in float64 (a few numbers per channel)
  at::Tensor rm = running_mean.to(at::kDouble).contiguous(), rv = running_var.to(at::kDouble).contiguous();
  at::Tensor s64 = scale.defined() ? scale.to(at::kDouble).contiguous() : scale;
  at::Tensor t64 = shift.defined() ? shift.to(at::kDouble).contiguous() : shift;
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
        xp, partial.data_ptr<acc_t>(), splits, C, v.inner, static_cast<double>(v.outer * v.inner),
        rm.data_ptr<double>(), rv.data_ptr<double>(),
        Affine<double>{s64.defined() ? s64.data_ptr<double>() : nullptr,
                       t64.defined() ? t64.data_ptr<double>() : nullptr},
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

// dL/dx = g (A_c + B_c (x - mean_c)). LAYOUT 0: the VEC elements of a load share
// one channel (inner % VEC == 0); 1: channels-last (inner == 1, consecutive
// channels); 2: anything else (a channel per element). index_t is int32 when the
// tensor allows, so the index arithmetic stays cheap.
template <typename scalar_t, typename acc_t, typename index_t, int VEC, int LAYOUT>
__global__ void __launch_bounds__(256) bn_backward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ gx, const acc_t* __restrict__ g,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ coef, index_t total, index_t C,
    index_t inner) {
  using V = Vec<scalar_t, VEC>;
  const acc_t gl = *g;
  const index_t n_vec = total / VEC;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n_vec;
       i += index_t(gridDim.x) * blockDim.x) {
    const V xv = reinterpret_cast<const V*>(x)[i];
    V out;
    index_t c = LAYOUT == 0 ? (i * VEC / inner) % C : (LAYOUT == 1 ? (i * VEC) % C : 0);
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      if (LAYOUT == 2) c = ((i * VEC + t) / inner) % C;
      out.v[t] = static_cast<scalar_t>(gl * (coef[c] + coef[C + c] * (static_cast<acc_t>(xv.v[t]) - mean[c])));
      if (LAYOUT == 1 && ++c == C) c = 0;
    }
    reinterpret_cast<V*>(gx)[i] = out;
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_bn_backward(const scalar_t* xp, scalar_t* op, const at::Tensor& g, const at::Tensor& mean,
                        const at::Tensor& coef, int64_t total, int64_t C, int64_t inner) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int threads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  const acc_t* gp = g.data_ptr<acc_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();
  const acc_t* cp = coef.data_ptr<acc_t>();
  const bool vec = total % kVec == 0 && aligned_for<kVec>(xp, static_cast<const scalar_t*>(op));
  auto go = [&](auto kernel, int width) {
    kernel<<<elementwise_blocks(total / width, threads), threads, 0, stream>>>(
        xp, op, gp, mp, cp, index_t(total), index_t(C), index_t(inner));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!vec) go(bn_backward_kernel<scalar_t, acc_t, index_t, 1, 0>, 1);
  else if (inner % kVec == 0) go(bn_backward_kernel<scalar_t, acc_t, index_t, kVec, 0>, kVec);
  else if (inner == 1) go(bn_backward_kernel<scalar_t, acc_t, index_t, kVec, 1>, kVec);
  else go(bn_backward_kernel<scalar_t, acc_t, index_t, kVec, 2>, kVec);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "bn_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    if (total < (int64_t(1) << 31) - 1024)
      launch_bn_backward<scalar_t, acc_t, int32_t>(xp, op, g, mean, coef, total, v.C, v.inner);
    else
      launch_bn_backward<scalar_t, acc_t, int64_t>(xp, op, g, mean, coef, total, v.C, v.inner);
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
