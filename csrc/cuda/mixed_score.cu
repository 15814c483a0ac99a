// CUDA kernel of cld_fast::mixed_score: score = c0 v + c1 out with per-sample coef (B, 2) =
// (-1 / s_vv, -1 / l22) (cld_fast.sde.MIXED_COLS); out in float32 / bfloat16 / float16, score float32.
#include "cld_cuda_common.cuh"

namespace cld {
namespace cuda {
namespace {

template <typename O>
struct MixedScoreOp {
  const O* out;       // (B, D)
  const float* u;     // (B, 2, D)
  const float* coef;  // (B, 2)
  float* res;         // (B, D)
  int64_t D;

  __device__ __forceinline__ void prepare() {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    const float c0 = __ldg(coef + 2 * b), c1 = __ldg(coef + 2 * b + 1);
    float o[V], v[V];
    load<V>(out + b * D + d, o);
    load<V>(u + b * 2 * D + D + d, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = c0 * v[k] + c1 * o[k];
    store<V>(res + b * D + d, v);
  }
};

}  // namespace

void launch_mixed_score(const void* out, NetType out_type, const float* u, const float* coef, float* res, int64_t B,
                        int64_t D, cudaStream_t stream) {
  const int vec = pick_vec(D, {{out, net_bytes(out_type)}, {u, 4}, {res, 4}});
  dispatch_net(out_type, [&](auto tag) {
    using O = decltype(tag);
    const MixedScoreOp<O> op{static_cast<const O*>(out), u, coef, res, D};
    launch_elementwise(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
