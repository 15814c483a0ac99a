// CUDA kernels of cld_fast::hsm_loss_fwd and cld_fast::hsm_loss_bwd.
//
// With r = out + c v - eps_v (per-sample coef (B, 2) = (c, w), cld_fast.sde.LOSS_COLS; eps_v given, or
// regenerated in-kernel as z1 of the perturb draw: Philox tag 0, step 0):
//   forward  loss_b = w_b sum_d r^2       (B,) float32, fp32 accumulation, deterministic (no atomics)
//   backward g_bd = 2 w_b grad_b r_bd     (B, D) in out's dtype
//
// Forward reduction, by row length:
//   D <= kRowsMaxD   one kernel; a group of G lanes of one warp (G a power of two <= 32) per sample,
//                    a shuffle reduction inside the group, the group's first lane writes loss_b.
//   larger D         a 2-D grid of (chunk of kLossChunk elements, sample) blocks, each reducing its
//                    chunk (warp shuffles, then shared memory) into partials[b, chunk]; then a tiny
//                    kernel sums each sample's partials in chunk order and scales by w_b.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

constexpr int64_t kRowsMaxD = 1024;
constexpr int64_t kLossChunk = 2048;  // a multiple of 4 (the vector width)
constexpr int kWarps = kThreads / 32;

template <typename O>
struct LossArgs {
  const O* out;        // (B, D)
  const float* u;      // (B, 2, D)
  const float* coef;   // (B, 2)
  const float* eps_v;  // (B, D) or nullptr: regenerate from the seed
  const int64_t* seed_ptr;
  int64_t D;

  __device__ __forceinline__ int64_t seed() const { return eps_v == nullptr ? *seed_ptr : 0; }

  // r for elements d .. d + V - 1 of row b.
  template <int V>
  __device__ __forceinline__ void residual(int64_t seed, int64_t b, int64_t d, float c, float (&r)[V]) const {
    float o[V], v[V], e[V];
    load<V>(out + b * D + d, o);
    load<V>(u + b * 2 * D + D + d, v);
    if (eps_v != nullptr) {
      load<V>(eps_v + b * D + d, e);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float z0;
        normals2(seed, b * D + d + k, 0, kTagPerturb, z0, e[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = o[k] + c * v[k] - e[k];
  }
};

template <int V, typename O>
__global__ void __launch_bounds__(kThreads) loss_rows_kernel(LossArgs<O> a, float* loss, int64_t B, int G) {
  const int64_t seed = a.seed();
  const int lane = threadIdx.x & 31;
  const int sub = lane & (G - 1);
  const int rows_per_warp = 32 / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t units = a.D / V;
  // row0 is the same for the whole warp, so every lane takes part in every shuffle.
  for (int64_t row0 = warp * rows_per_warp; row0 < B; row0 += nwarps * rows_per_warp) {
    const int64_t b = row0 + lane / G;
    float acc = 0.f;
    if (b < B) {
      const float c = __ldg(a.coef + 2 * b);
      for (int64_t j = sub; j < units; j += G) {
        float r[V];
        a.template residual<V>(seed, b, j * V, c, r);
#pragma unroll
        for (int k = 0; k < V; ++k) acc += r[k] * r[k];
      }
    }
    for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (b < B && sub == 0) loss[b] = __ldg(a.coef + 2 * b + 1) * acc;
  }
}

// Sum of `x` over the block, valid in thread 0; `scratch` holds kWarps floats and may be reused
// right after the call returns.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < kWarps ? scratch[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  __syncthreads();
  return total;
}

template <int V, typename O>
__global__ void __launch_bounds__(kThreads) loss_chunks_kernel(LossArgs<O> a, float* partials, int64_t chunks,
                                                               int64_t B) {
  __shared__ float scratch[kWarps];
  const int64_t seed = a.seed();
  const int64_t chunk = blockIdx.x;
  const int64_t d_begin = chunk * kLossChunk;
  const int64_t d_end = d_begin + kLossChunk < a.D ? d_begin + kLossChunk : a.D;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float c = __ldg(a.coef + 2 * b);
    float acc = 0.f;
    for (int64_t d = d_begin + static_cast<int64_t>(threadIdx.x) * V; d < d_end; d += kThreads * V) {
      float r[V];
      a.template residual<V>(seed, b, d, c, r);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += r[k] * r[k];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[b * chunks + chunk] = acc;
  }
}

__global__ void __launch_bounds__(kThreads) loss_finalize_kernel(const float* __restrict__ partials,
                                                                 const float* __restrict__ coef,
                                                                 float* __restrict__ loss, int64_t chunks,
                                                                 int64_t B) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += partials[b * chunks + c];
    loss[b] = __ldg(coef + 2 * b + 1) * s;
  }
}

template <typename O>
struct LossBwdOp {
  LossArgs<O> a;
  const float* grad;  // (B,)
  O* res;             // (B, D)
  int64_t seed;

  __device__ __forceinline__ void prepare() { seed = a.seed(); }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    const float c = __ldg(a.coef + 2 * b);
    const float scale = 2.f * (__ldg(a.coef + 2 * b + 1) * __ldg(grad + b));
    float r[V];
    a.template residual<V>(seed, b, d, c, r);
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = scale * r[k];
    store<V>(res + b * a.D + d, r);
  }
};

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < 32) p <<= 1;
  return p;
}

}  // namespace

int64_t hsm_loss_fwd_chunks(int64_t B, int64_t D) {
  (void)B;
  return D <= kRowsMaxD ? 0 : (D + kLossChunk - 1) / kLossChunk;
}

void launch_hsm_loss_fwd(const void* out, NetType out_type, const float* u, const float* coef, const float* eps_v,
                         const int64_t* seed, float* loss, float* partials, int64_t chunks, int64_t B, int64_t D,
                         cudaStream_t stream) {
  if (B <= 0) return;
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {eps_v, 4}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const LossArgs<O> a{static_cast<const O*>(out), u, coef, eps_v, seed, D};
    if (chunks == 0) {
      const int G = next_pow2(std::max<int64_t>(1, D / vec));
      const int64_t threads = (B + 32 / G - 1) / (32 / G) * 32;
      const unsigned grid = grid_size(threads);
      switch (vec) {
        case 4: loss_rows_kernel<4, O><<<grid, kThreads, 0, stream>>>(a, loss, B, G); break;
        case 2: loss_rows_kernel<2, O><<<grid, kThreads, 0, stream>>>(a, loss, B, G); break;
        default: loss_rows_kernel<1, O><<<grid, kThreads, 0, stream>>>(a, loss, B, G); break;
      }
    } else {
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
      switch (vec) {
        case 4: loss_chunks_kernel<4, O><<<grid, kThreads, 0, stream>>>(a, partials, chunks, B); break;
        case 2: loss_chunks_kernel<2, O><<<grid, kThreads, 0, stream>>>(a, partials, chunks, B); break;
        default: loss_chunks_kernel<1, O><<<grid, kThreads, 0, stream>>>(a, partials, chunks, B); break;
      }
    }
  });
}

void launch_hsm_loss_fwd_finalize(const float* partials, const float* coef, float* loss, int64_t chunks, int64_t B,
                                  cudaStream_t stream) {
  if (B <= 0) return;
  loss_finalize_kernel<<<grid_size(B), kThreads, 0, stream>>>(partials, coef, loss, chunks, B);
}

void launch_hsm_loss_bwd(const float* grad, const void* out, NetType out_type, const float* u, const float* coef,
                         const float* eps_v, const int64_t* seed, void* res, int64_t B, int64_t D,
                         cudaStream_t stream) {
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {eps_v, 4}, {res, net_bytes(out_type)}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const LossBwdOp<O> op{{static_cast<const O*>(out), u, coef, eps_v, seed, D}, grad, static_cast<O*>(res), 0};
    launch_elementwise(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
