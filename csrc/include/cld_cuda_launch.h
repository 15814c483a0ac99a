// Host-side launchers of the cld_fast CUDA kernels (csrc/cuda/*.cu), in plain C++ types so that the
// kernel files compile with plain nvcc (no torch headers) and the torch binding
// (csrc/cuda/ops_cuda.cpp) compiles with the host compiler.
//
// Semantics are those of the torch references in cld_fast/opdefs.py. Layouts: u (B, 2, D)
// contiguous float32 state, network outputs (B, D) contiguous in float32 / bfloat16 / float16.
// Everything the result depends on is read by the kernels on the device: the times t (B,) or the
// grid ts, the step index, the (5,) float64 CLD parameters `sde` (cld_coefficients.h computes the
// coefficients from them in double) and the seed. Nothing here synchronises; a step outside the grid
// gives NaN outputs. Optional pointers are nullptr when absent; noise comes from `eps` when given,
// else from the Philox contract (cld_philox.h) when `seed` is given, else there is none.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace cld {
namespace cuda {

// dtype of a network output / score argument.
enum class NetType : int { F32 = 0, BF16 = 1, F16 = 2 };

// A 1-D float32 / float64 tensor of forward times with any stride (t: size B; ts: size S + 1).
struct TimeArg {
  const void* data;
  int64_t stride;
  int64_t size;
  bool is_double;
};

// A 2-D float32 / float64 table of per-step coefficient rows (rows x columns) with any strides.
struct TableArg {
  const void* data;
  int64_t row_stride;
  int64_t col_stride;
  int64_t rows;
  bool is_double;
};

// Explicit noise (float32, the op's layout) or a (1,) int64 seed on the device, or neither.
struct NoiseArg {
  const float* eps;
  const int64_t* seed;
};

// The inpainting condition of a step op (opdefs ``obs``): (B, channels, D) contiguous float32 with
// channels x_obs, mask (1 = observed)[, z_x, z_v]; nullptr when absent. The replacement noise comes
// from channels 2, 3 when channels = 4, else from the Philox contract (tag kTagInpaint) when `seed`
// is given, else there is none.
struct ObsArg {
  const float* p;
  int channels;
  const int64_t* seed;
};

// Classifier-free guidance of a step op (opdefs ``y_uncond``, ``guide_weight``): the kernel reads
// y + weight (y - y_uncond) in place of y; y_uncond (B, D) contiguous, y's type, or nullptr (unguided).
struct GuideArg {
  const void* y_uncond;
  float weight;
};

// out (B, 2, D) = A(t) (x0, v0) + L(t) (z0, z1); objective: cld::Objective.
void launch_perturb(const float* x0, const float* v0, TimeArg t, const double* sde, int objective, NoiseArg noise,
                    float* out, int64_t B, int64_t D, cudaStream_t stream);

// HSM loss forward: scale w_b sum_d r^2 with r = a out + c v - eps_v, per sample into loss (B,)
// (reduction 0) or summed over samples into loss (0-d, reduction 1). Deterministic (no atomics):
// one kernel, plus a final reduce when hsm_loss_fwd_workspace(B, D, reduction) > 0, the number of
// floats of workspace the caller provides (it depends on (B, D, reduction) only). (c, w, a) of
// cld::loss_coefficients(t, weighting, objective, output).
int64_t hsm_loss_fwd_workspace(int64_t B, int64_t D, int reduction);
void launch_hsm_loss_fwd(const void* out, NetType out_type, const float* u, TimeArg t, const double* sde,
                         int weighting, int objective, int output, double scale, int reduction, NoiseArg eps_v,
                         float* loss, float* workspace, int64_t B, int64_t D, cudaStream_t stream);

// res (B, D) of out_type = 2 scale w_b grad_b a_b r; grad 0-d (grad_stride 0) or (B,).
void launch_hsm_loss_bwd(const float* grad, int64_t grad_stride, const void* out, NetType out_type, const float* u,
                         TimeArg t, const double* sde, int weighting, int objective, int output, double scale,
                         NoiseArg eps_v, void* res, int64_t B, int64_t D, cudaStream_t stream);

// res (B, D) float32 = c0(t) v + c1(t) out, (c0, c1) of cld::score_coefficients(t, objective, output)
// (objective hsm, output mixed: -v / s_vv(t) - out / l22(t)).
void launch_mixed_score(const void* out, NetType out_type, const float* u, TimeArg t, const double* sde,
                        int objective, int output, float* res, int64_t B, int64_t D, cudaStream_t stream);

// In place: the reverse linear half step ts[*step] -> ts[*step + 1]; eps (B, 2, D); obs replaced at
// ts[*step + 1] (Philox normals z2, z3).
void launch_half_step(float* u, TimeArg ts, const int64_t* step, const double* sde, NoiseArg noise, ObsArg obs,
                      int64_t B, int64_t D, cudaStream_t stream);

// In place: the fused SSCS update after a network evaluation at ts[*step]; y (B, D); eps (B, 4, D);
// official_half: the official sampler's closing half step (cld::sscs_times); obs replaced at the end
// of the opening half step (cld::sscs_replacement_time); guide: classifier-free guidance of y.
void launch_sscs_step(float* u, const void* y, NetType y_type, GuideArg guide, TimeArg ts, const int64_t* step,
                      const double* sde, bool mixed, bool official_half, NoiseArg noise, ObsArg obs, int64_t B,
                      int64_t D, cudaStream_t stream);

// out = the affine step of u for ts[*step] -> ts[*step + 1] (kind: cld::AffineKind); out may be u
// itself; eps (B, D), used by kind em only; obs: em replaces at ts[*step + 1], denoise sets x = x_obs;
// guide: classifier-free guidance of y (not with pf_drift).
void launch_affine_step(const float* u, const void* y, NetType y_type, GuideArg guide, TimeArg ts,
                        const int64_t* step, const double* sde, int kind, bool mixed, NoiseArg noise, ObsArg obs,
                        float* out, int64_t B, int64_t D, cudaStream_t stream);

// In place: the gDDIM multistep after a network evaluation with row r = table[*step] (the
// (S, 22) rows of CLD.gddim_table, cast to float32 on the device): cur = E (x, v, y), u <- Lin u +
// C_0 cur + sum_{j=1..K} C_j hist[(*step - j) mod K], hist[*step mod K] <- cur[:H]. hist (K, B, H, D)
// contiguous float32 ring buffer, K in {0, 1, 2} (nullptr allowed when K = 0), H in {1, 2}; y (B, D).
// A step outside [0, S) gives NaN in u and in the ring slot written. obs (with the run's grid ts and
// the parameters sde, unread without obs): replaced at ts[*step + 1], x = x_obs when *step + 1 = len(ts).
// guide: classifier-free guidance of y.
void launch_gddim_step(float* u, float* hist, int K, int H, const void* y, NetType y_type, GuideArg guide,
                       TableArg table, const int64_t* step, ObsArg obs, TimeArg ts, const double* sde, int64_t B,
                       int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace cld
