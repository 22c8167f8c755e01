// The BN-statistic loss from per-channel shifted sums, shared by CPU and CUDA.
//
// Each channel's sums are taken about a shift (the channel's first element), so
// a large mean does not cancel: mean = shift + S1/n, var = S2/n - (S1/n)^2.
// From the statistics, the loss ||mean - rm|| + ||var - rv|| and the gradient
// coefficients A_c = (mean_c - rm_c) / (n ||mean - rm||),
// B_c = 2 (var_c - rv_c) / (n ||var - rv||), so dL/dx = g (A_c + B_c (x - mean_c)).
// The folded variant (Affine below) reads y = s x + t instead of x.
#pragma once

#include "kernel_math.h"

namespace nrrdd {

template <typename T>
NRRDD_HD void channel_stats(T shift, T s1, T s2, T n, T* mean, T* var) {
  const T m = s1 / n;
  T v = s2 / n - m * m;
  if (v < T(0)) v = T(0);
  *mean = shift + m;
  *var = v;
}

template <typename T>
NRRDD_HD T safe_inverse(T norm) {
  return norm > T(0) ? T(1) / norm : T(0);
}

// The folded form: the statistics are taken of y = s x + t (a conv with the
// BatchNorm folded in) and mapped back to x: mean_x = (mean_y - t) / s,
// var_x = var_y / s^2. The gradient coefficients w.r.t. y are those w.r.t. x
// divided by s (A) and s^2 (B). Identity when there is no affine map.
template <typename T>
struct Affine {
  const T* scale;  // nullptr: identity
  const T* shift;

  NRRDD_HD T mean_of_input(int64_t c, T mean_y) const {
    return scale ? (mean_y - shift[c]) / scale[c] : mean_y;
  }
  NRRDD_HD T var_of_input(int64_t c, T var_y) const {
    return scale ? var_y / (scale[c] * scale[c]) : var_y;
  }
  NRRDD_HD T mean_coef(int64_t c, T a) const { return scale ? a / scale[c] : a; }
  NRRDD_HD T var_coef(int64_t c, T b) const { return scale ? b / (scale[c] * scale[c]) : b; }
};

}  // namespace nrrdd
