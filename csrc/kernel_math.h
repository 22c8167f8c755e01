// Scalar math shared by the CPU and CUDA kernels, so both compute the same
// function: the bilinear source index of F.interpolate, the masked Adam update,
// and the per-row DBR / label-refinement terms.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NRRDD_HD __host__ __device__ __forceinline__
#else
#define NRRDD_HD inline
#endif

namespace nrrdd {

// One axis of F.interpolate(mode="bilinear", align_corners=False) with `size`
// given: src = max(scale * (dst + 0.5) - 0.5, 0), scale = in / out.
template <typename T>
struct LerpAxis {
  int64_t i0, i1;
  T w1;  // weight of i1; i0 gets 1 - w1
};

template <typename T>
NRRDD_HD LerpAxis<T> lerp_axis(int64_t dst, T scale, int64_t in_size) {
  T src = scale * (static_cast<T>(dst) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  T w1 = src - static_cast<T>(i0);
  if (w1 > T(1)) w1 = T(1);
  return {i0, i0 + (i0 < in_size - 1 ? 1 : 0), w1};
}

// The non-critical mask at one output pixel: max(0, eps - bilinear(cam)).
// `cam` points at one image's normalised (h, w) map, row-major.
template <typename T>
NRRDD_HD T mask_at(const T* cam, int64_t w_in, const LerpAxis<T>& ay, const LerpAxis<T>& ax,
                   T eps) {
  const T top = (T(1) - ax.w1) * cam[ay.i0 * w_in + ax.i0] + ax.w1 * cam[ay.i0 * w_in + ax.i1];
  const T bot = (T(1) - ax.w1) * cam[ay.i1 * w_in + ax.i0] + ax.w1 * cam[ay.i1 * w_in + ax.i1];
  const T v = eps - ((T(1) - ay.w1) * top + ay.w1 * bot);
  return v > T(0) ? v : T(0);
}

// Adam constants for one step, read once per thread.
template <typename T>
struct AdamStep {
  T beta1, beta2, eps, step_size, inv_sqrt_bc2;
};

template <typename T>
NRRDD_HD AdamStep<T> adam_step_constants(T lr, T beta1, T beta2, T eps, T t) {
  const T bc1 = T(1) - static_cast<T>(pow(beta1, t));
  const T bc2 = T(1) - static_cast<T>(pow(beta2, t));
  return {beta1, beta2, eps, lr / bc1, T(1) / static_cast<T>(sqrt(bc2))};
}

// Updates m, v in place and returns the new pixel value, before clamping.
template <typename T>
NRRDD_HD T masked_adam_update(T x, T g, T& m, T& v, T mask, const AdamStep<T>& k) {
  m = k.beta1 * m + (T(1) - k.beta1) * g;
  v = k.beta2 * v + (T(1) - k.beta2) * g * g;
  const T denom = sqrt(v) * k.inv_sqrt_bc2 + k.eps;
  return x - mask * k.step_size * m / denom;
}

template <typename T>
NRRDD_HD T clamp_optional(T x, const float* lo, const float* hi, int64_t c) {
  if (lo != nullptr && x < static_cast<T>(lo[c])) x = static_cast<T>(lo[c]);
  if (hi != nullptr && x > static_cast<T>(hi[c])) x = static_cast<T>(hi[c]);
  return x;
}

// max(0, d - r) that keeps NaN (a NaN distance gives a NaN loss, as in PyTorch).
template <typename T>
NRRDD_HD T hinge(T d, T r) {
  return d > r ? d - r : (d != d ? d : T(0));
}

template <typename T>
NRRDD_HD T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// Eqs. 9-10 for one row, from its two distances. Writes the row's loss and the
// coefficients of its gradient: coef[0..1] multiply (softmax - onehot(y_org|y_aug)),
// coef[2..3] are alpha * sign(d - d_t) (minus the gradient w.r.t. the targets).
template <typename T>
NRRDD_HD T dbr_row(T d_org, T d_aug, bool has_targets, T t_org, T t_aug, T r, T alpha,
                   T* coef) {
  T loss = hinge(d_org, r) + hinge(d_aug, r);
  T s_org = T(0), s_aug = T(0);
  if (has_targets) {
    loss += alpha * (fabs(d_org - t_org) + fabs(d_aug - t_aug));
    s_org = alpha * sign_of(d_org - t_org);
    s_aug = alpha * sign_of(d_aug - t_aug);
  }
  coef[0] = (d_org > r ? T(1) : T(0)) + s_org;
  coef[1] = (d_aug > r ? T(1) : T(0)) + s_aug;
  coef[2] = s_org;
  coef[3] = s_aug;
  return loss;
}

}  // namespace nrrdd
