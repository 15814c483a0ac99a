// Device helpers shared by the cld_fast CUDA kernel files (csrc/cuda/*.cu). Plain CUDA C++20: no
// torch headers, so every kernel file compiles with plain nvcc (.ci/compile_cuda.sh).
//
// Elementwise work is done in "units" of V consecutive elements of one sample's row (V = 4, 2 or
// 1): V > 1 when D % V == 0 and every array is aligned to V elements, so float32 data moves in
// 16-byte loads / stores (8 bytes for bf16 / fp16 network outputs). Indices are 64-bit (32-bit
// where the unit count allows it, which only saves division cost).
//
// Coefficients come from cld_coefficients.h in double on the device, never once per element:
//   row_kernel   (per-sample coefficients) a block takes a tile of kThreads units, its first threads
//                compute the coefficients of the (few) rows the tile spans into shared memory while
//                every thread's loads (and Philox draws) are in flight, then all finish their units;
//   step_kernel  (per-step coefficients) one thread per independent part (e.g. the SSCS score step
//                and its two half steps, in different warps so they run concurrently) computes them
//                into shared memory once per block; a grid-stride loop then applies them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "cld_coefficients.h"
#include "cld_cuda_launch.h"
#include "cld_philox.h"

namespace cld {
namespace cuda {

constexpr int kThreads = 256;        // threads per block of every kernel here
constexpr int kBlocksPerSM = 8;      // 2048 resident threads per SM on sm_80 / sm_90
constexpr int kMaxDevices = 64;
// Resident blocks per SM the kernels that compute double-precision coefficients are built for
// (at most 85 registers a thread). Without it ptxas squeezes some of them into 64 registers and
// spills; with 4 (64 registers) they spill too.
constexpr int kMinBlocks = 3;

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

// The classifier-free combination y + w (y - yu) of V network outputs at y + off, yu + off as float
// (opdefs ``guided_output``).
template <int V, typename Y>
__device__ __forceinline__ void load_guided(const Y* y, const Y* yu, float w, int64_t off, float (&out)[V]) {
  float g[V];
  load<V>(y + off, out);
  load<V>(yu + off, g);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = out[k] + w * (out[k] - g[k]);
}

// The network output of V elements at y + off as float: y, or with yu (not nullptr) the guided one.
template <int V, typename Y>
__device__ __forceinline__ void load_net(const Y* y, const Y* yu, float w, int64_t off, float (&out)[V]) {
  if (yu != nullptr) {
    load_guided<V>(y, yu, w, off, out);
  } else {
    load<V>(y + off, out);
  }
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

__device__ __forceinline__ int64_t read_seed(const NoiseArg& n) {
  return n.eps == nullptr && n.seed != nullptr ? *n.seed : 0;
}

// ---- coefficients on the device ---------------------------------------------------------------

__device__ __forceinline__ Params load_params(const double* sde) {
  double p[kNumParams];
#pragma unroll
  for (int i = 0; i < kNumParams; ++i) p[i] = __ldg(sde + i);
  return params_from(p);
}

// t[i] as double (float32 times are widened, as the references' .to(float64)).
__device__ __forceinline__ double time_at(const TimeArg& t, int64_t i) {
  const int64_t off = i * t.stride;
  return t.is_double ? __ldg(static_cast<const double*>(t.data) + off)
                     : static_cast<double>(__ldg(static_cast<const float*>(t.data) + off));
}

// The step index of a sampler call, and whether it lies in the grid ts. Out-of-range steps are not
// an error on the device (that would need a host synchronisation): they read clamped grid points
// and poison the coefficients with NaN.
struct StepIndex {
  int64_t k;
  bool valid;
};

__device__ __forceinline__ StepIndex read_step(const int64_t* step, const TimeArg& ts, bool reads_next) {
  const int64_t k = *step;
  return StepIndex{k, step_in_range(k, ts.size, reads_next)};
}

// ts[i] with i clamped into the grid.
__device__ __forceinline__ double grid_at(const TimeArg& ts, int64_t i) { return time_at(ts, clamp_index(i, ts.size)); }

template <int K>
__device__ __forceinline__ void store_coefficients(float* c, const double (&v)[K], bool valid) {
#pragma unroll
  for (int j = 0; j < K; ++j) c[j] = valid ? static_cast<float>(v[j]) : quiet_nan();
}

__device__ __forceinline__ void store_half_step(float* c, const HalfStep& h, bool valid) {
  const double v[7] = {h.a_xx, h.a_xv, h.a_vx, h.a_vv, h.l11, h.l21, h.l22};
  store_coefficients<7>(c, v, valid);
}

// ---- the inpainting replacement (ObsArg) ---------------------------------------------------------

// Coefficients of the replacement in an op's table: a_xx a_vx l11 l21 l22 of the HSM kernel at t_r,
// then 1 for the exact rule (x = x_obs, a denoising step) or 0.
constexpr int kObsCoefs = 6;

__device__ __forceinline__ void store_replacement(float* c, const double* sde, double t_r, bool exact, bool valid) {
  const Replacement r = replacement_coefficients(load_params(sde), t_r);
  const double v[5] = {r.a_xx, r.a_vx, r.l11, r.l21, r.l22};
  store_coefficients<5>(c, v, valid);
  c[5] = exact ? 1.f : 0.f;
}

__device__ __forceinline__ int64_t read_obs_seed(const ObsArg& o) {
  return o.p != nullptr && o.seed != nullptr ? *o.seed : 0;
}

// Elements d .. d + V - 1 of row b after the op's update: observed ones (mask != 0) become
// A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v) with c = the kObsCoefs coefficients (or x = x_obs, exact);
// Philox normals (z0, z1) (pair 0) or (z2, z3) (pair 1) of tag kTagInpaint at `step`.
template <int V>
__device__ __forceinline__ void replace_obs(const ObsArg& o, const float* c, int64_t seed, int64_t b, int64_t d,
                                            int64_t D, int64_t step, int pair, float (&x)[V], float (&v)[V]) {
  if (o.p == nullptr) return;
  const float* row = o.p + b * o.channels * D;
  float xo[V], m[V];
  load<V>(row + d, xo);
  load<V>(row + D + d, m);
  if (c[5] != 0.f) {
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = m[k] != 0.f ? xo[k] : x[k];
    return;
  }
  float zx[V], zv[V];
  const bool noisy = o.channels == 4 || o.seed != nullptr;
  if (o.channels == 4) {
    load<V>(row + 2 * D + d, zx);
    load<V>(row + 3 * D + d, zv);
  } else if (o.seed != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (pair == 0) {
        normals2(seed, b * D + d + k, step, kTagInpaint, zx[k], zv[k]);
      } else {
        float z[4];
        normals4(seed, b * D + d + k, step, kTagInpaint, z);
        zx[k] = z[2];
        zv[k] = z[3];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float rx = c[0] * xo[k], rv = c[1] * xo[k];
    if (noisy) {
      rx = rx + c[2] * zx[k];
      rv = rv + c[3] * zx[k] + c[4] * zv[k];
    }
    x[k] = m[k] != 0.f ? rx : x[k];
    v[k] = m[k] != 0.f ? rv : v[k];
  }
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

// Calls f(std::integral_constant<int, V>{}) for V in {4, 2, 1}.
template <typename F>
void dispatch_vec(int vec, const F& f) {
  switch (vec) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    default:
      f(std::integral_constant<int, 1>{});
      break;
  }
}

// Whether a loop over `units` work items with `grid` blocks keeps every index it forms below 2^32.
inline bool fits_u32(int64_t units, unsigned grid) {
  return units + static_cast<int64_t>(grid) * kThreads < (int64_t(1) << 32);
}

// ---- per-sample coefficients: the tiled row kernel ----------------------------------------------
// Op provides
//   static constexpr int K                          floats of coefficients per row
//   template <int V> struct In                      what a thread loads for one unit
//   prepare()                                       per-thread setup (e.g. read the seed)
//   row(b, c)                                       the K coefficients of row b into c (double math)
//   template <int V> load(b, d, in)                 loads (and noise draws) of elements d .. d + V - 1
//   template <int V> finish(b, d, in, c)            compute and store them with row b's coefficients c

template <int V, typename Index, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks) row_kernel(Op op, int64_t B, int64_t D) {
  __shared__ float coef[kThreads * Op::K];
  op.prepare();
  const Index units_per_row = static_cast<Index>(D / V);
  const Index n = static_cast<Index>(B) * units_per_row;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  // `tile` is uniform over the block, so every thread reaches both barriers of every iteration.
  for (Index tile = static_cast<Index>(blockIdx.x) * kThreads; tile < n; tile += stride) {
    const Index j = tile + threadIdx.x;
    const bool active = j < n;
    const Index b = (active ? j : tile) / units_per_row;
    const Index d = (j - b * units_per_row) * V;
    typename Op::template In<V> in;
    if (active) op.template load<V>(b, d, in);
    const Index b0 = tile / units_per_row;
    const Index last = (n - tile > kThreads ? tile + kThreads : n) - 1;
    if (threadIdx.x <= last / units_per_row - b0) op.row(b0 + threadIdx.x, coef + threadIdx.x * Op::K);
    __syncthreads();
    if (active) op.template finish<V>(b, d, in, coef + (b - b0) * Op::K);
    __syncthreads();  // the next tile rewrites coef
  }
}

template <typename Op>
void launch_rows(const Op& op, int vec, int64_t B, int64_t D, cudaStream_t stream) {
  if (B <= 0 || D <= 0) return;
  dispatch_vec(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t units = B * (D / V);
    const unsigned grid = grid_size(units);
    if (fits_u32(units, grid)) {
      row_kernel<V, uint32_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
    } else {
      row_kernel<V, int64_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
    }
  });
}

// ---- per-step coefficients: the step kernel ---------------------------------------------------
// Op provides
//   static constexpr int K, kParts                  coefficients (float, or Op::Coef), independent parts
//   part(i, c)                                      part i of the coefficients into c (double math;
//                                                   run by lane 0 of warp i, so parts overlap)
//   prepare(c)                                      per-thread setup from the coefficients c
//   template <int V> apply(b, d)                    elements d .. d + V - 1 of row b

// The coefficients' type: Op::Coef when the op declares one (double for float64 arithmetic), else float.
template <typename Op, typename = void>
struct CoefType {
  using type = float;
};
template <typename Op>
struct CoefType<Op, std::void_t<typename Op::Coef>> {
  using type = typename Op::Coef;
};

template <int V, typename Index, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks) step_kernel(Op op, int64_t B, int64_t D) {
  static_assert(Op::kParts <= kThreads / 32, "one warp per coefficient part");
  __shared__ typename CoefType<Op>::type coef[Op::K];
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0 && warp < Op::kParts) op.part(warp, coef);
  __syncthreads();
  op.prepare(coef);
  const Index units_per_row = static_cast<Index>(D / V);
  const Index n = static_cast<Index>(B) * units_per_row;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index j = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; j < n; j += stride) {
    const Index b = j / units_per_row;
    const Index d = (j - b * units_per_row) * V;
    op.template apply<V>(static_cast<int64_t>(b), static_cast<int64_t>(d));
  }
}

template <typename Op>
void launch_steps(const Op& op, int vec, int64_t B, int64_t D, cudaStream_t stream) {
  if (B <= 0 || D <= 0) return;
  dispatch_vec(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t units = B * (D / V);
    const unsigned grid = grid_size(units);
    if (fits_u32(units, grid)) {
      step_kernel<V, uint32_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
    } else {
      step_kernel<V, int64_t, Op><<<grid, kThreads, 0, stream>>>(op, B, D);
    }
  });
}

}  // namespace cuda
}  // namespace cld
