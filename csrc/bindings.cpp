// The Python module cld_fast._C.
//
// Importing it (or loading the shared library with torch.ops.load_library) runs the static
// registrations of the op implementations: the CPU kernels (csrc/cpu/ops_cpu.cpp) and, in a CUDA
// build, the CUDA kernels (csrc/cuda/ops_cuda.cpp). The op schemas are not defined here but in
// Python (cld_fast.opdefs.define_library), before or after this library is loaded; Python calls the
// ops as torch.ops.cld_fast.<op>. The module itself only holds test probes of the compiled contracts.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cld_coefficients.h"
#include "cld_philox.h"
#include "cpu/cld_philox_cpu.h"

namespace cld {
bool cpu_kernels_compiled();  // csrc/cpu/ops_cpu.cpp
int64_t take_nonfinite_inputs();  // csrc/cpu/ops_cpu.cpp
}

namespace {
// The Philox contract as compiled into the CPU kernels (cld_philox.h, vectorised by
// cpu/cld_philox_cpu.h), for tests: the four uint32 outputs (as int64) and their uniforms for element
// indices start .. start + n - 1. Returns ((4, n) int64, (4, n) float32).
std::pair<at::Tensor, at::Tensor> philox_probe(int64_t seed, int64_t start, int64_t n, int64_t step, int64_t tag) {
  TORCH_CHECK(n >= 0, "_philox_probe: n must be >= 0, got ", n);
  TORCH_CHECK(tag >= 0 && tag <= 0xffffffffLL, "_philox_probe: tag must fit in 32 bits, got ", tag);
  at::Tensor bits = at::empty({4, n}, at::kLong);
  at::Tensor unif = at::empty({4, n}, at::kFloat);
  auto b = bits.accessor<int64_t, 2>();
  auto u = unif.accessor<float, 2>();
  std::vector<uint32_t> words(static_cast<size_t>(4 * n));
  uint32_t* w[4] = {words.data(), words.data() + n, words.data() + 2 * n, words.data() + 3 * n};
  cld::cpu::philox_words(seed, start, n, step, static_cast<uint32_t>(tag), w);
  for (int64_t j = 0; j < n; ++j) {
    for (int k = 0; k < 4; ++k) {
      b[k][j] = static_cast<int64_t>(w[k][j]);
      u[k][j] = cld::uniform_from_bits(w[k][j]);
    }
  }
  return {bits, unif};
}

// The normals z0..z3 the CPU kernels draw for element indices start .. start + n - 1 (vectorised
// Box-Muller of cpu/cld_philox_cpu.h), (4, n) float32; for tests.
// lanes: the vector width to run (16, 8 or 0 for the scalar code; -1: the widest this CPU has).
at::Tensor philox_normals_probe(int64_t seed, int64_t start, int64_t n, int64_t step, int64_t tag, int64_t lanes) {
  TORCH_CHECK(n >= 0, "_philox_normals: n must be >= 0, got ", n);
  TORCH_CHECK(tag >= 0 && tag <= 0xffffffffLL, "_philox_normals: tag must fit in 32 bits, got ", tag);
  const int64_t widest = cld::cpu::philox_lanes_available();
  TORCH_CHECK(lanes == -1 || lanes == 0 || ((lanes == 8 || lanes == 16) && lanes <= widest),
              "_philox_normals: lanes must be -1, 0 or a width this CPU runs (at most ", widest, "), got ", lanes);
  at::Tensor z = at::empty({4, n}, at::kFloat);
  float* rows[4] = {z[0].data_ptr<float>(), z[1].data_ptr<float>(), z[2].data_ptr<float>(), z[3].data_ptr<float>()};
  cld::cpu::philox_normals<4>(seed, start, n, step, static_cast<uint32_t>(tag), rows, static_cast<int>(lanes));
  return z;
}

// One probe row: the coefficient columns of `kind` at (t, h).
std::vector<double> coefficient_row(const std::string& kind, const cld::Params& p, double t, double h, int code,
                                    bool mixed, int objective, int output) {
  if (kind == "perturb") {
    const auto k = cld::perturb_coefficients(p, t, code);
    return {k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.s_xx, k.s_xv, k.s_vv, k.l11, k.l21, k.l22};
  }
  if (kind == "loss") {
    const auto k = cld::loss_coefficients(p, t, code, objective, output);
    return {k.c, k.w, k.a};
  }
  if (kind == "mixed") {
    const auto k = cld::score_coefficients(p, t, objective, output);
    return {k.c0, k.c1};
  }
  if (kind == "half_step") {
    const auto k = cld::half_step_coefficients(p, t, h);
    return {k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.l11, k.l21, k.l22};
  }
  if (kind == "score_step") {
    const auto k = cld::score_step_coefficients(p, t, h, mixed);
    return {k.alpha, k.kappa};
  }
  if (kind == "affine") {
    const auto k = cld::affine_coefficients(p, t, h, code, mixed);
    return {k.c_xx, k.c_xv, k.c_vx, k.c_vv, k.c_vy, k.sigma};
  }
  TORCH_CHECK(false, "_coefficients_probe: kind must be one of perturb, loss, mixed, half_step, score_step, affine; got '",
              kind, "'");
}

// The coefficient functions of cld_coefficients.h evaluated on the host, for tests against
// cld_fast/sde.py: (N, K) float64, one row per (t[i], h[i]). `code` is the objective (perturb), the
// weighting (loss) or the affine kind (affine); `mixed` folds the mixed score (score_step, affine);
// `objective` and `output` select the loss and score ("mixed") coefficients.
at::Tensor coefficients_probe(const std::string& kind, const at::Tensor& t, const at::Tensor& h,
                              const std::vector<double>& params, int64_t code, bool mixed, int64_t objective,
                              int64_t output) {
  TORCH_CHECK(params.size() == cld::kNumParams, "_coefficients_probe: params must hold ", int(cld::kNumParams),
              " values (", "beta0, beta1, m_inv, gamma, numerical_eps), got ", params.size());
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kDouble && t.device().is_cpu(),
              "_coefficients_probe: t must be a 1-D float64 CPU tensor");
  TORCH_CHECK(h.sizes() == t.sizes() && h.scalar_type() == at::kDouble && h.device().is_cpu(),
              "_coefficients_probe: h must be a float64 CPU tensor of t's shape");
  const cld::Params p = cld::params_from(params.data());
  const auto ta = t.accessor<double, 1>();
  const auto ha = h.accessor<double, 1>();
  const int64_t n = t.size(0);
  const int obj = static_cast<int>(objective), outp = static_cast<int>(output);
  const int64_t cols =
      static_cast<int64_t>(coefficient_row(kind, p, 0.5, 0.1, static_cast<int>(code), mixed, obj, outp).size());
  at::Tensor res = at::empty({n, cols}, at::kDouble);
  auto r = res.accessor<double, 2>();
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<double> row = coefficient_row(kind, p, ta[i], ha[i], static_cast<int>(code), mixed, obj, outp);
    for (int64_t j = 0; j < cols; ++j) r[i][j] = row[j];
  }
  return res;
}

pybind11::dict codes(const char* const* names, int n) {
  pybind11::dict d;
  for (int i = 0; i < n; ++i) d[names[i]] = i;
  return d;
}

// The layout compiled into the kernels, for a test against cld_fast.sde / cld_fast.philox.
pybind11::dict layout() {
  pybind11::list params;
  for (int i = 0; i < cld::kNumParams; ++i) params.append(cld::kParamNames[i]);
  pybind11::dict tags;
  tags["perturb"] = cld::kTagPerturb;
  tags["half_step"] = cld::kTagHalfStep;
  tags["sscs"] = cld::kTagSscs;
  tags["affine"] = cld::kTagAffine;
  tags["inpaint"] = cld::kTagInpaint;
  pybind11::dict d;
  d["params"] = params;
  d["objective"] = codes(cld::kObjectiveNames, cld::kNumObjectives);
  d["weighting"] = codes(cld::kWeightingNames, cld::kNumWeightings);
  d["output"] = codes(cld::kOutputNames, cld::kNumOutputs);
  d["kind"] = codes(cld::kAffineKindNames, cld::kNumAffineKinds);
  d["philox_tags"] = tags;
  return d;
}

bool with_cuda() {
#ifdef CLD_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cld_fast compiled kernels: loading this module registers the torch.ops.cld_fast.* implementations";
  m.def("with_cuda", &with_cuda, "True when the extension was compiled with the CUDA kernels");
  m.attr("has_cpu_kernels") = pybind11::bool_(cld::cpu_kernels_compiled());
  m.def("_philox_probe", &philox_probe, pybind11::arg("seed"), pybind11::arg("start"), pybind11::arg("n"),
        pybind11::arg("step"), pybind11::arg("tag"),
        "(bits (4, n) int64, uniforms (4, n) float32) of the compiled Philox contract; for tests");
  m.def("_philox_normals", &philox_normals_probe, pybind11::arg("seed"), pybind11::arg("start"), pybind11::arg("n"),
        pybind11::arg("step"), pybind11::arg("tag"), pybind11::arg("lanes") = -1,
        "(4, n) float32 normals the CPU kernels draw (lanes: 16, 8, 0 for scalar, -1 the widest); for tests");
  m.def("_coefficients_probe", &coefficients_probe, pybind11::arg("kind"), pybind11::arg("t"), pybind11::arg("h"),
        pybind11::arg("params"), pybind11::arg("code") = 0, pybind11::arg("mixed") = false,
        pybind11::arg("objective") = 0, pybind11::arg("output") = 0,
        "(N, K) float64 coefficients of csrc/include/cld_coefficients.h at (t, h); for tests");
  m.def("_take_nonfinite_inputs", &cld::take_nonfinite_inputs,
        "bits of the inputs of this thread's last CPU perturb that held NaN or inf (1: x0, 2: eps), then 0");
  m.def("_layout", &layout, "parameter order, enum codes and Philox tags compiled into the kernels; for tests");
}
