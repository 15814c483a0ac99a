// CUDA kernels of the sampler steps: cld_fast::half_step_, cld_fast::sscs_step_ and
// cld_fast::affine_step. Each reads its coefficient row (cld_fast.sde HALF_COLS / SSCS_COLS /
// AFFINE_COLS) from a per-step table at the step index held in device memory, so a sampler loop
// launches one kernel per step with no host synchronisation and can be captured in a CUDA graph.
// In-kernel noise: half step tag 1 (z0, z1), SSCS tag 2 (z0..z3), affine tag 3 (z0), counter word
// c2 = the step value.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

// One analytic half step with r = (a_xx a_xv a_vx a_vv l11 l21 l22), optional noise (ex, ev).
template <bool NOISY>
__device__ __forceinline__ void linear_step(const float* r, float& x, float& v, float ex, float ev) {
  float nx = r[0] * x + r[1] * v;
  float nv = r[2] * x + r[3] * v;
  if (NOISY) {
    nx = nx + r[4] * ex;
    nv = nv + r[5] * ex + r[6] * ev;
  }
  x = nx;
  v = nv;
}

struct HalfStepOp {
  float* u;  // (B, 2, D), in place
  const float* table;
  int64_t S;
  const int64_t* step_ptr;
  const float* eps;  // (B, 2, D) or nullptr
  const int64_t* seed_ptr;
  int64_t D;
  float r[7];
  int64_t step, seed;

  __device__ __forceinline__ void prepare() {
    step = load_row<7>(table, S, step_ptr, r);
    seed = seed_ptr != nullptr ? *seed_ptr : 0;
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    if (eps != nullptr || seed_ptr != nullptr) {
      float ex[V], ev[V];
      noise_pair<V>(eps, seed, b, d, D, step, kTagHalfStep, ex, ev);
#pragma unroll
      for (int k = 0; k < V; ++k) linear_step<true>(r, x[k], v[k], ex[k], ev[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) linear_step<false>(r, x[k], v[k], 0.f, 0.f);
    }
    store<V>(px, x);
    store<V>(px + D, v);
  }
};

template <typename Y>
struct SscsStepOp {
  float* u;     // (B, 2, D), in place
  const Y* y;   // (B, D) network output
  const float* table;
  int64_t S;
  const int64_t* step_ptr;
  const float* eps;  // (B, 4, D) or nullptr
  const int64_t* seed_ptr;
  int64_t D;
  float r[16];
  int64_t step, seed;

  __device__ __forceinline__ void prepare() {
    step = load_row<16>(table, S, step_ptr, r);
    seed = seed_ptr != nullptr ? *seed_ptr : 0;
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    load<V>(y + b * D + d, yy);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = r[0] * v[k] + r[1] * yy[k];
    if (eps != nullptr) {
      float z[4][V];
#pragma unroll
      for (int j = 0; j < 4; ++j) load<V>(eps + (b * 4 + j) * D + d, z[j]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        linear_step<true>(r + 2, x[k], v[k], z[0][k], z[1][k]);
        linear_step<true>(r + 9, x[k], v[k], z[2][k], z[3][k]);
      }
    } else if (seed_ptr != nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float z[4];
        normals4(seed, b * D + d + k, step, kTagSscs, z);
        linear_step<true>(r + 2, x[k], v[k], z[0], z[1]);
        linear_step<true>(r + 9, x[k], v[k], z[2], z[3]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        linear_step<false>(r + 2, x[k], v[k], 0.f, 0.f);
        linear_step<false>(r + 9, x[k], v[k], 0.f, 0.f);
      }
    }
    store<V>(px, x);
    store<V>(px + D, v);
  }
};

template <typename Y>
struct AffineStepOp {
  const float* u;  // (B, 2, D); may be `out` itself: each thread reads its elements before writing them
  const Y* y;      // (B, D)
  const float* table;
  int64_t S;
  const int64_t* step_ptr;
  const float* eps;  // (B, D) or nullptr
  const int64_t* seed_ptr;
  float* out;        // (B, 2, D)
  int64_t D;
  float r[6];
  int64_t step, seed;

  __device__ __forceinline__ void prepare() {
    step = load_row<6>(table, S, step_ptr, r);
    seed = seed_ptr != nullptr ? *seed_ptr : 0;
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V], nx[V], nv[V];
    const int64_t o = b * 2 * D + d;
    load<V>(u + o, x);
    load<V>(u + o + D, v);
    load<V>(y + b * D + d, yy);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      nx[k] = r[0] * x[k] + r[1] * v[k];
      nv[k] = r[2] * x[k] + r[3] * v[k] + r[4] * yy[k];
    }
    if (eps != nullptr) {
      float e[V];
      load<V>(eps + b * D + d, e);
#pragma unroll
      for (int k = 0; k < V; ++k) nv[k] = nv[k] + r[5] * e[k];
    } else if (seed_ptr != nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) nv[k] = nv[k] + r[5] * normal_z0(seed, b * D + d + k, step, kTagAffine);
    }
    store<V>(out + o, nx);
    store<V>(out + o + D, nv);
  }
};

}  // namespace

void launch_half_step(float* u, const float* table, int64_t S, const int64_t* step, const float* eps,
                      const int64_t* seed, int64_t B, int64_t D, cudaStream_t stream) {
  const HalfStepOp op{u, table, S, step, eps, seed, D, {}, 0, 0};
  launch_elementwise(op, pick_vec(D, {{u, 4}, {eps, 4}}), B, D, stream);
}

void launch_sscs_step(float* u, const void* y, NetType y_type, const float* table, int64_t S, const int64_t* step,
                      const float* eps, const int64_t* seed, int64_t B, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec(D, {{u, 4}, {y, net_bytes(y_type)}, {eps, 4}});
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    const SscsStepOp<Y> op{u, static_cast<const Y*>(y), table, S, step, eps, seed, D, {}, 0, 0};
    launch_elementwise(op, vec, B, D, stream);
  });
}

void launch_affine_step(const float* u, const void* y, NetType y_type, const float* table, int64_t S,
                        const int64_t* step, const float* eps, const int64_t* seed, float* out, int64_t B, int64_t D,
                        cudaStream_t stream) {
  const int vec = pick_vec(D, {{u, 4}, {y, net_bytes(y_type)}, {eps, 4}, {out, 4}});
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    const AffineStepOp<Y> op{u, static_cast<const Y*>(y), table, S, step, eps, seed, out, D, {}, 0, 0};
    launch_elementwise(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
