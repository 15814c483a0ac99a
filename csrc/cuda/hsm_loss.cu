// CUDA kernels of cld_fast::hsm_loss_fwd and cld_fast::hsm_loss_bwd.
//
// With r = a out + c v - eps_v, where (c, w, a) = cld::loss_coefficients(t_b, weighting, objective,
// output) are computed per sample on
// the device (cld_coefficients.h) and eps_v is given or regenerated in-kernel as z1 of the perturb
// draw (Philox tag kTagPerturb, step 0), and ws_b = float(w_b) * float(scale):
//   forward  ws_b sum_d r^2 per sample (reduction 0, (B,)) or summed over samples (reduction 1, 0-d)
//   backward 2 (ws_b grad_b) a_b r_bd   (B, D) in out's dtype
// float32 accumulation inside a sample, double across chunks and samples; deterministic (no atomics;
// the chunking depends on (B, D) only).
//
// Forward, by row length:
//   D <= kRowsMaxD   a group of G lanes of one warp (G a power of two <= 32) per sample, a shuffle
//                    reduction inside the group; the group's first lane writes ws_b * sum to the
//                    output (reduction 0) or to the workspace (reduction 1), each lane having
//                    computed its sample's coefficients once.
//   larger D         a 2-D grid of (chunk of kLossChunk elements, sample) blocks, each reducing its
//                    chunk into workspace[b, chunk] (scaled by ws_b, computed once per block).
// Then, where a workspace was used, one more small kernel: per-sample sums over the chunks
// (reduction 0) or one block summing everything in a fixed order (reduction 1).
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

constexpr int64_t kRowsMaxD = 1024;
constexpr int64_t kLossChunk = 2048;  // a multiple of 4 (the vector width)
constexpr int kWarps = kThreads / 32;

int64_t chunks_for(int64_t D, int reduction) {
  if (D <= kRowsMaxD) return reduction == 1 ? 1 : 0;
  return (D + kLossChunk - 1) / kLossChunk;
}

template <typename O>
struct LossArgs {
  const O* out;    // (B, D)
  const float* u;  // (B, 2, D)
  TimeArg t;
  const double* sde;
  int weighting, objective, output;
  float scale;
  NoiseArg eps_v;  // eps (B, D), else the seed
  int64_t D;

  // (c, ws, a) of sample b as float: the reference casts (c, w, a) to the state dtype, then scales w.
  __device__ __forceinline__ void coefficients(int64_t b, float& c, float& ws, float& a) const {
    const LossCoefficients k = loss_coefficients(load_params(sde), time_at(t, b), weighting, objective, output);
    c = static_cast<float>(k.c);
    ws = static_cast<float>(k.w) * scale;
    a = static_cast<float>(k.a);
  }

  template <int V>
  __device__ __forceinline__ void noise(int64_t seed, int64_t b, int64_t d, float (&e)[V]) const {
    if (eps_v.eps != nullptr) {
      load<V>(eps_v.eps + b * D + d, e);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float z0;
        normals2(seed, b * D + d + k, 0, kTagPerturb, z0, e[k]);
      }
    }
  }

  // r for elements d .. d + V - 1 of row b.
  template <int V>
  __device__ __forceinline__ void residual(int64_t seed, int64_t b, int64_t d, float c, float a,
                                           float (&r)[V]) const {
    float o[V], v[V], e[V];
    load<V>(out + b * D + d, o);
    load<V>(u + b * 2 * D + D + d, v);
    noise<V>(seed, b, d, e);
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = a * o[k] + c * v[k] - e[k];
  }
};

template <int V, typename O>
__global__ void __launch_bounds__(kThreads, kMinBlocks) loss_rows_kernel(LossArgs<O> a, float* dst, int64_t B, int G) {
  const int64_t seed = read_seed(a.eps_v);
  const int lane = threadIdx.x & 31;
  const int sub = lane & (G - 1);
  const int rows_per_warp = 32 / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t units = a.D / V;
  // row0 is the same for the whole warp, so every lane takes part in every shuffle.
  for (int64_t row0 = warp * rows_per_warp; row0 < B; row0 += nwarps * rows_per_warp) {
    const int64_t b = row0 + lane / G;
    float acc = 0.f, ws = 0.f;
    if (b < B) {
      float c, aa;
      a.coefficients(b, c, ws, aa);
      for (int64_t j = sub; j < units; j += G) {
        float r[V];
        a.template residual<V>(seed, b, j * V, c, aa, r);
#pragma unroll
        for (int k = 0; k < V; ++k) acc += r[k] * r[k];
      }
    }
    for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (b < B && sub == 0) dst[b] = ws * acc;
  }
}

// Sum of `x` over the block, valid in thread 0; `scratch` holds kWarps values and may be reused
// right after the call returns.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = 0;
  if (warp == 0) {
    total = lane < kWarps ? scratch[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  }
  __syncthreads();
  return total;
}

template <int V, typename O>
__global__ void __launch_bounds__(kThreads, kMinBlocks) loss_chunks_kernel(LossArgs<O> a, float* partials, int64_t chunks,
                                                               int64_t B) {
  __shared__ float scratch[kWarps];
  __shared__ float coef[3];
  const int64_t seed = read_seed(a.eps_v);
  const int64_t chunk = blockIdx.x;
  const int64_t d_begin = chunk * kLossChunk;
  const int64_t d_end = d_begin + kLossChunk < a.D ? d_begin + kLossChunk : a.D;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (threadIdx.x == 0) a.coefficients(b, coef[0], coef[1], coef[2]);
    __syncthreads();
    const float c = coef[0], ws = coef[1], aa = coef[2];
    float acc = 0.f;
    for (int64_t d = d_begin + static_cast<int64_t>(threadIdx.x) * V; d < d_end; d += kThreads * V) {
      float r[V];
      a.template residual<V>(seed, b, d, c, aa, r);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += r[k] * r[k];
    }
    acc = block_sum(acc, scratch);  // its barriers also keep coef until every thread has read it
    if (threadIdx.x == 0) partials[b * chunks + chunk] = ws * acc;
  }
}

// reduction 0: loss[b] = sum_c partials[b, c]; reduction 1 (a single block): loss[0] = the sum of all.
__global__ void __launch_bounds__(kThreads) loss_finalize_kernel(const float* __restrict__ partials, int64_t chunks,
                                                                 float* __restrict__ loss, int64_t B, int reduction) {
  __shared__ double scratch[kWarps];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double total = 0.0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[b * chunks + c];
    if (reduction == 0) {
      loss[b] = static_cast<float>(s);
    } else {
      total += s;
    }
  }
  if (reduction == 1) {
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) loss[0] = static_cast<float>(total);
  }
}

template <typename O>
struct LossBwdOp {
  static constexpr int K = 3;  // c, 2 ws_b grad_b a_b, a_b

  LossArgs<O> a;
  const float* grad;  // (B,) or 0-d
  int64_t grad_stride;
  O* res;  // (B, D)
  int64_t seed;

  template <int V>
  struct In {
    float o[V], v[V], e[V];
  };

  __device__ __forceinline__ void prepare() { seed = read_seed(a.eps_v); }

  __device__ __forceinline__ void row(int64_t b, float* c) const {
    float ws;
    a.coefficients(b, c[0], ws, c[2]);
    c[1] = 2.f * (ws * __ldg(grad + b * grad_stride)) * c[2];
  }

  template <int V>
  __device__ __forceinline__ void load(int64_t b, int64_t d, In<V>& in) const {
    ::cld::cuda::load<V>(a.out + b * a.D + d, in.o);
    ::cld::cuda::load<V>(a.u + b * 2 * a.D + a.D + d, in.v);
    a.template noise<V>(seed, b, d, in.e);
  }

  template <int V>
  __device__ __forceinline__ void finish(int64_t b, int64_t d, const In<V>& in, const float* c) const {
    const float cc = c[0], factor = c[1], aa = c[2];
    float r[V];
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = factor * (aa * in.o[k] + cc * in.v[k] - in.e[k]);
    store<V>(res + b * a.D + d, r);
  }
};

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < 32) p <<= 1;
  return p;
}

}  // namespace

int64_t hsm_loss_fwd_workspace(int64_t B, int64_t D, int reduction) { return B * chunks_for(D, reduction); }

void launch_hsm_loss_fwd(const void* out, NetType out_type, const float* u, TimeArg t, const double* sde,
                         int weighting, int objective, int output, double scale, int reduction, NoiseArg eps_v,
                         float* loss, float* workspace, int64_t B, int64_t D, cudaStream_t stream) {
  if (B <= 0) {
    if (reduction == 1) cudaMemsetAsync(loss, 0, sizeof(float), stream);  // the sum over no samples
    return;
  }
  const int64_t chunks = chunks_for(D, reduction);
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {eps_v.eps, 4}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const LossArgs<O> a{static_cast<const O*>(out), u, t, sde, weighting, objective, output,
                        static_cast<float>(scale), eps_v, D};
    dispatch_vec(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (D <= kRowsMaxD) {
        const int G = next_pow2(std::max<int64_t>(1, D / V));
        const int64_t threads = (B + 32 / G - 1) / (32 / G) * 32;
        float* dst = chunks == 0 ? loss : workspace;
        loss_rows_kernel<V, O><<<grid_size(threads), kThreads, 0, stream>>>(a, dst, B, G);
      } else {
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
        loss_chunks_kernel<V, O><<<grid, kThreads, 0, stream>>>(a, workspace, chunks, B);
      }
    });
  });
  if (chunks > 0) {
    const unsigned grid = reduction == 1 ? 1u : grid_size(B);
    loss_finalize_kernel<<<grid, kThreads, 0, stream>>>(workspace, chunks, loss, B, reduction);
  }
}

void launch_hsm_loss_bwd(const float* grad, int64_t grad_stride, const void* out, NetType out_type, const float* u,
                         TimeArg t, const double* sde, int weighting, int objective, int output, double scale,
                         NoiseArg eps_v, void* res, int64_t B, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {eps_v.eps, 4}, {res, net_bytes(out_type)}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const LossArgs<O> a{static_cast<const O*>(out), u, t, sde, weighting, objective, output,
                        static_cast<float>(scale), eps_v, D};
    const LossBwdOp<O> op{a, grad, grad_stride, static_cast<O*>(res), 0};
    launch_rows(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
