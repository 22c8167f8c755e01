// CUDA kernels: normalised CAM (one block per image), the non-critical mask, and
// the masked Adam / SGD steps: one pass over the pixels that upsamples the CAM on
// the fly, so the full-resolution mask is never written to memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../kernel_math.h"
#include "../op_prep.h"
#include "launch.cuh"

namespace nrrdd {
namespace cuda {
namespace {

constexpr int kCamThreads = 256;

// raw: (B, hw) workspace in acc_t. One block per image.
template <typename scalar_t, typename acc_t>
__global__ void cam_kernel(const scalar_t* __restrict__ f, const scalar_t* __restrict__ wt,
                           const int64_t* __restrict__ labels, acc_t* __restrict__ raw,
                           scalar_t* __restrict__ out, int64_t K, int64_t hw, int64_t classes,
                           bool spatial_weight) {
  __shared__ acc_t partial[kCamThreads];
  __shared__ acc_t scratch[32];
  __shared__ int nan_flag;
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  CUDA_KERNEL_ASSERT(y >= 0 && y < classes && "labels out of range [0, num_classes)");
  const int64_t ws_k = spatial_weight ? hw : 1, ws_p = spatial_weight ? 1 : 0;
  const scalar_t* fb = f + b * K * hw;
  const scalar_t* wy = wt + y * K * ws_k;
  acc_t* rb = raw + b * hw;
  // Split K over `nks` groups of threads when the map is smaller than the block.
  const int64_t nks = hw >= kCamThreads ? 1 : kCamThreads / hw;
  for (int64_t idx = threadIdx.x; idx < hw * nks; idx += blockDim.x) {
    const int64_t ks = idx / hw, p = idx % hw;
    acc_t s = 0;
    for (int64_t k = ks; k < K; k += nks)
      s += static_cast<acc_t>(wy[k * ws_k + p * ws_p]) * static_cast<acc_t>(fb[k * hw + p]);
    if (nks > 1) partial[idx] = s;
    else rb[p] = s;
  }
  __syncthreads();
  if (nks > 1) {
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
      acc_t s = 0;
      for (int64_t ks = 0; ks < nks; ++ks) s += partial[ks * hw + p];
      rb[p] = s;
    }
  }
  if (threadIdx.x == 0) nan_flag = 0;
  __syncthreads();
  acc_t lo = rb[0], hi = rb[0];
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
    const acc_t v = rb[p];
    if (v != v) nan_flag = 1;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  // block min / max via negated sums is wrong; reduce explicitly.
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t l2 = __shfl_xor_sync(0xffffffffu, lo, o), h2 = __shfl_xor_sync(0xffffffffu, hi, o);
    lo = l2 < lo ? l2 : lo;
    hi = h2 > hi ? h2 : hi;
  }
  __shared__ acc_t wlo[32], whi[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    wlo[warp] = lo;
    whi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < (int)(blockDim.x + 31) / 32; ++i) {
      lo = wlo[i] < lo ? wlo[i] : lo;
      hi = whi[i] > hi ? whi[i] : hi;
    }
    if (nan_flag) lo = hi = acc_t(NAN);
    scratch[0] = lo;
    scratch[1] = acc_t(1) / (hi - lo + acc_t(1e-8));
  }
  __syncthreads();
  lo = scratch[0];
  const acc_t inv = scratch[1];
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x)
    out[b * hw + p] = static_cast<scalar_t>((rb[p] - lo) * inv);
}

at::Tensor cam_cuda(const at::Tensor& features, const at::Tensor& fc_weight, const at::Tensor& labels) {
  CamInputs in = prepare_cam(features, fc_weight, labels);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t hw = in.h * in.w;
  at::Tensor out = at::empty({in.B, in.h, in.w}, features.options());
  if (in.B == 0) return out;
  at::Tensor raw = at::empty({in.B, hw}, features.options().dtype(acc_type(features)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "cam_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cam_kernel<scalar_t, acc_t><<<in.B, kCamThreads, 0, stream>>>(
        in.features.data_ptr<scalar_t>(), in.weight.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(),
        raw.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), in.K, hw, in.classes, in.spatial_weight);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename acc_t>
__global__ void mask_kernel(const acc_t* __restrict__ cam, scalar_t* __restrict__ out, int64_t B,
                            int64_t h, int64_t w, int64_t H, int64_t W, acc_t sy, acc_t sx, acc_t eps) {
  const int64_t total = B * H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = i % W, yy = (i / W) % H, b = i / (H * W);
    out[i] = static_cast<scalar_t>(
        mask_at<acc_t>(cam + b * h * w, w, lerp_axis<acc_t>(yy, sy, h), lerp_axis<acc_t>(xx, sx, w), eps));
  }
}

at::Tensor non_critical_mask_cuda(const at::Tensor& cam, c10::SymIntArrayRef size, double eps) {
  TORCH_CHECK(cam.dim() == 3, "cam must be (B,h,w), got ", cam.sizes());
  TORCH_CHECK(size.size() == 2, "size must be (H, W)");
  const int64_t H = size[0].expect_int(), W = size[1].expect_int();
  TORCH_CHECK(H > 0 && W > 0, "size must be positive");
  const c10::cuda::CUDAGuard guard(cam.device());
  const int64_t B = cam.size(0), h = cam.size(1), w = cam.size(2);
  at::Tensor out = at::empty({B, 1, H, W}, cam.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor ca = cam.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const int threads = 256;
    mask_kernel<scalar_t, acc_t><<<elementwise_blocks(out.numel(), threads), threads, 0, stream>>>(
        ca.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, h, w, H, W, acc_t(h) / H, acc_t(w) / W,
        acc_t(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

struct StepShape {
  int64_t B, C, H, W, h, w;
};

// One thread handles VEC consecutive pixels of a row (W % VEC == 0).
template <typename scalar_t, typename acc_t, typename index_t, int VEC, bool ADAM>
__global__ void __launch_bounds__(256) masked_step_kernel(
    scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
    scalar_t* __restrict__ v, const acc_t* __restrict__ cam, const float* __restrict__ step,
    const float* __restrict__ lr_scale, const float* __restrict__ lo, const float* __restrict__ hi,
    StepShape s, acc_t lr, acc_t beta1, acc_t beta2, acc_t eps, acc_t cam_eps) {
  using V = Vec<scalar_t, VEC>;
  const acc_t lr_eff = lr_scale != nullptr ? lr * static_cast<acc_t>(*lr_scale) : lr;
  AdamStep<acc_t> k{};
  if (ADAM) k = adam_step_constants<acc_t>(lr_eff, beta1, beta2, eps, static_cast<acc_t>(*step) + acc_t(1));
  const acc_t sy = acc_t(s.h) / s.H, sx = acc_t(s.w) / s.W;
  const index_t total = static_cast<index_t>(s.B * s.C * s.H * s.W / VEC);
  const index_t W = s.W, H = s.H, C = s.C;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t e = i * VEC;
    const index_t x0 = e % W, row = e / W;
    const index_t yy = row % H, rc = row / H, c = rc % C, b = rc / C;
    const auto ay = lerp_axis<acc_t>(yy, sy, s.h);
    const acc_t* cb = cam + b * s.h * s.w;
    V xv = reinterpret_cast<const V*>(x)[i];
    const V gv = reinterpret_cast<const V*>(g)[i];
    V mv, vv;
    if (ADAM) {
      mv = reinterpret_cast<const V*>(m)[i];
      vv = reinterpret_cast<const V*>(v)[i];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t mask = mask_at<acc_t>(cb, s.w, ay, lerp_axis<acc_t>(x0 + j, sx, s.w), cam_eps);
      const acc_t gj = static_cast<acc_t>(gv.v[j]);
      acc_t nx;
      if (ADAM) {
        acc_t mm = static_cast<acc_t>(mv.v[j]), vq = static_cast<acc_t>(vv.v[j]);
        nx = masked_adam_update<acc_t>(static_cast<acc_t>(xv.v[j]), gj, mm, vq, mask, k);
        mv.v[j] = static_cast<scalar_t>(mm);
        vv.v[j] = static_cast<scalar_t>(vq);
      } else {
        nx = static_cast<acc_t>(xv.v[j]) - mask * lr_eff * gj;
      }
      xv.v[j] = static_cast<scalar_t>(clamp_optional<acc_t>(nx, lo, hi, c));
    }
    reinterpret_cast<V*>(x)[i] = xv;
    if (ADAM) {
      reinterpret_cast<V*>(m)[i] = mv;
      reinterpret_cast<V*>(v)[i] = vv;
    }
  }
}

template <bool ADAM>
void launch_masked_step(at::Tensor& x, const StepInputs& in, at::Tensor* m, at::Tensor* v,
                        const at::Tensor& step_f, const at::Tensor& lr_scale_f, double lr, double beta1,
                        double beta2, double eps, double cam_eps) {
  if (x.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const StepShape s{in.B, in.C, in.H, in.W, in.h, in.w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = in.grad.data_ptr<scalar_t>();
    scalar_t* mp = ADAM ? m->data_ptr<scalar_t>() : nullptr;
    scalar_t* vp = ADAM ? v->data_ptr<scalar_t>() : nullptr;
    const float* sp = ADAM ? step_f.data_ptr<float>() : nullptr;
    const float* ls = lr_scale_f.defined() ? lr_scale_f.data_ptr<float>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t) >= 4 ? 4 : 2;
    const bool vec = in.W % kVec == 0 && aligned_for<kVec>(xp, gp) && (!ADAM || aligned_for<kVec>(mp, vp));
    const int threads = 256;
    auto args = [&](auto kernel, int vec_width) {
      kernel<<<elementwise_blocks(x.numel() / vec_width, threads), threads, 0, stream>>>(
          xp, gp, mp, vp, in.cam.data_ptr<acc_t>(), sp, ls, data_or_null(in.clamp_min),
          data_or_null(in.clamp_max), s, acc_t(lr), acc_t(beta1), acc_t(beta2), acc_t(eps), acc_t(cam_eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (x.numel() < (int64_t(1) << 31) - 1024) {
      if (vec) args(masked_step_kernel<scalar_t, acc_t, int32_t, kVec, ADAM>, kVec);
      else args(masked_step_kernel<scalar_t, acc_t, int32_t, 1, ADAM>, 1);
    } else {
      if (vec) args(masked_step_kernel<scalar_t, acc_t, int64_t, kVec, ADAM>, kVec);
      else args(masked_step_kernel<scalar_t, acc_t, int64_t, 1, ADAM>, 1);
    }
  });
}

void masked_adam_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& cam,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                           const c10::optional<at::Tensor>& lr_scale, double lr, double beta1,
                           double beta2, double eps, double cam_eps,
                           const c10::optional<at::Tensor>& clamp_min,
                           const c10::optional<at::Tensor>& clamp_max) {
  StepInputs in = prepare_step(x, grad, cam, clamp_min, clamp_max);
  const at::Tensor ls = check_adam_state(x, exp_avg, exp_avg_sq, step, lr_scale);
  const at::Tensor step_f = step.scalar_type() == at::kFloat && step.is_contiguous()
                                ? step
                                : step.to(at::kFloat).contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  InPlace xi(x), mi(exp_avg), vi(exp_avg_sq);
  launch_masked_step<true>(xi.work, in, &mi.work, &vi.work, step_f, ls, lr, beta1, beta2, eps, cam_eps);
  xi.commit();
  mi.commit();
  vi.commit();
  step.add_(1);
}

void masked_sgd_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& cam, double lr,
                          double cam_eps, const c10::optional<at::Tensor>& clamp_min,
                          const c10::optional<at::Tensor>& clamp_max) {
  StepInputs in = prepare_step(x, grad, cam, clamp_min, clamp_max);
  const c10::cuda::CUDAGuard guard(x.device());
  InPlace xi(x);
  launch_masked_step<false>(xi.work, in, nullptr, nullptr, at::Tensor(), at::Tensor(), lr, 0, 0, 0, cam_eps);
  xi.commit();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(nrrdd, CUDA, m) {
  m.impl("cam", &cuda::cam_cuda);
  m.impl("non_critical_mask", &cuda::non_critical_mask_cuda);
  m.impl("masked_adam_step_", &cuda::masked_adam_step_cuda);
  m.impl("masked_sgd_step_", &cuda::masked_sgd_step_cuda);
}

}  // namespace nrrdd
