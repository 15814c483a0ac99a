// Device helpers shared by the cld_fast CUDA kernel files (csrc/cuda/*.cu). Plain CUDA C++17: no
// torch headers, so every kernel file compiles with plain nvcc (.ci/compile_cuda.sh).
//
// Kernel shape used by the elementwise ops: a grid-stride loop over "units" of V consecutive elements
// of one sample's row (V = 4, 2 or 1), 64-bit indexing (32-bit where the unit count allows it, which
// only saves division cost). V > 1 is used when D % V == 0 and every array is aligned to V elements,
// so float32 state moves in 16-byte loads / stores (8 bytes for bf16 / fp16 network outputs); rows
// whose length or base pointers do not allow it run the same code with V = 1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "cld_cuda_launch.h"
#include "cld_philox.h"

namespace cld {
namespace cuda {

constexpr int kThreads = 256;        // threads per block of every kernel here
constexpr int kBlocksPerSM = 8;      // 2048 resident threads per SM on sm_80 / sm_90
constexpr int kMaxDevices = 64;

// ---- conversions (explicit: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends) ---------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename O>
__device__ __forceinline__ O from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// ---- vector loads / stores --------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V elements at p (aligned to V elements) as float.
template <int V, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(pk.v[k]);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// The (eps_x, eps_v) pair of V elements starting at (b, d): from an explicit (B, 2, D) eps, or drawn
// in-kernel as (z0, z1) of the Philox contract (element index b * D + d + k, counter word step, tag).
template <int V>
__device__ __forceinline__ void noise_pair(const float* eps, int64_t seed, int64_t b, int64_t d, int64_t D,
                                           int64_t step, uint32_t tag, float (&ex)[V], float (&ev)[V]) {
  if (eps != nullptr) {
    load<V>(eps + b * 2 * D + d, ex);
    load<V>(eps + b * 2 * D + D + d, ev);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) normals2(seed, b * D + d + k, step, tag, ex[k], ev[k]);
  }
}

// Row *step of a (S, K) table into registers; a step outside [0, S) gives a NaN row (visible in the
// result) instead of reading out of bounds: the kernels never synchronise to check it on the host.
template <int K>
__device__ __forceinline__ int64_t load_row(const float* table, int64_t S, const int64_t* step, float (&r)[K]) {
  const int64_t k = *step;
  const bool ok = k >= 0 && k < S;
#pragma unroll
  for (int j = 0; j < K; ++j) r[j] = ok ? __ldg(table + k * K + j) : quiet_nan();
  return k;
}

// ---- host side --------------------------------------------------------------------------------

inline int num_sms() {
  static int cache[kMaxDevices] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cache[dev] = n;
  }
  return cache[dev];
}

// Blocks for a grid-stride loop over `work` threads' worth of items: enough to fill the GPU, no more.
inline unsigned grid_size(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(num_sms()) * kBlocksPerSM;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Largest V in {4, 2, 1} with D % V == 0 and every (pointer, element size) aligned to V elements.
inline int pick_vec(int64_t D, std::initializer_list<std::pair<const void*, int>> arrays) {
  for (int v : {4, 2}) {
    if (D % v != 0) continue;
    bool ok = true;
    for (const auto& a : arrays) ok = ok && aligned_to(a.first, static_cast<int64_t>(v) * a.second);
    if (ok) return v;
  }
  return 1;
}

inline int net_bytes(NetType t) { return t == NetType::F32 ? 4 : 2; }

// Calls f(T{}) with the element type of a network output.
template <typename F>
void dispatch_net(NetType t, const F& f) {
  switch (t) {
    case NetType::F32:
      f(float{});
      break;
    case NetType::BF16:
      f(__nv_bfloat16{});
      break;
    case NetType::F16:
      f(__half{});
      break;
  }
}

// ---- the elementwise kernel -------------------------------------------------------------------
// Op provides `prepare()` (per-thread setup: read the step / seed / table row on the device) and
// `template <int V> apply(b, d)` for elements d .. d + V - 1 of row b.

template <int V, typename Index, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op, int64_t B, int64_t D) {
  op.prepare();
  const Index units_per_row = static_cast<Index>(D / V);
  const Index n = static_cast<Index>(B) * units_per_row;
  const Index stride = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  for (Index j = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const Index b = j / units_per_row;
    const Index d = (j - b * units_per_row) * V;
    op.template apply<V>(static_cast<int64_t>(b), static_cast<int64_t>(d));
  }
}

template <int V, typename Op>
void launch_elementwise_v(const Op& op, int64_t B, int64_t D, cudaStream_t stream) {
  const int64_t units = B * (D / V);
  const unsigned grid = grid_size(units);
  // 32-bit indices while every index the loop forms stays below 2^32.
  if (units + static_cast<int64_t>(grid) * kThreads < (int64_t(1) << 32)) {
    elementwise_kernel<V, uint32_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
  } else {
    elementwise_kernel<V, int64_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
  }
}

template <typename Op>
void launch_elementwise(const Op& op, int vec, int64_t B, int64_t D, cudaStream_t stream) {
  if (B <= 0 || D <= 0) return;
  switch (vec) {
    case 4:
      launch_elementwise_v<4>(op, B, D, stream);
      break;
    case 2:
      launch_elementwise_v<2>(op, B, D, stream);
      break;
    default:
      launch_elementwise_v<1>(op, B, D, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace cld
