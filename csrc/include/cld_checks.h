// Argument checks and layout helpers shared by the CPU and CUDA bindings of the cld_fast ops
// (torch-facing code only; the CUDA kernel files never include this). The schemas and argument
// conventions are those of cld_fast/opdefs.py.
//
// Every failure is a TORCH_CHECK (RuntimeError in Python) whose message names the op, the argument
// and what was expected. `cpu` selects the CPU rules (float64 state and network outputs allowed).
// Layout is not checked: the bindings make inputs contiguous and update non-contiguous in-place
// targets through a contiguous copy (InPlace).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

#include "cld_coefficients.h"

namespace cld {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string shape_str(std::initializer_list<int64_t> s) {
  return shape_str(c10::IntArrayRef(s.begin(), s.size()));
}

inline void check_shape(const at::Tensor& t, std::initializer_list<int64_t> want, const char* op,
                        const char* name) {
  const c10::IntArrayRef want_ref(want.begin(), want.size());
  TORCH_CHECK(t.sizes() == want_ref, op, ": ", name, " must have shape ", shape_str(want), ", got ",
              shape_str(t.sizes()));
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as the state (",
              ref.device(), "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

// The state dtype: float32 / float64 on the CPU, float32 on CUDA.
inline void check_state_dtype(const at::Tensor& t, bool cpu, const char* op, const char* name) {
  const auto st = t.scalar_type();
  if (cpu) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": ", name,
                " must be float32 or float64 on the CPU, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat, op, ": ", name, " must be float32 on ", t.device().type(), " (got ", st,
                "); use the 'torch' backend for other dtypes");
  }
}

// A network output / score input: float32, bfloat16, float16 (and float64 on the CPU).
inline void check_net_dtype(const at::Tensor& t, bool cpu, const char* op, const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || (cpu && st == at::kDouble);
  TORCH_CHECK(ok, op, ": ", name, " must be float32, bfloat16 or float16", cpu ? " or float64" : "", ", got ", st);
}

// A (1,) int64 tensor (seed or step) on the data's device.
inline void check_scalar_i64(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a (1,) int64 tensor, got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  check_device(t, ref, op, name);
}

// sde: the (5,) float64 CLD parameters (cld_fast.sde.kernel_params), on the data's device.
inline void check_params(const at::Tensor& sde, const at::Tensor& ref, const char* op) {
  check_shape(sde, {kNumParams}, op, "sde");
  check_dtype(sde, at::kDouble, op, "sde");
  check_device(sde, ref, op, "sde");
}

inline void check_time_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": ", name, " must be float32 or float64, got ", st);
}

// t: (B,) forward times, any stride.
inline void check_times(const at::Tensor& t, int64_t B, const at::Tensor& ref, const char* op) {
  check_shape(t, {B}, op, "t");
  check_time_dtype(t, op, "t");
  check_device(t, ref, op, "t");
}

// ts: a 1-D forward-time grid, any stride.
inline void check_grid(const at::Tensor& ts, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(ts.dim() == 1 && ts.size(0) >= 1, op, ": ts must be a 1-D time grid with at least one point, got shape ",
              shape_str(ts.sizes()));
  check_time_dtype(ts, op, "ts");
  check_device(ts, ref, op, "ts");
}

// An int enum argument: one of the codes 0 .. n - 1 named by `names`.
inline void check_code(int64_t code, int n, const char* const* names, const char* op, const char* name) {
  if (code >= 0 && code < n) return;
  std::ostringstream os;
  for (int i = 0; i < n; ++i) os << (i ? ", " : "") << i << " (" << names[i] << ")";
  TORCH_CHECK(false, op, ": ", name, " must be one of ", os.str(), ", got ", code);
}

// The host-side range check of a step into a grid of n_ts points (CPU ops; CUDA kernels poison
// their output with NaN instead, as they never synchronise to read the step).
inline void check_step_range(int64_t k, int64_t n_ts, bool reads_next, const char* op) {
  if (step_in_range(k, n_ts, reads_next)) return;
  const int64_t hi = reads_next ? n_ts - 2 : n_ts - 1;
  if (hi < 0) {
    TORCH_CHECK(false, op, ": step = ", k, " is out of range for a time grid ts of ", n_ts,
                " points (no valid step: a step needs 2 points)");
  }
  TORCH_CHECK(false, op, ": step = ", k, " is out of range for a time grid ts of ", n_ts, " points (valid 0..", hi,
              ")");
}

// A tensor of exact shape, dtype and device, and its optional variant.
inline void check_arg(const at::Tensor& t, std::initializer_list<int64_t> shape, at::ScalarType dtype,
                      const at::Tensor& ref, const char* op, const char* name) {
  check_shape(t, shape, op, name);
  check_dtype(t, dtype, op, name);
  check_device(t, ref, op, name);
}

inline void check_opt(const std::optional<at::Tensor>& t, std::initializer_list<int64_t> shape, at::ScalarType dtype,
                      const at::Tensor& ref, const char* op, const char* name) {
  if (t.has_value()) check_arg(*t, shape, dtype, ref, op, name);
}

inline void check_seed(const std::optional<at::Tensor>& seed, const at::Tensor& ref, const char* op) {
  if (seed.has_value()) check_scalar_i64(*seed, ref, op, "seed");
}

struct Dims {
  int64_t B, D;
};

// The (B, 2, D) state; returns (B, D).
inline Dims check_state(const at::Tensor& u, bool cpu, const char* op, const char* name) {
  TORCH_CHECK(u.dim() == 3 && u.size(1) == 2, op, ": ", name, " must have shape (B, 2, D), got ",
              shape_str(u.sizes()));
  check_state_dtype(u, cpu, op, name);
  return {u.size(0), u.size(2)};
}

inline void check_net(const at::Tensor& t, Dims n, const at::Tensor& ref, bool cpu, const char* op,
                      const char* name) {
  check_shape(t, {n.B, n.D}, op, name);
  check_net_dtype(t, cpu, op, name);
  check_device(t, ref, op, name);
}

// ---- per-op validation (schemas of cld_fast/opdefs.py) ------------------------------------------

inline Dims check_perturb(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& t,
                          const at::Tensor& sde, int64_t objective, const std::optional<at::Tensor>& eps,
                          const std::optional<at::Tensor>& seed, const at::Tensor& out, bool cpu) {
  const char* op = "cld_fast::perturb";
  const Dims n = check_state(out, cpu, op, "out");
  const auto st = out.scalar_type();
  check_arg(x0, {n.B, n.D}, st, out, op, "x0");
  check_opt(v0, {n.B, n.D}, st, out, op, "v0");
  check_times(t, n.B, out, op);
  check_params(sde, out, op);
  check_code(objective, kNumObjectives, kObjectiveNames, op, "objective");
  check_opt(eps, {n.B, 2, n.D}, st, out, op, "eps");
  check_seed(seed, out, op);
  return n;
}

// grad: nullptr for the forward; else 0-d or (B,) in the state dtype.
// The objective and output codes of the loss and the score ops.
inline void check_score_mode(int64_t objective, int64_t output, const char* op) {
  check_code(objective, kNumObjectives, kObjectiveNames, op, "objective");
  check_code(output, kNumOutputs, kOutputNames, op, "output");
}

inline Dims check_hsm_loss(const at::Tensor* grad, const at::Tensor& out, const at::Tensor& u, const at::Tensor& t,
                           const at::Tensor& sde, int64_t weighting, const std::optional<at::Tensor>& eps_v,
                           const std::optional<at::Tensor>& seed, int64_t objective, int64_t output, bool cpu,
                           const char* op) {
  const Dims n = check_state(u, cpu, op, "u");
  check_net(out, n, u, cpu, op, "out");
  check_times(t, n.B, u, op);
  check_params(sde, u, op);
  check_code(weighting, kNumWeightings, kWeightingNames, op, "weighting");
  check_score_mode(objective, output, op);
  check_opt(eps_v, {n.B, n.D}, u.scalar_type(), u, op, "eps_v");
  check_seed(seed, u, op);
  TORCH_CHECK(eps_v.has_value() || seed.has_value(), op,
              ": one of eps_v or seed must be given (the loss needs the perturbation's eps_v)");
  if (grad != nullptr) {
    TORCH_CHECK(grad->dim() == 0 || grad->sizes() == c10::IntArrayRef({n.B}), op,
                ": grad must be 0-d or have shape (B,) = ", shape_str({n.B}), ", got ", shape_str(grad->sizes()));
    check_dtype(*grad, u.scalar_type(), op, "grad");
    check_device(*grad, u, op, "grad");
  }
  return n;
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == 0 || reduction == 1, op,
              ": reduction must be 0 (per sample, shape (B,)) or 1 (sum over samples, 0-d), got ", reduction);
}

inline Dims check_mixed_score(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                              int64_t objective, int64_t output, bool cpu) {
  const char* op = "cld_fast::mixed_score";
  const Dims n = check_state(u, cpu, op, "u");
  check_net(out, n, u, cpu, op, "out");
  check_times(t, n.B, u, op);
  check_params(sde, u, op);
  check_score_mode(objective, output, op);
  return n;
}

// The arguments every sampler step shares: ts, step, sde, eps (B, eps_rows, D; eps_rows 0: (B, D)), seed.
inline void check_step_args(const at::Tensor& ts, const at::Tensor& step, const at::Tensor& sde,
                            const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                            int64_t eps_rows, Dims n, const at::Tensor& state, const char* op) {
  check_grid(ts, state, op);
  check_scalar_i64(step, state, op, "step");
  check_params(sde, state, op);
  if (eps_rows > 0) {
    check_opt(eps, {n.B, eps_rows, n.D}, state.scalar_type(), state, op, "eps");
  } else {
    check_opt(eps, {n.B, n.D}, state.scalar_type(), state, op, "eps");
  }
  check_seed(seed, state, op);
}

// obs: the optional inpainting condition (B, 2 or 4, D) in the state dtype: x_obs, mask[, z_x, z_v].
inline void check_obs(const std::optional<at::Tensor>& obs, Dims n, const at::Tensor& state, const char* op) {
  if (!obs.has_value()) return;
  const at::Tensor& o = *obs;
  TORCH_CHECK(o.dim() == 3 && o.size(0) == n.B && (o.size(1) == 2 || o.size(1) == 4) && o.size(2) == n.D, op,
              ": obs must have shape (B, 2 or 4, D) = (", n.B, ", 2 or 4, ", n.D,
              ") (x_obs, mask and optionally the replacement noise), got ", shape_str(o.sizes()));
  check_dtype(o, state.scalar_type(), op, "obs");
  check_device(o, state, op, "obs");
}

// y_uncond: the optional unconditional network output of classifier-free guidance (opdefs ``y_uncond``),
// with y's shape, dtype and device; guide_weight finite.
inline void check_guide(const std::optional<at::Tensor>& y_uncond, double guide_weight, const at::Tensor& y, Dims n,
                        const at::Tensor& state, bool cpu, const char* op) {
  if (!y_uncond.has_value()) return;
  check_net(*y_uncond, n, state, cpu, op, "y_uncond");
  check_dtype(*y_uncond, y.scalar_type(), op, "y_uncond (y's dtype)");
  TORCH_CHECK(std::isfinite(guide_weight), op, ": guide_weight must be finite, got ", guide_weight);
}

inline Dims check_half_step(const at::Tensor& u, const at::Tensor& ts, const at::Tensor& step, const at::Tensor& sde,
                            const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                            const std::optional<at::Tensor>& obs, bool cpu) {
  const char* op = "cld_fast::half_step_";
  const Dims n = check_state(u, cpu, op, "u");
  check_step_args(ts, step, sde, eps, seed, 2, n, u, op);
  check_obs(obs, n, u, op);
  return n;
}

inline Dims check_sscs_step(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                            const at::Tensor& sde, const std::optional<at::Tensor>& eps,
                            const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& obs,
                            const std::optional<at::Tensor>& y_uncond, double guide_weight, bool cpu) {
  const char* op = "cld_fast::sscs_step_";
  const Dims n = check_state(u, cpu, op, "u");
  check_net(y, n, u, cpu, op, "y");
  check_guide(y_uncond, guide_weight, y, n, u, cpu, op);
  check_step_args(ts, step, sde, eps, seed, 4, n, u, op);
  check_obs(obs, n, u, op);
  return n;
}

inline Dims check_affine(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                         const at::Tensor& sde, int64_t kind, const std::optional<at::Tensor>& eps,
                         const std::optional<at::Tensor>& seed, const at::Tensor& out,
                         const std::optional<at::Tensor>& obs, const std::optional<at::Tensor>& y_uncond,
                         double guide_weight, bool cpu) {
  const char* op = "cld_fast::affine_step";
  const Dims n = check_state(out, cpu, op, "out");
  check_arg(u, {n.B, 2, n.D}, out.scalar_type(), out, op, "u");
  TORCH_CHECK(at::get_overlap_status(u, out) != at::MemOverlapStatus::Partial, op,
              ": out must be u itself (an in-place step) or not overlap u; it partially overlaps u");
  check_net(y, n, out, cpu, op, "y");
  check_guide(y_uncond, guide_weight, y, n, out, cpu, op);
  check_code(kind, kNumAffineKinds, kAffineKindNames, op, "kind");
  check_step_args(ts, step, sde, eps, seed, 0, n, out, op);
  check_obs(obs, n, out, op);
  TORCH_CHECK(!obs.has_value() || kind != kAffinePfDrift, op, ": obs (an inpainting condition) is not taken by the ",
              "pf_drift kind (a drift, not a step)");
  TORCH_CHECK(!y_uncond.has_value() || kind != kAffinePfDrift, op, ": y_uncond (classifier-free guidance) is not ",
              "taken by the pf_drift kind");
  return n;
}

// ---- gDDIM step --------------------------------------------------------------------------------

constexpr int64_t kGddimCols = 22;  // cld_fast.sde.GDDIM_COLS: E (6), Lin (4), C_0 .. C_2 (4 each)

// hist: the (K, B, H, D) ring buffer of a gDDIM step (K in {0, 1, 2}, H in {1, 2}), in the state
// dtype, on the state's device, sharing no memory with the state.
inline void check_ring(const at::Tensor& hist, Dims n, const at::Tensor& state, const char* op, const char* name) {
  const bool ok = hist.dim() == 4 && hist.size(0) <= 2 && hist.size(1) == n.B &&
                  (hist.size(2) == 1 || hist.size(2) == 2) && hist.size(3) == n.D;
  TORCH_CHECK(ok, op, ": ", name, " must be a (K, B, H, D) ring buffer with K in {0, 1, 2}, B = ", n.B,
              ", H in {1, 2}, D = ", n.D, " (cf. cld_fast.ops.gddim_history), got shape ", shape_str(hist.sizes()));
  check_dtype(hist, state.scalar_type(), op, name);
  check_device(hist, state, op, name);
  const auto overlap = at::get_overlap_status(hist, state);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op, ": ", name,
              " must not share memory with the state (both are updated in place)");
}

// table: (S >= 1, kGddimCols) float32 / float64 coefficient rows (CLD.gddim_table), any stride.
inline void check_table(const at::Tensor& table, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= 1 && table.size(1) == kGddimCols, op,
              ": table must have shape (S, ", kGddimCols, ") with S >= 1 (rows of CLD.gddim_table), got ",
              shape_str(table.sizes()));
  check_time_dtype(table, op, "table");
  check_device(table, ref, op, "table");
}

// The host-side range check of a step into a table of `rows` coefficient rows (CPU ops).
inline void check_table_step_range(int64_t k, int64_t rows, const char* op) {
  TORCH_CHECK(k >= 0 && k < rows, op, ": step = ", k, " is out of range for a table of ", rows, " rows (valid 0..",
              rows - 1, ")");
}

inline Dims check_gddim_step(const at::Tensor& u, const at::Tensor& hist, const at::Tensor& y, const at::Tensor& table,
                             const at::Tensor& step, const std::optional<at::Tensor>& ts,
                             const std::optional<at::Tensor>& sde, const std::optional<at::Tensor>& seed,
                             const std::optional<at::Tensor>& obs, const std::optional<at::Tensor>& y_uncond,
                             double guide_weight, bool cpu) {
  const char* op = "cld_fast::gddim_step_";
  const Dims n = check_state(u, cpu, op, "u");
  check_ring(hist, n, u, op, "hist");
  check_net(y, n, u, cpu, op, "y");
  check_guide(y_uncond, guide_weight, y, n, u, cpu, op);
  check_table(table, u, op);
  check_scalar_i64(step, u, op, "step");
  check_obs(obs, n, u, op);
  if (obs.has_value()) {
    TORCH_CHECK(ts.has_value() && sde.has_value(), op, ": obs needs the run's time grid ts and the sde parameters");
    check_grid(*ts, u, op);
    check_params(*sde, u, op);
    check_seed(seed, u, op);
  }
  return n;
}

// ---- layout -------------------------------------------------------------------------------------

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// A contiguous stand-in for an in-place target: `work` is the target itself when it is contiguous,
// else a contiguous copy that commit() writes back.
struct InPlace {
  at::Tensor target, work;

  explicit InPlace(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}

  void commit() const {
    if (!work.is_same(target)) target.copy_(work);
  }
};

// The input u of an out-of-place op whose output is being written through `out`: the same
// buffer when u is out itself (an in-place call), else u made contiguous.
inline at::Tensor source_for(const at::Tensor& u, const at::Tensor& out, const InPlace& w) {
  if (at::get_overlap_status(u, out) == at::MemOverlapStatus::Full) return w.work;
  return u.contiguous();
}

}  // namespace cld
