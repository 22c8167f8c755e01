// Small CUDA building blocks shared by the kernel files: aligned vectors for
// 16-byte accesses, warp/block sums, and launch-size helpers.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace nrrdd {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename... Ptrs>
inline bool aligned_for(const Ptrs*... ptrs) {
  bool ok = true;
  ((ok = ok && reinterpret_cast<uintptr_t>(ptrs) % (sizeof(Ptrs) * N) == 0), ...);
  return ok;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) scratch[0] = v;
  __syncthreads();
  return scratch[0];
}

// Blocks for a grid-stride elementwise kernel: enough to fill the device a few times.
inline int64_t elementwise_blocks(int64_t work_items, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t need = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(need, int64_t(sms) * 8));
}

}  // namespace cuda
}  // namespace nrrdd
