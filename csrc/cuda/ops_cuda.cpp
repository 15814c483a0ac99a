// Torch binding of the cld_fast CUDA kernels (TORCH_LIBRARY_IMPL for the CUDA dispatch key).
//
// Built by setup.py only in a CUDA build (CLD_FAST_WITH_CUDA); the kernels themselves live in
// csrc/cuda/*.cu behind the plain-C++ launchers of cld_cuda_launch.h. This file checks arguments
// (cld_checks.h, shared with the CPU binding), allocates outputs and workspaces on the caching
// allocator, and launches on the current stream: no host synchronisation anywhere (the step and
// seed tensors are read by the kernels on the device).
#ifdef CLD_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cld_checks.h"
#include "cld_cuda_launch.h"

namespace cld {
namespace cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

NetType net_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return NetType::BF16;
    case at::kHalf:
      return NetType::F16;
    default:
      return NetType::F32;  // dtype already checked: float32
  }
}

const float* fptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }
const int64_t* iptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int64_t>() : nullptr; }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void perturb_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& coef,
                  const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed, const at::Tensor& out) {
  check_cuda(out, "cld_fast::perturb", "out");
  const Dims n = check_perturb(x0, v0, coef, eps, seed, out, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_perturb(x0.data_ptr<float>(), fptr(v0), coef.data_ptr<float>(), fptr(eps), iptr(seed),
                 out.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor hsm_loss_fwd_cuda(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef,
                             const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::hsm_loss_fwd";
  check_cuda(u, op, "u");
  const Dims n = check_hsm_loss(std::nullopt, out, u, coef, eps_v, seed, false, op);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor loss = at::empty({n.B}, u.options().dtype(at::kFloat));
  const int64_t chunks = hsm_loss_fwd_chunks(n.B, n.D);
  at::Tensor partials;
  if (chunks > 0) partials = at::empty({n.B, chunks}, u.options().dtype(at::kFloat));
  float* pp = chunks > 0 ? partials.data_ptr<float>() : nullptr;
  launch_hsm_loss_fwd(out.data_ptr(), net_type(out), u.data_ptr<float>(), coef.data_ptr<float>(), fptr(eps_v),
                      iptr(seed), loss.data_ptr<float>(), pp, chunks, n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) {
    launch_hsm_loss_fwd_finalize(pp, coef.data_ptr<float>(), loss.data_ptr<float>(), chunks, n.B, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loss;
}

at::Tensor hsm_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u,
                             const at::Tensor& coef, const std::optional<at::Tensor>& eps_v,
                             const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::hsm_loss_bwd";
  check_cuda(u, op, "u");
  const Dims n = check_hsm_loss(grad, out, u, coef, eps_v, seed, false, op);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor res = at::empty({n.B, n.D}, out.options());
  launch_hsm_loss_bwd(grad.data_ptr<float>(), out.data_ptr(), net_type(out), u.data_ptr<float>(),
                      coef.data_ptr<float>(), fptr(eps_v), iptr(seed), res.data_ptr(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

at::Tensor mixed_score_cuda(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef) {
  check_cuda(u, "cld_fast::mixed_score", "u");
  const Dims n = check_mixed_score(out, u, coef, false);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor res = at::empty({n.B, n.D}, u.options());
  launch_mixed_score(out.data_ptr(), net_type(out), u.data_ptr<float>(), coef.data_ptr<float>(),
                     res.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

void half_step_cuda(const at::Tensor& u, const at::Tensor& table, const at::Tensor& step,
                    const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::half_step_";
  check_cuda(u, op, "u");
  const Dims n = check_step(u, nullptr, table, step, eps, seed, 7, 2, false, op);
  const c10::cuda::CUDAGuard guard(u.device());
  launch_half_step(u.data_ptr<float>(), table.data_ptr<float>(), table.size(0), step.data_ptr<int64_t>(), fptr(eps),
                   iptr(seed), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sscs_step_cuda(const at::Tensor& u, const at::Tensor& y, const at::Tensor& table, const at::Tensor& step,
                    const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::sscs_step_";
  check_cuda(u, op, "u");
  const Dims n = check_step(u, &y, table, step, eps, seed, 16, 4, false, op);
  const c10::cuda::CUDAGuard guard(u.device());
  launch_sscs_step(u.data_ptr<float>(), y.data_ptr(), net_type(y), table.data_ptr<float>(), table.size(0),
                   step.data_ptr<int64_t>(), fptr(eps), iptr(seed), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void affine_step_cuda(const at::Tensor& u, const at::Tensor& y, const at::Tensor& table, const at::Tensor& step,
                      const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                      const at::Tensor& out) {
  const char* op = "cld_fast::affine_step";
  check_cuda(out, op, "out");
  const Dims n = check_affine(u, y, table, step, eps, seed, out, false);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_affine_step(u.data_ptr<float>(), y.data_ptr(), net_type(y), table.data_ptr<float>(), table.size(0),
                     step.data_ptr<int64_t>(), fptr(eps), iptr(seed), out.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace cld

TORCH_LIBRARY_IMPL(cld_fast, CUDA, m) {
  m.impl("perturb", &cld::cuda::perturb_cuda);
  m.impl("hsm_loss_fwd", &cld::cuda::hsm_loss_fwd_cuda);
  m.impl("hsm_loss_bwd", &cld::cuda::hsm_loss_bwd_cuda);
  m.impl("mixed_score", &cld::cuda::mixed_score_cuda);
  m.impl("half_step_", &cld::cuda::half_step_cuda);
  m.impl("sscs_step_", &cld::cuda::sscs_step_cuda);
  m.impl("affine_step", &cld::cuda::affine_step_cuda);
}

#endif  // CLD_FAST_WITH_CUDA
