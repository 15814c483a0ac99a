// Torch binding of the cld_fast CUDA kernels (TORCH_LIBRARY_IMPL for the CUDA dispatch key; the
// schemas are defined from Python by cld_fast.opdefs.define_library, before or after this library
// is loaded).
//
// Built by setup.py only in a CUDA build (CLD_FAST_WITH_CUDA); the kernels themselves live in
// csrc/cuda/*.cu behind the plain-C++ launchers of cld_cuda_launch.h. This file checks arguments
// (cld_checks.h, shared with the CPU binding), makes inputs contiguous (non-contiguous in-place
// targets are updated through a contiguous copy), allocates outputs and workspaces on the caching
// allocator, and launches on the current stream under a device guard: no host synchronisation
// anywhere (t, ts, step, sde and seed are read by the kernels on the device).
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

// t (B,) or ts: any stride, read in place.
TimeArg times(const at::Tensor& t) {
  return TimeArg{t.data_ptr(), t.stride(0), t.size(0), t.scalar_type() == at::kDouble};
}

NoiseArg noise(const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  return NoiseArg{fptr(eps), iptr(seed)};
}

ObsArg obs_arg(const std::optional<at::Tensor>& obs_c, const std::optional<at::Tensor>& seed) {
  if (!obs_c.has_value()) return ObsArg{nullptr, 2, nullptr};
  return ObsArg{obs_c->data_ptr<float>(), static_cast<int>(obs_c->size(1)), iptr(seed)};
}

// The classifier-free guidance pair from the contiguous y_uncond (or none).
GuideArg guide_arg(const std::optional<at::Tensor>& y_uncond_c, double weight) {
  return GuideArg{y_uncond_c.has_value() ? y_uncond_c->data_ptr() : nullptr, static_cast<float>(weight)};
}

// The (5,) parameters as a contiguous pointer (kernel_params tensors already are).
const double* params(const at::Tensor& sde_c) { return sde_c.data_ptr<double>(); }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void perturb_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& t, const at::Tensor& sde,
                  int64_t objective, const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                  const at::Tensor& out) {
  check_cuda(out, "cld_fast::perturb", "out");
  const Dims n = check_perturb(x0, v0, t, sde, objective, eps, seed, out, /*cpu=*/false);
  const c10::cuda::CUDAGuard guard(out.device());
  const InPlace w(out);
  const at::Tensor xc = x0.contiguous(), sc = sde.contiguous();
  const auto vc = contiguous(v0), ec = contiguous(eps);
  launch_perturb(xc.data_ptr<float>(), fptr(vc), times(t), params(sc), static_cast<int>(objective), noise(ec, seed),
                 w.work.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  w.commit();
}

at::Tensor hsm_loss_fwd_cuda(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                             int64_t weighting, double scale, int64_t reduction,
                             const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                             int64_t objective, int64_t output) {
  const char* op = "cld_fast::hsm_loss_fwd";
  check_cuda(u, op, "u");
  const Dims n = check_hsm_loss(nullptr, out, u, t, sde, weighting, eps_v, seed, objective, output, false, op);
  check_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor oc = out.contiguous(), uc = u.contiguous(), sc = sde.contiguous();
  const auto ec = contiguous(eps_v);
  at::Tensor loss = reduction == 1 ? at::empty({}, u.options()) : at::empty({n.B}, u.options());
  const int64_t ws = hsm_loss_fwd_workspace(n.B, n.D, static_cast<int>(reduction));
  at::Tensor workspace;
  if (ws > 0) workspace = at::empty({ws}, u.options());
  launch_hsm_loss_fwd(oc.data_ptr(), net_type(oc), uc.data_ptr<float>(), times(t), params(sc),
                      static_cast<int>(weighting), static_cast<int>(objective), static_cast<int>(output), scale,
                      static_cast<int>(reduction), noise(ec, seed),
                      loss.data_ptr<float>(), ws > 0 ? workspace.data_ptr<float>() : nullptr, n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor hsm_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u, const at::Tensor& t,
                             const at::Tensor& sde, int64_t weighting, double scale,
                             const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                             int64_t objective, int64_t output) {
  const char* op = "cld_fast::hsm_loss_bwd";
  check_cuda(u, op, "u");
  const Dims n = check_hsm_loss(&grad, out, u, t, sde, weighting, eps_v, seed, objective, output, false, op);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor gc = grad.contiguous(), oc = out.contiguous(), uc = u.contiguous(), sc = sde.contiguous();
  const auto ec = contiguous(eps_v);
  at::Tensor res = at::empty({n.B, n.D}, out.options());
  launch_hsm_loss_bwd(gc.data_ptr<float>(), gc.dim() == 0 ? 0 : 1, oc.data_ptr(), net_type(oc), uc.data_ptr<float>(),
                      times(t), params(sc), static_cast<int>(weighting), static_cast<int>(objective),
                      static_cast<int>(output), scale, noise(ec, seed), res.data_ptr(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

// The loss and its gradient for a unit upstream gradient, as the forward and backward kernels: on a
// GPU regenerating eps_v costs no memory traffic, so the split stays (docs/kernels.md, byte model).
at::Tensor hsm_loss_fwd_grad_cuda(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t,
                                  const at::Tensor& sde, int64_t weighting, double scale, int64_t reduction,
                                  const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                                  int64_t objective, int64_t output, const at::Tensor& grad_out) {
  at::Tensor loss = hsm_loss_fwd_cuda(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output);
  const at::Tensor one = at::ones({}, u.options());
  grad_out.copy_(hsm_loss_bwd_cuda(one, out, u, t, sde, weighting, scale, eps_v, seed, objective, output));
  return loss;
}

at::Tensor mixed_score_cuda(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                            int64_t objective, int64_t output) {
  check_cuda(u, "cld_fast::mixed_score", "u");
  const Dims n = check_mixed_score(out, u, t, sde, objective, output, false);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor oc = out.contiguous(), uc = u.contiguous(), sc = sde.contiguous();
  at::Tensor res = at::empty({n.B, n.D}, u.options());
  launch_mixed_score(oc.data_ptr(), net_type(oc), uc.data_ptr<float>(), times(t), params(sc),
                     static_cast<int>(objective), static_cast<int>(output), res.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

void half_step_cuda(const at::Tensor& u, const at::Tensor& ts, const at::Tensor& step, const at::Tensor& sde,
                    const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                    const std::optional<at::Tensor>& obs) {
  check_cuda(u, "cld_fast::half_step_", "u");
  const Dims n = check_half_step(u, ts, step, sde, eps, seed, obs, false);
  const c10::cuda::CUDAGuard guard(u.device());
  const InPlace w(u);
  const at::Tensor sc = sde.contiguous();
  const auto ec = contiguous(eps), oc = contiguous(obs);
  launch_half_step(w.work.data_ptr<float>(), times(ts), step.data_ptr<int64_t>(), params(sc), noise(ec, seed),
                   obs_arg(oc, seed), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  w.commit();
}

void sscs_step_cuda(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                    const at::Tensor& sde, bool mixed, const std::optional<at::Tensor>& eps,
                    const std::optional<at::Tensor>& seed, bool official_half, const std::optional<at::Tensor>& obs,
                    const std::optional<at::Tensor>& y_uncond, double guide_weight) {
  check_cuda(u, "cld_fast::sscs_step_", "u");
  const Dims n = check_sscs_step(u, y, ts, step, sde, eps, seed, obs, y_uncond, guide_weight, false);
  const c10::cuda::CUDAGuard guard(u.device());
  const InPlace w(u);
  const at::Tensor yc = y.contiguous(), sc = sde.contiguous();
  const auto ec = contiguous(eps), oc = contiguous(obs), gc = contiguous(y_uncond);
  launch_sscs_step(w.work.data_ptr<float>(), yc.data_ptr(), net_type(yc), guide_arg(gc, guide_weight), times(ts), step.data_ptr<int64_t>(),
                   params(sc), mixed, official_half, noise(ec, seed), obs_arg(oc, seed), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  w.commit();
}

void affine_step_cuda(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                      const at::Tensor& sde, int64_t kind, bool mixed, const std::optional<at::Tensor>& eps,
                      const std::optional<at::Tensor>& seed, const at::Tensor& out,
                      const std::optional<at::Tensor>& obs, const std::optional<at::Tensor>& y_uncond,
                      double guide_weight) {
  check_cuda(out, "cld_fast::affine_step", "out");
  const Dims n = check_affine(u, y, ts, step, sde, kind, eps, seed, out, obs, y_uncond, guide_weight, false);
  const c10::cuda::CUDAGuard guard(out.device());
  const InPlace w(out);
  const at::Tensor src = source_for(u, out, w);
  const at::Tensor yc = y.contiguous(), sc = sde.contiguous();
  const auto ec = contiguous(eps), oc = contiguous(obs), gc = contiguous(y_uncond);
  launch_affine_step(src.data_ptr<float>(), yc.data_ptr(), net_type(yc), guide_arg(gc, guide_weight), times(ts), step.data_ptr<int64_t>(),
                     params(sc), static_cast<int>(kind), mixed, noise(ec, seed), obs_arg(oc, seed),
                     w.work.data_ptr<float>(), n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  w.commit();
}

// table (S, 22): any stride, read in place.
TableArg table_arg(const at::Tensor& table) {
  return TableArg{table.data_ptr(), table.stride(0), table.stride(1), table.size(0),
                  table.scalar_type() == at::kDouble};
}

void gddim_step_cuda(const at::Tensor& u, const at::Tensor& hist, const at::Tensor& y, const at::Tensor& table,
                     const at::Tensor& step, const std::optional<at::Tensor>& ts, const std::optional<at::Tensor>& sde,
                     const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& obs,
                     const std::optional<at::Tensor>& y_uncond, double guide_weight) {
  const char* op = "cld_fast::gddim_step_";
  check_cuda(u, op, "u");
  const Dims n = check_gddim_step(u, hist, y, table, step, ts, sde, seed, obs, y_uncond, guide_weight, false);
  const c10::cuda::CUDAGuard guard(u.device());
  const InPlace wu(u), wh(hist);
  const at::Tensor yc = y.contiguous();
  const int64_t k = hist.size(0);
  const auto oc = contiguous(obs), sc = contiguous(sde), gc = contiguous(y_uncond);
  const TimeArg grid = obs.has_value() ? times(*ts) : TimeArg{nullptr, 0, 0, false};
  launch_gddim_step(wu.work.data_ptr<float>(), k > 0 ? wh.work.data_ptr<float>() : nullptr, static_cast<int>(k),
                    static_cast<int>(hist.size(2)), yc.data_ptr(), net_type(yc), guide_arg(gc, guide_weight),
                    table_arg(table), step.data_ptr<int64_t>(), obs_arg(oc, seed), grid,
                    sc.has_value() ? params(*sc) : nullptr, n.B, n.D, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  wh.commit();
  wu.commit();
}

}  // namespace
}  // namespace cuda
}  // namespace cld

TORCH_LIBRARY_IMPL(cld_fast, CUDA, m) {
  m.impl("perturb", &cld::cuda::perturb_cuda);
  m.impl("hsm_loss_fwd", &cld::cuda::hsm_loss_fwd_cuda);
  m.impl("hsm_loss_bwd", &cld::cuda::hsm_loss_bwd_cuda);
  m.impl("hsm_loss_fwd_grad", &cld::cuda::hsm_loss_fwd_grad_cuda);
  m.impl("mixed_score", &cld::cuda::mixed_score_cuda);
  m.impl("half_step_", &cld::cuda::half_step_cuda);
  m.impl("sscs_step_", &cld::cuda::sscs_step_cuda);
  m.impl("affine_step", &cld::cuda::affine_step_cuda);
  m.impl("gddim_step_", &cld::cuda::gddim_step_cuda);
}

#endif  // CLD_FAST_WITH_CUDA
