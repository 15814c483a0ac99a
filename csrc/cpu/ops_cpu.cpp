// CPU kernels of the cld_fast ops: one fused OpenMP pass (at::parallel_for, OpenMP-backed) per op.
//
// Semantics are those of cld_fast/backends/torch_backend.py, evaluated in the same order so that the
// explicit-noise paths agree with it to float rounding; the seed paths draw noise by the Philox
// contract of csrc/include/cld_philox.h (the same uniform bits as cld_fast/philox.py).
//
// Layout: u (B, 2, D) contiguous (x = u[:, 0], v = u[:, 1]); network outputs (B, D); per-sample
// coefficient tables (B, K); per-step tables (S, K) with the row picked by `step`. State dtype T is
// float or double; network outputs O are float, double, BFloat16 or Half and are converted to T (or
// to the loss accumulation type A) on load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cld_checks.h"
#include "cld_philox.h"

namespace cld {
namespace cpu {
namespace {

enum class Noise { None, Eps, Seed };

template <Noise M>
using NoiseC = std::integral_constant<Noise, M>;

// Calls f(NoiseC<mode>{}) so that the inner loops are specialised per noise mode.
template <typename F>
void dispatch_noise(Noise mode, const F& f) {
  switch (mode) {
    case Noise::None:
      f(NoiseC<Noise::None>{});
      break;
    case Noise::Eps:
      f(NoiseC<Noise::Eps>{});
      break;
    case Noise::Seed:
      f(NoiseC<Noise::Seed>{});
      break;
  }
}

Noise noise_mode(const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  return eps.has_value() ? Noise::Eps : (seed.has_value() ? Noise::Seed : Noise::None);
}

int64_t read_i64(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int64_t>()[0] : 0; }

// The table row picked by `step`, range-checked (the CPU can afford the check).
int64_t read_step(const at::Tensor& step, const at::Tensor& table, const char* op) {
  const int64_t k = step.data_ptr<int64_t>()[0];
  TORCH_CHECK(k >= 0 && k < table.size(0), op, ": step = ", k, " is out of range for table with ", table.size(0),
              " rows");
  return k;
}

// Elementwise work per element is small without Philox and ~100 flops with it.
int64_t grain_for(Noise mode) { return mode == Noise::Seed ? 2048 : 32768; }

// Runs f(b, d0, d1) over the (B, D) index space in parallel chunks of flat indices b * D + d; each
// call covers a contiguous piece [d0, d1) of one row b.
template <typename F>
void for_rows(int64_t B, int64_t D, int64_t grain, const F& f) {
  const int64_t n = B * D;
  if (n == 0) return;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / D;
    int64_t d = begin - b * D;
    for (int64_t i = begin; i < end;) {
      const int64_t d1 = std::min(D, d + (end - i));
      f(b, d, d1);
      i += d1 - d;
      ++b;
      d = 0;
    }
  });
}

// ---- perturb ----------------------------------------------------------------------------------

template <typename T>
void perturb_kernel(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& coef,
                    const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                    const at::Tensor& out, int64_t B, int64_t D) {
  const T* px = x0.data_ptr<T>();
  const T* pv = v0.has_value() ? v0->data_ptr<T>() : nullptr;
  const T* pc = coef.data_ptr<T>();
  const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  const int64_t s = read_i64(seed);
  const Noise mode = noise_mode(eps, seed);
  dispatch_noise(mode, [&](auto M) {
    constexpr Noise mode_c = decltype(M)::value;
    for_rows(B, D, grain_for(mode_c), [&](int64_t b, int64_t d0, int64_t d1) {
      const T* c = pc + b * 7;
      const T axx = c[0], axv = c[1], avx = c[2], avv = c[3], l11 = c[4], l21 = c[5], l22 = c[6];
      const T* xr = px + b * D;
      const T* vr = pv ? pv + b * D : nullptr;
      T* ox = po + b * 2 * D;
      T* ov = ox + D;
      for (int64_t d = d0; d < d1; ++d) {
        const T x = xr[d];
        T mx = axx * x;
        T mv = avx * x;
        if (vr) {
          const T v = vr[d];
          mx = mx + axv * v;
          mv = mv + avv * v;
        }
        if constexpr (mode_c == Noise::None) {
          ox[d] = mx;
          ov[d] = mv;
        } else {
          T ex, ev;
          if constexpr (mode_c == Noise::Eps) {
            ex = pe[b * 2 * D + d];
            ev = pe[b * 2 * D + D + d];
          } else {
            float z0, z1;
            normals2(s, b * D + d, 0, kTagPerturb, z0, z1);
            ex = static_cast<T>(z0);
            ev = static_cast<T>(z1);
          }
          ox[d] = mx + l11 * ex;
          ov[d] = mv + l21 * ex + l22 * ev;
        }
      }
    });
  });
}

void perturb_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& coef,
                 const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed, const at::Tensor& out) {
  const Dims n = check_perturb(x0, v0, coef, eps, seed, out, /*allow_double=*/true);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cld_fast::perturb", [&] {
    perturb_kernel<scalar_t>(x0, v0, coef, eps, seed, out, n.B, n.D);
  });
}

// ---- HSM loss ---------------------------------------------------------------------------------
// r = out + c v - eps_v (in the accumulation type A), loss_b = w_b * sum_d r^2, grad_out = 2 w g r.

// Elements of one row summed by one task; per-(sample, chunk) partial sums are added in chunk order,
// so the result does not depend on the number of threads.
constexpr int64_t kLossChunk = 8192;

template <typename T, typename O, typename A, Noise M>
inline A loss_residual(const O* po, const T* pu, const A* pe, int64_t s, A c, int64_t b, int64_t D, int64_t d) {
  A e;
  if constexpr (M == Noise::Eps) {
    e = pe[b * D + d];
  } else {
    float z0, z1;
    normals2(s, b * D + d, 0, kTagPerturb, z0, z1);
    e = static_cast<A>(z1);
  }
  const A v = static_cast<A>(pu[b * 2 * D + D + d]);
  return static_cast<A>(po[b * D + d]) + c * v - e;
}

template <typename T, typename O, typename A>
at::Tensor hsm_loss_fwd_kernel(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef,
                               const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                               int64_t B, int64_t D) {
  at::Tensor loss = at::empty({B}, u.options().dtype(c10::CppTypeToScalarType<A>::value));
  if (B == 0) return loss;
  const O* po = out.data_ptr<O>();
  const T* pu = u.data_ptr<T>();
  const T* pc = coef.data_ptr<T>();
  const A* pe = eps_v.has_value() ? eps_v->data_ptr<A>() : nullptr;
  A* pl = loss.data_ptr<A>();
  const int64_t s = read_i64(seed);
  const int64_t nch = std::max<int64_t>(1, (D + kLossChunk - 1) / kLossChunk);
  std::vector<double> partial(static_cast<size_t>(B * nch), 0.0);
  const Noise mode = eps_v.has_value() ? Noise::Eps : Noise::Seed;
  dispatch_noise(mode, [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    if constexpr (M != Noise::None) {
      const int64_t grain = std::max<int64_t>(1, grain_for(M) / kLossChunk);
      at::parallel_for(0, B * nch, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t) {
          const int64_t b = t / nch;
          const int64_t d0 = (t - b * nch) * kLossChunk;
          const int64_t d1 = std::min(D, d0 + kLossChunk);
          const A c = static_cast<A>(pc[b * 2]);
          double acc = 0.0;
          for (int64_t d = d0; d < d1; ++d) {
            const A r = loss_residual<T, O, A, M>(po, pu, pe, s, c, b, D, d);
            acc += static_cast<double>(r * r);
          }
          partial[t] = acc;
        }
      });
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t k = 0; k < nch; ++k) acc += partial[b * nch + k];
    pl[b] = static_cast<A>(pc[b * 2 + 1]) * static_cast<A>(acc);
  }
  return loss;
}

template <typename T, typename O, typename A>
at::Tensor hsm_loss_bwd_kernel(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u,
                               const at::Tensor& coef, const std::optional<at::Tensor>& eps_v,
                               const std::optional<at::Tensor>& seed, int64_t B, int64_t D) {
  at::Tensor res = at::empty({B, D}, out.options());
  const A* pg = grad.data_ptr<A>();
  const O* po = out.data_ptr<O>();
  const T* pu = u.data_ptr<T>();
  const T* pc = coef.data_ptr<T>();
  const A* pe = eps_v.has_value() ? eps_v->data_ptr<A>() : nullptr;
  O* pr = res.data_ptr<O>();
  const int64_t s = read_i64(seed);
  const Noise mode = eps_v.has_value() ? Noise::Eps : Noise::Seed;
  dispatch_noise(mode, [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    if constexpr (M != Noise::None) {
      for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
        const A c = static_cast<A>(pc[b * 2]);
        const A scale = static_cast<A>(2) * (static_cast<A>(pc[b * 2 + 1]) * pg[b]);
        for (int64_t d = d0; d < d1; ++d) {
          const A r = loss_residual<T, O, A, M>(po, pu, pe, s, c, b, D, d);
          pr[b * D + d] = static_cast<O>(scale * r);
        }
      });
    }
  });
  return res;
}

// Calls f(T{}, O{}, A{}) for the state dtype of u and the network-output dtype of out.
template <typename F>
void dispatch_loss(const at::Tensor& out, const at::Tensor& u, const F& f) {
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast::hsm_loss", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cld_fast::hsm_loss", [&] {
      using O = scalar_t;
      using A = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<O, double>, double, float>;
      f(T{}, O{}, A{});
    });
  });
}

at::Tensor hsm_loss_fwd_cpu(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef,
                            const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed) {
  const Dims n = check_hsm_loss(std::nullopt, out, u, coef, eps_v, seed, true, "cld_fast::hsm_loss_fwd");
  at::Tensor loss;
  dispatch_loss(out, u, [&](auto t, auto o, auto a) {
    loss = hsm_loss_fwd_kernel<decltype(t), decltype(o), decltype(a)>(out, u, coef, eps_v, seed, n.B, n.D);
  });
  return loss;
}

at::Tensor hsm_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u,
                            const at::Tensor& coef, const std::optional<at::Tensor>& eps_v,
                            const std::optional<at::Tensor>& seed) {
  const Dims n = check_hsm_loss(grad, out, u, coef, eps_v, seed, true, "cld_fast::hsm_loss_bwd");
  at::Tensor res;
  dispatch_loss(out, u, [&](auto t, auto o, auto a) {
    res = hsm_loss_bwd_kernel<decltype(t), decltype(o), decltype(a)>(grad, out, u, coef, eps_v, seed, n.B, n.D);
  });
  return res;
}

// ---- mixed score ------------------------------------------------------------------------------

at::Tensor mixed_score_cpu(const at::Tensor& out, const at::Tensor& u, const at::Tensor& coef) {
  const Dims n = check_mixed_score(out, u, coef, true);
  const int64_t B = n.B, D = n.D;
  at::Tensor res = at::empty({B, D}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast::mixed_score", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cld_fast::mixed_score", [&] {
      using O = scalar_t;
      const O* po = out.data_ptr<O>();
      const T* pu = u.data_ptr<T>();
      const T* pc = coef.data_ptr<T>();
      T* pr = res.data_ptr<T>();
      for_rows(B, D, grain_for(Noise::None), [&](int64_t b, int64_t d0, int64_t d1) {
        const T c0 = pc[b * 2], c1 = pc[b * 2 + 1];
        const T* vr = pu + b * 2 * D + D;
        const O* orow = po + b * D;
        T* rr = pr + b * D;
        for (int64_t d = d0; d < d1; ++d) rr[d] = c0 * vr[d] + c1 * static_cast<T>(orow[d]);
      });
    });
  });
  return res;
}

// ---- sampler steps ----------------------------------------------------------------------------

// One analytic half step with r = (a_xx a_xv a_vx a_vv l11 l21 l22), noise (ex, ev) when NOISY.
template <typename T, bool NOISY>
inline void linear_step(const T* r, T& x, T& v, T ex, T ev) {
  T nx = r[0] * x + r[1] * v;
  T nv = r[2] * x + r[3] * v;
  if constexpr (NOISY) {
    nx = nx + r[4] * ex;
    nv = nv + r[5] * ex + r[6] * ev;
  }
  x = nx;
  v = nv;
}

void half_step_cpu(const at::Tensor& u, const at::Tensor& table, const at::Tensor& step,
                   const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::half_step_";
  const Dims n = check_step(u, nullptr, table, step, eps, seed, 7, 2, true, op);
  const int64_t B = n.B, D = n.D;
  const int64_t k = read_step(step, table, op);
  const int64_t s = read_i64(seed);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast::half_step_", [&] {
    using T = scalar_t;
    T r[7];
    std::copy_n(table.data_ptr<T>() + k * 7, 7, r);
    T* pu = u.data_ptr<T>();
    const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
    dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
      constexpr Noise M = decltype(Mc)::value;
      for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
        T* xr = pu + b * 2 * D;
        T* vr = xr + D;
        for (int64_t d = d0; d < d1; ++d) {
          T x = xr[d], v = vr[d];
          T ex{}, ev{};
          if constexpr (M == Noise::Eps) {
            ex = pe[b * 2 * D + d];
            ev = pe[b * 2 * D + D + d];
          } else if constexpr (M == Noise::Seed) {
            float z0, z1;
            normals2(s, b * D + d, k, kTagHalfStep, z0, z1);
            ex = static_cast<T>(z0);
            ev = static_cast<T>(z1);
          }
          linear_step<T, M != Noise::None>(r, x, v, ex, ev);
          xr[d] = x;
          vr[d] = v;
        }
      });
    });
  });
}

void sscs_step_cpu(const at::Tensor& u, const at::Tensor& y, const at::Tensor& table, const at::Tensor& step,
                   const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed) {
  const char* op = "cld_fast::sscs_step_";
  const Dims n = check_step(u, &y, table, step, eps, seed, 16, 4, true, op);
  const int64_t B = n.B, D = n.D;
  const int64_t k = read_step(step, table, op);
  const int64_t s = read_i64(seed);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast::sscs_step_", [&] {
    using T = scalar_t;
    T r[16];
    std::copy_n(table.data_ptr<T>() + k * 16, 16, r);
    T* pu = u.data_ptr<T>();
    const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cld_fast::sscs_step_", [&] {
      using O = scalar_t;
      const O* py = y.data_ptr<O>();
      dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
        constexpr Noise M = decltype(Mc)::value;
        for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
          T* xr = pu + b * 2 * D;
          T* vr = xr + D;
          const O* yr = py + b * D;
          for (int64_t d = d0; d < d1; ++d) {
            T z[4] = {};
            if constexpr (M == Noise::Eps) {
              for (int j = 0; j < 4; ++j) z[j] = pe[(b * 4 + j) * D + d];
            } else if constexpr (M == Noise::Seed) {
              float zf[4];
              normals4(s, b * D + d, k, kTagSscs, zf);
              for (int j = 0; j < 4; ++j) z[j] = static_cast<T>(zf[j]);
            }
            T x = xr[d];
            T v = r[0] * vr[d] + r[1] * static_cast<T>(yr[d]);
            linear_step<T, M != Noise::None>(r + 2, x, v, z[0], z[1]);
            linear_step<T, M != Noise::None>(r + 9, x, v, z[2], z[3]);
            xr[d] = x;
            vr[d] = v;
          }
        });
      });
    });
  });
}

void affine_step_cpu(const at::Tensor& u, const at::Tensor& y, const at::Tensor& table, const at::Tensor& step,
                     const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                     const at::Tensor& out) {
  const char* op = "cld_fast::affine_step";
  const Dims n = check_affine(u, y, table, step, eps, seed, out, true);
  const int64_t B = n.B, D = n.D;
  const int64_t k = read_step(step, table, op);
  const int64_t s = read_i64(seed);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cld_fast::affine_step", [&] {
    using T = scalar_t;
    T r[6];
    std::copy_n(table.data_ptr<T>() + k * 6, 6, r);
    const T* pu = u.data_ptr<T>();  // may alias po (an in-place step): each element is read, then written
    T* po = out.data_ptr<T>();
    const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cld_fast::affine_step", [&] {
      using O = scalar_t;
      const O* py = y.data_ptr<O>();
      dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
        constexpr Noise M = decltype(Mc)::value;
        for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
          const T* xr = pu + b * 2 * D;
          const T* vr = xr + D;
          T* oxr = po + b * 2 * D;
          T* ovr = oxr + D;
          const O* yr = py + b * D;
          for (int64_t d = d0; d < d1; ++d) {
            const T x = xr[d], v = vr[d];
            const T nx = r[0] * x + r[1] * v;
            T nv = r[2] * x + r[3] * v + r[4] * static_cast<T>(yr[d]);
            if constexpr (M == Noise::Eps) {
              nv = nv + r[5] * pe[b * D + d];
            } else if constexpr (M == Noise::Seed) {
              nv = nv + r[5] * static_cast<T>(normal_z0(s, b * D + d, k, kTagAffine));
            }
            oxr[d] = nx;
            ovr[d] = nv;
          }
        });
      });
    });
  });
}

}  // namespace
}  // namespace cpu

// Linked into bindings.cpp's module attribute `has_cpu_kernels`.
bool cpu_kernels_compiled() { return true; }

}  // namespace cld

TORCH_LIBRARY_IMPL(cld_fast, CPU, m) {
  m.impl("perturb", &cld::cpu::perturb_cpu);
  m.impl("hsm_loss_fwd", &cld::cpu::hsm_loss_fwd_cpu);
  m.impl("hsm_loss_bwd", &cld::cpu::hsm_loss_bwd_cpu);
  m.impl("mixed_score", &cld::cpu::mixed_score_cpu);
  m.impl("half_step_", &cld::cpu::half_step_cpu);
  m.impl("sscs_step_", &cld::cpu::sscs_step_cpu);
  m.impl("affine_step", &cld::cpu::affine_step_cpu);
}
