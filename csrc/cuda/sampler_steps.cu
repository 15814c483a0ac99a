// CUDA kernels of the sampler steps: cld_fast::half_step_, cld_fast::sscs_step_ and
// cld_fast::affine_step. Each reads the step index, the grid points ts[step], ts[step + 1] (and
// ts[step + 2] for SSCS) and the CLD parameters on the device and computes its step's coefficients
// there (cld_coefficients.h, once per block), so a sampler loop launches one kernel per step with no
// host synchronisation and no step table, and can be captured in a CUDA graph. A step outside the
// grid gives NaN outputs. In-kernel noise: half step tag kTagHalfStep (z0, z1), SSCS kTagSscs
// (z0..z3), affine kTagAffine (z0, kind em only); counter word c2 = the step. With an inpainting
// condition (ObsArg) the observed elements of the result are replaced (replace_obs) in the same pass;
// with y_uncond (classifier-free guidance) the SSCS and affine steps read y + w (y - y_uncond) (load_net).
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

// What every step op reads on the device besides its data.
struct StepArgs {
  TimeArg ts;
  const int64_t* step;
  const double* sde;
  NoiseArg noise;

  __device__ __forceinline__ bool noisy() const { return noise.eps != nullptr || noise.seed != nullptr; }
};

struct HalfStepOp {
  static constexpr int K = 7 + kObsCoefs;
  static constexpr int kParts = 2;  // the half step, the replacement

  float* u;  // (B, 2, D), in place; eps (B, 2, D)
  StepArgs s;
  ObsArg obs;
  int64_t D;
  float r[K];
  int64_t step, seed, obs_seed;

  __device__ __forceinline__ void part(int i, float* c) const {
    const StepIndex k = read_step(s.step, s.ts, /*reads_next=*/true);
    const double t0 = grid_at(s.ts, k.k), t1 = grid_at(s.ts, k.k + 1);
    if (i == 0) {
      store_half_step(c, half_step_coefficients(load_params(s.sde), t0, t0 - t1), k.valid);
    } else if (obs.p != nullptr) {
      store_replacement(c + 7, s.sde, t1, false, k.valid);
    }
  }

  __device__ __forceinline__ void prepare(const float* c) {
#pragma unroll
    for (int j = 0; j < K; ++j) r[j] = c[j];
    step = *s.step;
    seed = read_seed(s.noise);
    obs_seed = read_obs_seed(obs);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    if (s.noisy()) {
      float ex[V], ev[V];
      noise_pair<V>(s.noise.eps, seed, b, d, D, step, kTagHalfStep, ex, ev);
#pragma unroll
      for (int k = 0; k < V; ++k) linear_step<true>(r, x[k], v[k], ex[k], ev[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) linear_step<false>(r, x[k], v[k], 0.f, 0.f);
    }
    replace_obs<V>(obs, r + 7, obs_seed, b, d, D, step, 1, x, v);
    store<V>(px, x);
    store<V>(px + D, v);
  }
};

// Coefficients: alpha kappa | closing half step (7) | opening half step (7).
template <typename Y>
struct SscsStepOp {
  static constexpr int K = 16 + kObsCoefs;
  static constexpr int kParts = 4;  // score step, closing and opening half steps, the replacement

  float* u;    // (B, 2, D), in place; eps (B, 4, D)
  const Y* y;   // (B, D) network output
  const Y* yu;  // (B, D) unconditional network output, or nullptr (unguided)
  float w;      // the guidance weight
  StepArgs s;
  ObsArg obs;
  bool mixed;
  bool official_half;
  int64_t D;
  float r[K];
  int64_t step, seed, obs_seed;

  __device__ __forceinline__ void part(int i, float* c) const {
    const StepIndex k = read_step(s.step, s.ts, /*reads_next=*/true);
    const SscsTimes tm =
        sscs_times(grid_at(s.ts, k.k), grid_at(s.ts, k.k + 1), grid_at(s.ts, k.k + 2), official_half);
    const Params p = load_params(s.sde);
    if (i == 0) {
      const ScoreStep a = score_step_coefficients(p, tm.t0, tm.h, mixed);
      const double v[2] = {a.alpha, a.kappa};
      store_coefficients<2>(c, v, k.valid);
    } else if (i == 1) {
      store_half_step(c + 2, half_step_coefficients(p, tm.t_close, tm.h_close), k.valid);
    } else if (i == 2) {
      const bool opening = sscs_has_opening(k.k, s.ts.size);
      store_half_step(c + 9, opening ? half_step_coefficients(p, tm.t_open, tm.h_open) : identity_half_step(), k.valid);
    } else if (obs.p != nullptr) {
      const double t_r = sscs_replacement_time(grid_at(s.ts, k.k + 1), grid_at(s.ts, k.k + 2));
      store_replacement(c + 16, s.sde, t_r, false, k.valid);
    }
  }

  __device__ __forceinline__ void prepare(const float* c) {
#pragma unroll
    for (int j = 0; j < K; ++j) r[j] = c[j];
    step = *s.step;
    seed = read_seed(s.noise);
    obs_seed = read_obs_seed(obs);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V];
    float* px = u + b * 2 * D + d;
    load<V>(px, x);
    load<V>(px + D, v);
    load_net<V>(y, yu, w, b * D + d, yy);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = r[0] * v[k] + r[1] * yy[k];
    if (s.noise.eps != nullptr) {
      float z[4][V];
#pragma unroll
      for (int j = 0; j < 4; ++j) load<V>(s.noise.eps + (b * 4 + j) * D + d, z[j]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        linear_step<true>(r + 2, x[k], v[k], z[0][k], z[1][k]);
        linear_step<true>(r + 9, x[k], v[k], z[2][k], z[3][k]);
      }
    } else if (s.noise.seed != nullptr) {
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
    replace_obs<V>(obs, r + 16, obs_seed, b, d, D, step, 0, x, v);
    store<V>(px, x);
    store<V>(px + D, v);
  }
};

// Coefficients: c_xx c_xv c_vx c_vv c_vy sigma.
template <typename Y>
struct AffineStepOp {
  static constexpr int K = 6 + kObsCoefs;
  static constexpr int kParts = 2;  // the step, the replacement

  const float* u;  // (B, 2, D); may be `out` itself: each thread reads its elements before writing them
  const Y* y;      // (B, D)
  const Y* yu;     // (B, D) unconditional network output, or nullptr (unguided)
  float w;         // the guidance weight
  StepArgs s;      // eps (B, D)
  ObsArg obs;
  int kind;
  bool mixed;
  float* out;  // (B, 2, D)
  int64_t D;
  float r[K];
  int64_t step, seed, obs_seed;

  __device__ __forceinline__ void part(int i, float* c) const {
    const bool drift = kind == kAffinePfDrift;
    const StepIndex k = read_step(s.step, s.ts, /*reads_next=*/!drift);
    const double t0 = grid_at(s.ts, k.k);
    if (i == 0) {
      const double h = drift ? 0.0 : t0 - grid_at(s.ts, k.k + 1);
      const Affine a = affine_coefficients(load_params(s.sde), t0, h, kind, mixed);
      const double v[6] = {a.c_xx, a.c_xv, a.c_vx, a.c_vv, a.c_vy, a.sigma};
      store_coefficients<6>(c, v, k.valid);
    } else if (obs.p != nullptr) {
      store_replacement(c + 6, s.sde, grid_at(s.ts, k.k + 1), kind == kAffineDenoise, k.valid);
    }
  }

  __device__ __forceinline__ void prepare(const float* c) {
#pragma unroll
    for (int j = 0; j < K; ++j) r[j] = c[j];
    step = *s.step;
    seed = read_seed(s.noise);
    obs_seed = read_obs_seed(obs);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t b, int64_t d) const {
    float x[V], v[V], yy[V], nx[V], nv[V];
    const int64_t o = b * 2 * D + d;
    load<V>(u + o, x);
    load<V>(u + o + D, v);
    load_net<V>(y, yu, w, b * D + d, yy);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      nx[k] = r[0] * x[k] + r[1] * v[k];
      nv[k] = r[2] * x[k] + r[3] * v[k] + r[4] * yy[k];
    }
    if (kind == kAffineEm) {
      if (s.noise.eps != nullptr) {
        float e[V];
        load<V>(s.noise.eps + b * D + d, e);
#pragma unroll
        for (int k = 0; k < V; ++k) nv[k] = nv[k] + r[5] * e[k];
      } else if (s.noise.seed != nullptr) {
#pragma unroll
        for (int k = 0; k < V; ++k) nv[k] = nv[k] + r[5] * normal_z0(seed, b * D + d + k, step, kTagAffine);
      }
    }
    replace_obs<V>(obs, r + 6, obs_seed, b, d, D, step, 0, nx, nv);
    store<V>(out + o, nx);
    store<V>(out + o + D, nv);
  }
};

}  // namespace

void launch_half_step(float* u, TimeArg ts, const int64_t* step, const double* sde, NoiseArg noise, ObsArg obs,
                      int64_t B, int64_t D, cudaStream_t stream) {
  const HalfStepOp op{u, {ts, step, sde, noise}, obs, D, {}, 0, 0, 0};
  launch_steps(op, pick_vec(D, {{u, 4}, {noise.eps, 4}, {obs.p, 4}}), B, D, stream);
}

void launch_sscs_step(float* u, const void* y, NetType y_type, GuideArg guide, TimeArg ts, const int64_t* step,
                      const double* sde, bool mixed, bool official_half, NoiseArg noise, ObsArg obs, int64_t B,
                      int64_t D, cudaStream_t stream) {
  const int vec =
      pick_vec(D, {{u, 4}, {y, net_bytes(y_type)}, {guide.y_uncond, net_bytes(y_type)}, {noise.eps, 4}, {obs.p, 4}});
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    const SscsStepOp<Y> op{u, static_cast<const Y*>(y), static_cast<const Y*>(guide.y_uncond), guide.weight,
                           {ts, step, sde, noise}, obs, mixed, official_half, D, {}, 0, 0, 0};
    launch_steps(op, vec, B, D, stream);
  });
}

void launch_affine_step(const float* u, const void* y, NetType y_type, GuideArg guide, TimeArg ts,
                        const int64_t* step, const double* sde, int kind, bool mixed, NoiseArg noise, ObsArg obs,
                        float* out, int64_t B, int64_t D, cudaStream_t stream) {
  const int vec = pick_vec(
      D, {{u, 4}, {y, net_bytes(y_type)}, {guide.y_uncond, net_bytes(y_type)}, {noise.eps, 4}, {out, 4}, {obs.p, 4}});
  dispatch_net(y_type, [&](auto tag) {
    using Y = decltype(tag);
    const AffineStepOp<Y> op{u, static_cast<const Y*>(y), static_cast<const Y*>(guide.y_uncond), guide.weight,
                             {ts, step, sde, noise}, obs, kind, mixed, out, D, {}, 0, 0, 0};
    launch_steps(op, vec, B, D, stream);
  });
}

}  // namespace cuda
}  // namespace cld
