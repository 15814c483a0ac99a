// CUDA kernel of cld_fast::perturb: u = A @ (x0, v0) + L @ eps, per-sample coefficients
// coef (B, 7) = a_xx a_xv a_vx a_vv l11 l21 l22 (cld_fast.sde.PERTURB_COLS), noise (z0, z1) of the
// Philox contract with tag 0, step 0 when drawn in-kernel.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

struct PerturbOp {
  const float* x0;
  const float* v0;    // nullptr: v0 = 0 (HSM)
  const float* coef;  // (B, 7)
  const float* eps;   // (B, 2, D) or nullptr
  const int64_t* seed_ptr;
  float* out;         // (B, 2, D)
  int64_t D;
  int64_t seed;

  __device__ __forceinline__ void prepare() { seed = seed_ptr != nullptr ? *seed_ptr : 0; }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    const float* c = coef + b * 7;
    const float axx = __ldg(c + 0), axv = __ldg(c + 1), avx = __ldg(c + 2), avv = __ldg(c + 3);
    const float l11 = __ldg(c + 4), l21 = __ldg(c + 5), l22 = __ldg(c + 6);
    const int64_t i = b * D + d;
    float x[V], mx[V], mv[V];
    load<V>(x0 + i, x);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mx[k] = axx * x[k];
      mv[k] = avx * x[k];
    }
    if (v0 != nullptr) {
      float v[V];
      load<V>(v0 + i, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mx[k] = mx[k] + axv * v[k];
        mv[k] = mv[k] + avv * v[k];
      }
    }
    if (eps != nullptr || seed_ptr != nullptr) {
      float ex[V], ev[V];
      noise_pair<V>(eps, seed, b, d, D, 0, kTagPerturb, ex, ev);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mx[k] = mx[k] + l11 * ex[k];
        mv[k] = mv[k] + l21 * ex[k] + l22 * ev[k];
      }
    }
    store<V>(out + b * 2 * D + d, mx);
    store<V>(out + b * 2 * D + D + d, mv);
  }
};

}  // namespace

void launch_perturb(const float* x0, const float* v0, const float* coef, const float* eps, const int64_t* seed,
                    float* out, int64_t B, int64_t D, cudaStream_t stream) {
  const PerturbOp op{x0, v0, coef, eps, seed, out, D, 0};
  const int vec = pick_vec(D, {{x0, 4}, {v0, 4}, {eps, 4}, {out, 4}});
  launch_elementwise(op, vec, B, D, stream);
}

}  // namespace cuda
}  // namespace cld
