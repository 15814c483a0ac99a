// CUDA kernel of cld_fast::mixed_score: score = c0 v + c1 out with (c0, c1) =
// cld::score_coefficients(t_b, objective, output) (default: (-1 / s_vv, -1 / l22) of the HSM
// perturbation kernel), computed per sample on the device (cld_coefficients.h);
// out in float32 / bfloat16 / float16, score float32.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

template <typename O>
struct MixedScoreOp {
  static constexpr int K = 2;  // c0, c1

  const O* out;    // (B, D)
  const float* u;  // (B, 2, D)
  TimeArg t;
  const double* sde;
  int objective, output;
  float* res;  // (B, D)
  int64_t D;

  template <int V>
  struct In {
    float o[V], v[V];
  };

  __device__ __forceinline__ void prepare() {}

  __device__ __forceinline__ void row(int64_t b, float* c) const {
    const MixedCoefficients m = score_coefficients(load_params(sde), time_at(t, b), objective, output);
    c[0] = static_cast<float>(m.c0);
    c[1] = static_cast<float>(m.c1);
  }

  template <int V>
  __device__ __forceinline__ void load(int64_t b, int64_t d, In<V>& in) const {
    ::cld::cuda::load<V>(out + b * D + d, in.o);
    ::cld::cuda::load<V>(u + b * 2 * D + D + d, in.v);
  }

  template <int V>
  __device__ __forceinline__ void finish(int64_t b, int64_t d, const In<V>& in, const float* c) const {
    const float c0 = c[0], c1 = c[1];
    float s[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = c0 * in.v[k] + c1 * in.o[k];
    store<V>(res + b * D + d, s);
  }
};

}  // namespace

void launch_mixed_score(const void* out, NetType out_type, const float* u, TimeArg t, const double* sde,
                        int objective, int output, float* res, int64_t B, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {res, 4}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const MixedScoreOp<O> op{static_cast<const O*>(out), u, t, sde, objective, output, res, D};
    launch_rows(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
