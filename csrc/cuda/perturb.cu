// CUDA kernel of cld_fast::perturb: out = A(t) (x0, v0) + L(t) (z0, z1), with A and the Cholesky
// factor L of the perturbation covariance computed per sample on the device (cld_coefficients.h);
// noise from eps (B, 2, D) or (z0, z1) of the Philox contract with tag kTagPerturb, step 0.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

struct PerturbOp {
  static constexpr int K = 7;  // a_xx a_xv a_vx a_vv l11 l21 l22

  const float* x0;
  const float* v0;  // nullptr: v0 = 0 (HSM)
  TimeArg t;
  const double* sde;
  int objective;
  NoiseArg noise;
  float* out;  // (B, 2, D)
  int64_t D;
  int64_t seed;

  template <int V>
  struct In {
    float mx[V], mv[V];  // the loaded x0 (and v0) until finish() turns them into the mean
    float ex[V], ev[V];
  };

  __device__ __forceinline__ void prepare() { seed = read_seed(noise); }

  __device__ __forceinline__ bool noisy() const { return noise.eps != nullptr || noise.seed != nullptr; }

  __device__ __forceinline__ void row(int64_t b, float* c) const {
    const PerturbCoefficients k = perturb_coefficients(load_params(sde), time_at(t, b), objective);
    const double v[K] = {k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.l11, k.l21, k.l22};
    store_coefficients<K>(c, v, true);
  }

  template <int V>
  __device__ __forceinline__ void load(int64_t b, int64_t d, In<V>& in) const {
    const int64_t i = b * D + d;
    ::cld::cuda::load<V>(x0 + i, in.mx);
    if (v0 != nullptr) ::cld::cuda::load<V>(v0 + i, in.mv);
    if (noisy()) noise_pair<V>(noise.eps, seed, b, d, D, 0, kTagPerturb, in.ex, in.ev);
  }

  template <int V>
  __device__ __forceinline__ void finish(int64_t b, int64_t d, const In<V>& in, const float* c) const {
    const float axx = c[0], axv = c[1], avx = c[2], avv = c[3], l11 = c[4], l21 = c[5], l22 = c[6];
    float mx[V], mv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mx[k] = axx * in.mx[k];
      mv[k] = avx * in.mx[k];
    }
    if (v0 != nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mx[k] = mx[k] + axv * in.mv[k];
        mv[k] = mv[k] + avv * in.mv[k];
      }
    }
    if (noisy()) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mx[k] = mx[k] + l11 * in.ex[k];
        mv[k] = mv[k] + l21 * in.ex[k] + l22 * in.ev[k];
      }
    }
    store<V>(out + b * 2 * D + d, mx);
    store<V>(out + b * 2 * D + D + d, mv);
  }
};

}  // namespace

void launch_perturb(const float* x0, const float* v0, TimeArg t, const double* sde, int objective, NoiseArg noise,
                    float* out, int64_t B, int64_t D, cudaStream_t stream) {
  const PerturbOp op{x0, v0, t, sde, objective, noise, out, D, 0};
  const int vec = pick_vec(D, {{x0, 4}, {v0, 4}, {noise.eps, 4}, {out, 4}});
  launch_rows(op, vec, B, D, stream);
}

}  // namespace cuda
}  // namespace cld
