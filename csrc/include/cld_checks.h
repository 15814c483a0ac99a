// Argument checks shared by the CPU and CUDA bindings of the cld_fast ops (torch-facing code only;
// the CUDA kernel files never include this).
//
// Every failure is a TORCH_CHECK (RuntimeError in Python) whose message names the op, the argument
// and what was expected.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include <initializer_list>
#include <sstream>
#include <string>

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

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", shape_str(t.strides()),
              "); call .contiguous() first");
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

// The state dtype: float32 / float64 on CPU, float32 on CUDA.
inline void check_state_dtype(const at::Tensor& t, bool allow_double, const char* op, const char* name) {
  const auto st = t.scalar_type();
  if (allow_double) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": ", name,
                " must be float32 or float64 on the CPU, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat, op, ": ", name, " must be float32 on ", t.device().type(), " (got ", st,
                "); use the 'torch' backend for other dtypes");
  }
}

// A network output / score input: float32, bfloat16, float16 (and float64 on the CPU).
inline void check_net_dtype(const at::Tensor& t, bool allow_double, const char* op, const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || (allow_double && st == at::kDouble);
  TORCH_CHECK(ok, op, ": ", name, " must be float32, bfloat16 or float16", allow_double ? " or float64" : "",
              ", got ", st);
}

// A (1,) int64 scalar tensor (seed or step) on the data's device.
inline void check_scalar_i64(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a (1,) int64 tensor, got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  check_device(t, ref, op, name, "the state");
}

// A per-sample coefficient table (B, K) or a per-step table (S, K), in the state dtype.
inline void check_table(const at::Tensor& t, const at::Tensor& state, int64_t rows, int64_t cols, const char* op,
                        const char* name) {
  if (rows >= 0) {
    check_shape(t, {rows, cols}, op, name);
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == cols && t.size(0) >= 1, op, ": ", name, " must have shape (S, ",
                cols, ") with S >= 1, got ", shape_str(t.sizes()));
  }
  check_contiguous(t, op, name);
  check_dtype(t, state.scalar_type(), op, name);
  check_device(t, state, op, name, "the state");
}

// A tensor argument of exact shape, dtype and device (contiguous), and its optional variant.
inline void check_arg(const at::Tensor& t, std::initializer_list<int64_t> shape, at::ScalarType dtype,
                      const at::Tensor& ref, const char* op, const char* name) {
  check_shape(t, shape, op, name);
  check_contiguous(t, op, name);
  check_dtype(t, dtype, op, name);
  check_device(t, ref, op, name, "the state");
}

inline void check_opt(const std::optional<at::Tensor>& t, std::initializer_list<int64_t> shape, at::ScalarType dtype,
                      const at::Tensor& ref, const char* op, const char* name) {
  if (t.has_value()) check_arg(*t, shape, dtype, ref, op, name);
}

struct Dims {
  int64_t B, D;
};

// The (B, 2, D) state; returns (B, D).
inline Dims check_state(const at::Tensor& u, bool allow_double, const char* op, const char* name) {
  TORCH_CHECK(u.dim() == 3 && u.size(1) == 2, op, ": ", name, " must have shape (B, 2, D), got ",
              shape_str(u.sizes()));
  check_contiguous(u, op, name);
  check_state_dtype(u, allow_double, op, name);
  return {u.size(0), u.size(2)};
}

// ---- per-op validation, shared by the CPU and CUDA bindings ------------------------------------
// allow_double: float64 state / network output allowed (CPU only).

inline at::ScalarType loss_acc_dtype(const at::Tensor& out, const at::Tensor& u) {
  return (out.scalar_type() == at::kDouble || u.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_net(const at::Tensor& t, int64_t B, int64_t D, const at::Tensor& ref, bool allow_double,
                      const char* op, const char* name) {
  check_shape(t, {B, D}, op, name);
  check_contiguous(t, op, name);
  check_net_dtype(t, allow_double, op, name);
  check_device(t, ref, op, name, "the state");
}

inline Dims check_perturb(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& coef,
                          const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                          const at::Tensor& out, bool allow_double) {
  const char* op = "cld_fast::perturb";
  const Dims n = check_state(out, allow_double, op, "out");
  const int64_t B = n.B, D = n.D;
  const auto st = out.scalar_type();
  check_arg(x0, {B, D}, st, out, op, "x0");
  check_opt(v0, {B, D}, st, out, op, "v0");
  check_table(coef, out, B, 7, op, "coef");
  check_opt(eps, {B, 2, D}, st, out, op, "eps");
  if (seed.has_value()) check_scalar_i64(*seed, out, op, "seed");
  return n;
}

inline Dims check_hsm_loss(const std::optional<at::Tensor>& grad, const at::Tensor& out, const at::Tensor& u,
                           const at::Tensor& coef, const std::optional<at::Tensor>& eps_v,
                           const std::optional<at::Tensor>& seed, bool allow_double, const char* op) {
  const Dims n = check_state(u, allow_double, op, "u");
  const int64_t B = n.B, D = n.D;
  check_net(out, B, D, u, allow_double, op, "out");
  check_table(coef, u, B, 2, op, "coef");
  const auto acc = loss_acc_dtype(out, u);
  check_opt(eps_v, {B, D}, acc, u, op, "eps_v");
  check_opt(grad, {B}, acc, u, op, "grad");
  if (seed.has_value()) check_scalar_i64(*seed, u, op, "seed");
  TORCH_CHECK(eps_v.has_value() || seed.has_value(), op,
              ": one of eps_v or seed must be given (the loss needs the perturbation's eps_v)");
  return n;
}

inline Dims check_mixed_score(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef, bool allow_double) {
  const char* op = "cld_fast::mixed_score";
  const Dims n = check_state(u, allow_double, op, "u");
  check_net(out, n.B, n.D, u, allow_double, op, "out");
  check_table(coef, u, n.B, 2, op, "coef");
  return n;
}

// half_step_ (y undefined, K = 7, eps (B, 2, D)), sscs_step_ (K = 16, eps (B, 4, D)).
inline Dims check_step(const at::Tensor& u, const at::Tensor* y, const at::Tensor& table, const at::Tensor& step,
                       const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed, int64_t cols,
                       int64_t eps_rows, bool allow_double, const char* op) {
  const Dims n = check_state(u, allow_double, op, "u");
  const int64_t B = n.B, D = n.D;
  if (y != nullptr) check_net(*y, B, D, u, allow_double, op, "y");
  check_table(table, u, -1, cols, op, "table");
  check_scalar_i64(step, u, op, "step");
  check_opt(eps, {B, eps_rows, D}, u.scalar_type(), u, op, "eps");
  if (seed.has_value()) check_scalar_i64(*seed, u, op, "seed");
  return n;
}

inline Dims check_affine(const at::Tensor& u, const at::Tensor& y, const at::Tensor& table, const at::Tensor& step,
                         const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                         const at::Tensor& out, bool allow_double) {
  const char* op = "cld_fast::affine_step";
  const Dims n = check_state(out, allow_double, op, "out");
  const int64_t B = n.B, D = n.D;
  check_arg(u, {B, 2, D}, out.scalar_type(), out, op, "u");
  const auto overlap = at::get_overlap_status(u, out);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Partial, op,
              ": out must be u itself (an in-place step) or not overlap u; it partially overlaps u");
  check_net(y, B, D, out, allow_double, op, "y");
  check_table(table, out, -1, 6, op, "table");
  check_scalar_i64(step, out, op, "step");
  check_opt(eps, {B, D}, out.scalar_type(), out, op, "eps");
  if (seed.has_value()) check_scalar_i64(*seed, out, op, "seed");
  return n;
}

}  // namespace cld
