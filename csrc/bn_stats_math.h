// The BN-statistic loss from per-channel shifted sums, shared by CPU and CUDA.
//
// Each channel's sums are taken about a shift (the channel's first element), so
// a large mean does not cancel: mean = shift + S1/n, var = S2/n - (S1/n)^2.
// From the statistics, the loss ||mean - rm|| + ||var - rv|| and the gradient
// coefficients A_c = (mean_c - rm_c) / (n ||mean - rm||),
// B_c = 2 (var_c - rv_c) / (n ||var - rv||), so dL/dx = g (A_c + B_c (x - mean_c)).
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

}  // namespace nrrdd
