// The cld_fast op schemas (namespace cld_fast) and the Python module cld_fast._C.
//
// Importing cld_fast._C runs the static registrations: the schemas below, the CPU kernels
// (csrc/cpu/ops_cpu.cpp) and, in a CUDA build, the CUDA kernels (csrc/cuda/ops_cuda.cpp binding the
// kernels of csrc/cuda/*.cu). Python calls them as torch.ops.cld_fast.<op>; the semantics of every
// op are those of the same-named function of cld_fast/backends/torch_backend.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "cld_philox.h"

namespace cld {
bool cpu_kernels_compiled();  // csrc/cpu/ops_cpu.cpp
}

TORCH_LIBRARY(cld_fast, m) {
  m.def("perturb(Tensor x0, Tensor? v0, Tensor coef, Tensor? eps, Tensor? seed, Tensor(a!) out) -> ()");
  m.def("hsm_loss_fwd(Tensor out, Tensor u, Tensor coef, Tensor? eps_v, Tensor? seed) -> Tensor");
  m.def("hsm_loss_bwd(Tensor grad, Tensor out, Tensor u, Tensor coef, Tensor? eps_v, Tensor? seed) -> Tensor");
  m.def("mixed_score(Tensor out, Tensor u, Tensor coef) -> Tensor");
  m.def("half_step_(Tensor(a!) u, Tensor table, Tensor step, Tensor? eps, Tensor? seed) -> ()");
  m.def("sscs_step_(Tensor(a!) u, Tensor y, Tensor table, Tensor step, Tensor? eps, Tensor? seed) -> ()");
  m.def("affine_step(Tensor u, Tensor y, Tensor table, Tensor step, Tensor? eps, Tensor? seed, Tensor(a!) out) -> ()");
}

namespace {
// The Philox contract as compiled into the kernels (cld_philox.h), for tests: the four uint32 outputs
// (as int64) and their uniforms for element indices start .. start + n - 1. Returns ((4, n) int64,
// (4, n) float32).
std::pair<at::Tensor, at::Tensor> philox_probe(int64_t seed, int64_t start, int64_t n, int64_t step, int64_t tag) {
  TORCH_CHECK(n >= 0, "_philox_probe: n must be >= 0, got ", n);
  TORCH_CHECK(tag >= 0 && tag <= 0xffffffffLL, "_philox_probe: tag must fit in 32 bits, got ", tag);
  at::Tensor bits = at::empty({4, n}, at::kLong);
  at::Tensor unif = at::empty({4, n}, at::kFloat);
  auto b = bits.accessor<int64_t, 2>();
  auto u = unif.accessor<float, 2>();
  for (int64_t j = 0; j < n; ++j) {
    const cld::Philox4 r = cld::philox_bits(seed, start + j, step, static_cast<uint32_t>(tag));
    const uint32_t w[4] = {r.r0, r.r1, r.r2, r.r3};
    for (int k = 0; k < 4; ++k) {
      b[k][j] = static_cast<int64_t>(w[k]);
      u[k][j] = cld::uniform_from_bits(w[k]);
    }
  }
  return {bits, unif};
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
  m.doc() = "cld_fast compiled kernels: importing this module registers torch.ops.cld_fast.*";
  m.def("with_cuda", &with_cuda, "True when the extension was compiled with the CUDA kernels");
  m.attr("has_cpu_kernels") = pybind11::bool_(cld::cpu_kernels_compiled());
  m.def("_philox_probe", &philox_probe, pybind11::arg("seed"), pybind11::arg("start"), pybind11::arg("n"),
        pybind11::arg("step"), pybind11::arg("tag"),
        "(bits (4, n) int64, uniforms (4, n) float32) of the compiled Philox contract; for tests");
}
