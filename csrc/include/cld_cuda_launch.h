// Host-side launchers of the cld_fast CUDA kernels (csrc/cuda/*.cu), in plain C++ types so that the
// kernel files compile with plain nvcc (no torch headers) and the torch binding
// (csrc/cuda/ops_cuda.cpp) compiles with the host compiler.
//
// Every launcher enqueues exactly one kernel on `stream` (none when there is no work) and returns
// without synchronising; the binding checks cudaGetLastError() (C10_CUDA_KERNEL_LAUNCH_CHECK) after
// each call. Layouts and semantics are those of cld_fast/backends/torch_backend.py: u (B, 2, D)
// contiguous float32 state, network outputs (B, D) in float32 / bfloat16 / float16, per-sample
// coefficients (B, K), per-step tables (S, K) whose row is picked by `*step` read on the device,
// seeds read on the device. Optional pointers are nullptr when absent; noise comes from `eps` when
// given, else from the Philox contract (cld_philox.h) when `seed` is given, else there is none.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace cld {
namespace cuda {

// dtype of a network output / score argument.
enum class NetType : int { F32 = 0, BF16 = 1, F16 = 2 };

// u = A @ (x0, v0) + L @ eps into out (B, 2, D); coef (B, 7).
void launch_perturb(const float* x0, const float* v0, const float* coef, const float* eps, const int64_t* seed,
                    float* out, int64_t B, int64_t D, cudaStream_t stream);

// The HSM loss forward is one kernel (small D: a few lanes per sample) or two (large D: per-(sample,
// chunk) partial sums, then launch_hsm_loss_fwd_finalize). hsm_loss_fwd_chunks(B, D) is the number of
// chunks per sample, so the caller allocates B * chunks floats of workspace; 0 means one kernel and no
// workspace. Deterministic (no atomics), fp32 accumulation.
int64_t hsm_loss_fwd_chunks(int64_t B, int64_t D);
void launch_hsm_loss_fwd(const void* out, NetType out_type, const float* u, const float* coef, const float* eps_v,
                         const int64_t* seed, float* loss, float* partials, int64_t chunks, int64_t B, int64_t D,
                         cudaStream_t stream);
void launch_hsm_loss_fwd_finalize(const float* partials, const float* coef, float* loss, int64_t chunks, int64_t B,
                                  cudaStream_t stream);

// d loss / d out = 2 w grad_b (out + c v - eps_v) into res (B, D) of out_type.
void launch_hsm_loss_bwd(const float* grad, const void* out, NetType out_type, const float* u, const float* coef,
                         const float* eps_v, const int64_t* seed, void* res, int64_t B, int64_t D,
                         cudaStream_t stream);

// res = c0 v + c1 out (B, D) float32; coef (B, 2).
void launch_mixed_score(const void* out, NetType out_type, const float* u, const float* coef, float* res, int64_t B,
                        int64_t D, cudaStream_t stream);

// In place: one analytic half step with row *step of table (S, 7); eps (B, 2, D).
void launch_half_step(float* u, const float* table, int64_t S, const int64_t* step, const float* eps,
                      const int64_t* seed, int64_t B, int64_t D, cudaStream_t stream);

// In place: fused SSCS update with row *step of table (S, 16); y (B, D); eps (B, 4, D).
void launch_sscs_step(float* u, const void* y, NetType y_type, const float* table, int64_t S, const int64_t* step,
                      const float* eps, const int64_t* seed, int64_t B, int64_t D, cudaStream_t stream);

// out = affine step of u with row *step of table (S, 6); out may be u itself; eps (B, D).
void launch_affine_step(const float* u, const void* y, NetType y_type, const float* table, int64_t S,
                        const int64_t* step, const float* eps, const int64_t* seed, float* out, int64_t B, int64_t D,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace cld
