// CPU kernels of the cld_fast ops (schemas and torch references: cld_fast/opdefs.py).
//
// Each op computes its coefficients once per sample (perturb, loss, mixed score) or once per call
// (sampler steps) in double with csrc/include/cld_coefficients.h, casts them to the state dtype as
// the references do, and then runs one fused OpenMP pass (at::parallel_for) over the elements,
// evaluated in the references' order so explicit-noise results agree with them to float rounding.
// Seed mode draws noise by the Philox contract of csrc/include/cld_philox.h, a block of a row at a
// time with the vectorised generator of cld_philox_cpu.h, then runs the elementwise update over it.
//
// Layout inside the kernels: u (B, 2, D) contiguous (x = u[:, 0], v = u[:, 1]), network outputs
// (B, D). The bindings at the bottom make inputs contiguous and write non-contiguous in-place
// targets back. State dtype T is float or double; network outputs O are float, double, BFloat16 or
// Half and are converted to T on load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cld_checks.h"
#include "cld_coefficients.h"
#include "cld_philox.h"
#include "cld_philox_cpu.h"

// The elementwise loops below are written for the vectoriser: pointers and coefficients in locals,
// one branch-free body per (noise, guidance, v0) variant, and `omp simd` (built with -fopenmp-simd)
// to state that an iteration reads and writes only its own element, which the compiler cannot prove
// for an in-place state. Without it GCC keeps these loops scalar.
#define CLD_SIMD _Pragma("omp simd")
#define CLD_SIMD_SUM(acc) _Pragma("omp simd reduction(+ : acc)")

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

Params read_params(const at::Tensor& sde) {
  const auto a = sde.accessor<double, 1>();
  double p[kNumParams];
  for (int i = 0; i < kNumParams; ++i) p[i] = a[i];
  return params_from(p);
}

// Element i of a 1-D float32 / float64 tensor of any stride, as double (as the references' .to(float64)).
double time_at(const at::Tensor& t, int64_t i) {
  const int64_t off = i * t.stride(0);
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[off]
                                        : static_cast<double>(t.const_data_ptr<float>()[off]);
}

// The output of an out-of-place op is fresh memory that the kernel is about to write in full. Its
// first touch faults once per 4 KiB page, which at 16M float32 elements costs as much as the
// kernel's own pass; asking for transparent huge pages (honoured where
// /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always") cuts the faults 512-fold.
// Only the 2 MiB-aligned interior of the buffer is advised; the advice is a hint, so its failure
// (a file-backed or foreign buffer) changes nothing.
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t n = out.nbytes();
  if (n < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + n) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

// Elementwise work per element is small without Philox and ~100 flops with it.
int64_t grain_for(Noise mode) { return mode == Noise::Seed ? 4096 : 32768; }

#define CLD_INLINE_LAMBDA __attribute__((always_inline))

// Runs f() (an always-inline loop) compiled for AVX-512 or AVX2 + FMA when the CPU has them, as the
// noise lanes are chosen: this file otherwise targets baseline x86-64, whose loops do 4 floats per
// instruction. The vectoriser runs after f is inlined, so it sees the wider target.
#if CLD_PHILOX_X86
#if defined(__clang__)
#define CLD_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512dq"), min_vector_width(512)))
#else
#define CLD_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512dq,prefer-vector-width=512")))
#endif
template <typename F>
CLD_TARGET_AVX512 void run_avx512(const F& f) {
  f();
}
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
#endif
template <typename F>
inline void wide(const F& f) {
#if CLD_PHILOX_X86
  const int lanes = philox_lanes_available();
  if (lanes == 16) return run_avx512(f);
  if (lanes == 8) return run_avx2(f);
#endif
  f();
}

// Elements whose normals are drawn at once (on the stack, NZ * 1 KiB).
constexpr int64_t kNoiseBlock = 256;

// Asks for the cache lines of p[0 .. n) ahead of their use (WRITE: lines the next pass writes), so
// that a row's memory traffic overlaps the drawing of the normals instead of following it.
template <bool WRITE, typename T>
inline void prefetch_lines(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += static_cast<int64_t>(64 / sizeof(T))) __builtin_prefetch(p + i, WRITE ? 1 : 0, 3);
}

// Calls f(lo, hi, z) for consecutive blocks [lo, hi) of [d0, d1) of row b, with z[j][d - lo] the
// normal z_j (j < NZ) of element b * D + d drawn by the contract (seed s, step k, tag).
template <int NZ, typename F>
inline void with_normals(int64_t s, int64_t row_start, int64_t d0, int64_t d1, int64_t k, uint32_t tag, const F& f) {
  alignas(64) float buf[NZ][kNoiseBlock];
  float* z[NZ];
  for (int j = 0; j < NZ; ++j) z[j] = buf[j];
  for (int64_t lo = d0; lo < d1; lo += kNoiseBlock) {
    const int64_t hi = std::min(d1, lo + kNoiseBlock);
    philox_normals<NZ>(s, row_start + lo, hi - lo, k, tag, z);
    f(lo, hi, static_cast<const float* const*>(z));
  }
}

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

// (B, K) per-sample coefficients in T: row b is f(b) (K doubles), computed once per sample.
template <typename T, int K, typename F>
std::vector<T> per_sample(int64_t B, const F& f) {
  std::vector<T> table(static_cast<size_t>(B * K));
  at::parallel_for(0, B, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const auto row = f(b);
      for (int k = 0; k < K; ++k) table[b * K + k] = static_cast<T>(row[k]);
    }
  });
  return table;
}

template <int K>
struct Row {
  double v[K];
  double operator[](int k) const { return v[k]; }
};

// Which checked inputs of this thread's last perturb held NaN or inf (kNonfinite* bits): the cpu backend
// reads it after the call (cld_fast._C._take_nonfinite_inputs) instead of reading the inputs again.
thread_local int64_t last_nonfinite = 0;
constexpr int64_t kNonfiniteFirst = 1;   // perturb: x0
constexpr int64_t kNonfiniteSecond = 2;  // perturb: eps

// ---- perturb ----------------------------------------------------------------------------------

// n elements of perturb's update: (x, v) = A (x0, v0) + L (e0, e1), v0 and the noise optional. Also
// adds x * 0 over x0 to bad_x and over the explicit noise (CHECK_E) to bad_e: NaN if any value read is
// NaN or inf, else 0 (the value check of the inputs, fused into the pass that reads them).
template <typename T, bool HAS_V, bool NOISY, bool CHECK_E, typename E>
CLD_ALWAYS_INLINE void perturb_piece_body(int64_t n, const T* x0, const T* v0, const E* e0, const E* e1, T* ox, T* ov, const T* c,
                          T& bad_x, T& bad_e) {
  const T axx = c[0], axv = c[1], avx = c[2], avv = c[3], l11 = c[4], l21 = c[5], l22 = c[6];
  T sx = T(0), se = T(0);
  _Pragma("omp simd reduction(+ : sx, se)")
  for (int64_t i = 0; i < n; ++i) {
    const T x = x0[i];
    sx += x * T(0);
    T mx = axx * x;
    T mv = avx * x;
    if constexpr (HAS_V) {
      const T v = v0[i];
      mx = mx + axv * v;
      mv = mv + avv * v;
    }
    if constexpr (NOISY) {
      const T ex = static_cast<T>(e0[i]), ev = static_cast<T>(e1[i]);
      if constexpr (CHECK_E) se += ex * T(0) + ev * T(0);
      mx = mx + l11 * ex;
      mv = mv + l21 * ex + l22 * ev;
    }
    ox[i] = mx;
    ov[i] = mv;
  }
  bad_x += sx;
  bad_e += se;
}

template <typename T, bool HAS_V, bool NOISY, bool CHECK_E, typename E>
inline void perturb_piece(int64_t n, const T* x0, const T* v0, const E* e0, const E* e1, T* ox, T* ov, const T* c,
                          T& bad_x, T& bad_e) {
  wide([&]() CLD_INLINE_LAMBDA { perturb_piece_body<T, HAS_V, NOISY, CHECK_E, E>(n, x0, v0, e0, e1, ox, ov, c, bad_x, bad_e); });
}

template <typename T>
void perturb_kernel(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& t, const Params& p,
                    int objective, const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                    const at::Tensor& out, int64_t B, int64_t D) {
  const std::vector<T> coef = per_sample<T, 7>(B, [&](int64_t b) {
    const PerturbCoefficients k = perturb_coefficients(p, time_at(t, b), objective);
    return Row<7>{{k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.l11, k.l21, k.l22}};
  });
  const T* px = x0.data_ptr<T>();
  const T* pv = v0.has_value() ? v0->data_ptr<T>() : nullptr;
  const T* pc = coef.data();
  const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  const int64_t s = read_i64(seed);
  std::atomic<int64_t> nonfinite{0};
  const auto run = [&](auto has_v) {
    constexpr bool HV = decltype(has_v)::value;
    dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
      constexpr Noise M = decltype(Mc)::value;
      for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
        const T* c = pc + b * 7;
        const T* xr = px + b * D;
        const T* vr = HV ? pv + b * D : nullptr;
        T* ox = po + b * 2 * D;
        T* ov = ox + D;
        T bad_x = T(0), bad_e = T(0);
        if constexpr (M == Noise::Seed) {
          with_normals<2>(s, b * D, d0, d1, 0, kTagPerturb, [&](int64_t lo, int64_t hi, const float* const* z) {
            perturb_piece<T, HV, true, false, float>(hi - lo, xr + lo, HV ? vr + lo : nullptr, z[0], z[1], ox + lo,
                                                     ov + lo, c, bad_x, bad_e);
            // The inputs and outputs of the block after the next one, while its normals are drawn.
            const int64_t ahead = std::min(d1, hi + (hi - lo)), m = std::min(d1, ahead + (hi - lo)) - ahead;
            prefetch_lines<false>(xr + ahead, m);
            if constexpr (HV) prefetch_lines<false>(vr + ahead, m);
            prefetch_lines<true>(ox + ahead, m);
            prefetch_lines<true>(ov + ahead, m);
          });
        } else if constexpr (M == Noise::Eps) {
          const T* er = pe + b * 2 * D;
          perturb_piece<T, HV, true, true, T>(d1 - d0, xr + d0, HV ? vr + d0 : nullptr, er + d0, er + D + d0, ox + d0,
                                              ov + d0, c, bad_x, bad_e);
        } else {
          perturb_piece<T, HV, false, false, T>(d1 - d0, xr + d0, HV ? vr + d0 : nullptr, nullptr, nullptr, ox + d0,
                                                ov + d0, c, bad_x, bad_e);
        }
        if (!std::isfinite(bad_x)) nonfinite.fetch_or(kNonfiniteFirst);
        if (!std::isfinite(bad_e)) nonfinite.fetch_or(kNonfiniteSecond);
      });
    });
  };
  if (pv != nullptr) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  last_nonfinite = nonfinite.load();
}

void perturb_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& v0, const at::Tensor& t, const at::Tensor& sde,
                 int64_t objective, const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                 const at::Tensor& out) {
  const Dims n = check_perturb(x0, v0, t, sde, objective, eps, seed, out, /*cpu=*/true);
  const Params p = read_params(sde);
  const InPlace w(out);
  advise_huge_pages(w.work);
  const at::Tensor xc = x0.contiguous();
  const auto vc = contiguous(v0);
  const auto ec = contiguous(eps);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cld_fast::perturb", [&] {
    perturb_kernel<scalar_t>(xc, vc, t, p, static_cast<int>(objective), ec, seed, w.work, n.B, n.D);
  });
  w.commit();
}

// ---- HSM loss ---------------------------------------------------------------------------------
// In the state dtype T: r = a out + c v - eps_v, loss_b = scale w_b sum_d r^2,
// grad_out = 2 scale w_b grad_b a r.

// Elements of one row summed by one task; per-(sample, chunk) partial sums are added in chunk order,
// and the samples in sample order, so the result does not depend on the number of threads.
constexpr int64_t kLossChunk = 8192;

// Sum over n elements of r^2 (in double), r = a out + c v - eps_v; with GRAD also g = factor r.
template <typename T, typename O, typename E, bool GRAD>
CLD_ALWAYS_INLINE double loss_piece_body(int64_t n, const O* out, const T* v, const E* eps_v, T a, T c, T factor, O* g) {
  double acc = 0.0;
  CLD_SIMD_SUM(acc)
  for (int64_t i = 0; i < n; ++i) {
    const T r = a * static_cast<T>(out[i]) + c * v[i] - static_cast<T>(eps_v[i]);
    acc += static_cast<double>(r * r);
    if constexpr (GRAD) g[i] = static_cast<O>(factor * r);
  }
  return acc;
}

template <typename T, typename O, typename E, bool GRAD>
inline double loss_piece(int64_t n, const O* out, const T* v, const E* eps_v, T a, T c, T factor, O* g) {
  double result;
  wide([&]() CLD_INLINE_LAMBDA { result = loss_piece_body<T, O, E, GRAD>(n, out, v, eps_v, a, c, factor, g); });
  return result;
}

// g = factor r over n elements (the backward).
template <typename T, typename O, typename E>
CLD_ALWAYS_INLINE void loss_grad_piece_body(int64_t n, const O* out, const T* v, const E* eps_v, T a, T c, T factor, O* g) {
  CLD_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T r = a * static_cast<T>(out[i]) + c * v[i] - static_cast<T>(eps_v[i]);
    g[i] = static_cast<O>(factor * r);
  }
}

template <typename T, typename O, typename E>
inline void loss_grad_piece(int64_t n, const O* out, const T* v, const E* eps_v, T a, T c, T factor, O* g) {
  wide([&]() CLD_INLINE_LAMBDA { loss_grad_piece_body<T, O, E>(n, out, v, eps_v, a, c, factor, g); });
}

// For elements [d0, d1) of row b: f(lo, hi, eps_v) over consecutive pieces, eps_v (float or T, indexed
// from lo) from the explicit tensor (M = Eps) or regenerated by the contract (z1 of perturb's draw; M = Seed).
template <typename T, Noise M, typename F>
inline void for_noise_v(const T* pe, int64_t s, int64_t b, int64_t D, int64_t d0, int64_t d1, const F& f) {
  if constexpr (M == Noise::Seed) {
    with_normals<2>(s, b * D, d0, d1, 0, kTagPerturb,
                    [&](int64_t lo, int64_t hi, const float* const* z) { f(lo, hi, z[1]); });
  } else {
    f(d0, d1, pe + b * D + d0);
  }
}

// (c, scale * w, a) per sample in T (the reference casts (c, w, a) to T, then multiplies w by scale).
struct LossMode {
  int weighting, objective, output;
};

template <typename T>
std::vector<T> loss_table(const at::Tensor& t, const Params& p, LossMode m, double scale, int64_t B) {
  std::vector<T> table = per_sample<T, 3>(B, [&](int64_t b) {
    const LossCoefficients k = loss_coefficients(p, time_at(t, b), m.weighting, m.objective, m.output);
    return Row<3>{{k.c, k.w, k.a}};
  });
  for (int64_t b = 0; b < B; ++b) table[b * 3 + 1] = table[b * 3 + 1] * static_cast<T>(scale);
  return table;
}

// With grad_out (B, D) in O: also writes d loss / d out for a unit upstream gradient,
// 2 scale w a r, from the same residuals (eps_v drawn once for both).
template <typename T, typename O>
at::Tensor hsm_loss_fwd_kernel(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const Params& p,
                               LossMode mode, double scale, int64_t reduction, const std::optional<at::Tensor>& eps_v,
                               const std::optional<at::Tensor>& seed, int64_t B, int64_t D,
                               const at::Tensor* grad_out = nullptr) {
  const std::vector<T> cw = loss_table<T>(t, p, mode, scale, B);
  O* pg = grad_out ? grad_out->data_ptr<O>() : nullptr;
  const O* po = out.data_ptr<O>();
  const T* pu = u.data_ptr<T>();
  const T* pe = eps_v.has_value() ? eps_v->data_ptr<T>() : nullptr;
  const int64_t s = read_i64(seed);
  const int64_t nch = std::max<int64_t>(1, (D + kLossChunk - 1) / kLossChunk);
  std::vector<double> partial(static_cast<size_t>(B * nch), 0.0);
  dispatch_noise(eps_v.has_value() ? Noise::Eps : Noise::Seed, [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    if constexpr (M != Noise::None) {
      const int64_t grain = std::max<int64_t>(1, grain_for(M) / kLossChunk);
      at::parallel_for(0, B * nch, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) {
          const int64_t b = j / nch;
          const int64_t d0 = (j - b * nch) * kLossChunk;
          const int64_t d1 = std::min(D, d0 + kLossChunk);
          const T c = cw[b * 3], a = cw[b * 3 + 2];
          const T factor = static_cast<T>(2) * (cw[b * 3 + 1] * static_cast<T>(1)) * a;  // as the backward, grad 1
          const O* orow = po + b * D;
          const T* vrow = pu + b * 2 * D + D;
          O* grow = pg ? pg + b * D : nullptr;
          double acc = 0.0;
          for_noise_v<T, M>(pe, s, b, D, d0, d1, [&](int64_t lo, int64_t hi, const auto* e) {
            using E = std::remove_cv_t<std::remove_pointer_t<decltype(e)>>;
            if (grow) {
              acc += loss_piece<T, O, E, true>(hi - lo, orow + lo, vrow + lo, e, a, c, factor, grow + lo);
            } else {
              acc += loss_piece<T, O, E, false>(hi - lo, orow + lo, vrow + lo, e, a, c, factor, nullptr);
            }
          });
          partial[j] = acc;
        }
      });
    }
  });
  at::Tensor loss = reduction == 1 ? at::empty({}, u.options()) : at::empty({B}, u.options());
  T* pl = loss.data_ptr<T>();
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t k = 0; k < nch; ++k) acc += partial[b * nch + k];
    const T per_sample_loss = cw[b * 3 + 1] * static_cast<T>(acc);
    if (reduction == 1) {
      total += static_cast<double>(per_sample_loss);
    } else {
      pl[b] = per_sample_loss;
    }
  }
  if (reduction == 1) pl[0] = static_cast<T>(total);
  return loss;
}

template <typename T, typename O>
at::Tensor hsm_loss_bwd_kernel(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u, const at::Tensor& t,
                               const Params& p, LossMode mode, double scale, const std::optional<at::Tensor>& eps_v,
                               const std::optional<at::Tensor>& seed, int64_t B, int64_t D) {
  std::vector<T> cw = loss_table<T>(t, p, mode, scale, B);
  const T* pg = grad.data_ptr<T>();
  const int64_t g_stride = grad.dim() == 0 ? 0 : 1;
  for (int64_t b = 0; b < B; ++b) {
    cw[b * 3 + 1] = static_cast<T>(2) * (cw[b * 3 + 1] * pg[b * g_stride]) * cw[b * 3 + 2];
  }
  at::Tensor res = at::empty({B, D}, out.options());
  advise_huge_pages(res);
  const O* po = out.data_ptr<O>();
  const T* pu = u.data_ptr<T>();
  const T* pe = eps_v.has_value() ? eps_v->data_ptr<T>() : nullptr;
  O* pr = res.data_ptr<O>();
  const int64_t s = read_i64(seed);
  dispatch_noise(eps_v.has_value() ? Noise::Eps : Noise::Seed, [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    if constexpr (M != Noise::None) {
      for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
        const T c = cw[b * 3], a = cw[b * 3 + 2];
        const T factor = cw[b * 3 + 1];
        const O* orow = po + b * D;
        const T* vrow = pu + b * 2 * D + D;
        O* rrow = pr + b * D;
        for_noise_v<T, M>(pe, s, b, D, d0, d1, [&](int64_t lo, int64_t hi, const auto* e) {
          using E = std::remove_cv_t<std::remove_pointer_t<decltype(e)>>;
          loss_grad_piece<T, O, E>(hi - lo, orow + lo, vrow + lo, e, a, c, factor, rrow + lo);
        });
      });
    }
  });
  return res;
}

// Calls f(T{}, O{}) for the state dtype of u and the network-output dtype of out (both checked).
template <typename F>
void dispatch_state_net(const at::Tensor& u, const at::Tensor& out, const F& f) {
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast state", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cld_fast network output", [&] {
      using O = scalar_t;
      f(T{}, O{});
    });
  });
}

at::Tensor hsm_loss_fwd_cpu(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                            int64_t weighting, double scale, int64_t reduction, const std::optional<at::Tensor>& eps_v,
                            const std::optional<at::Tensor>& seed, int64_t objective, int64_t output) {
  const char* op = "cld_fast::hsm_loss_fwd";
  const Dims n = check_hsm_loss(nullptr, out, u, t, sde, weighting, eps_v, seed, objective, output, true, op);
  const LossMode mode{static_cast<int>(weighting), static_cast<int>(objective), static_cast<int>(output)};
  check_reduction(reduction, op);
  const Params p = read_params(sde);
  const at::Tensor oc = out.contiguous(), uc = u.contiguous();
  const auto ec = contiguous(eps_v);
  at::Tensor loss;
  dispatch_state_net(u, out, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    loss = hsm_loss_fwd_kernel<T, O>(oc, uc, t, p, mode, scale, reduction, ec, seed, n.B, n.D);
  });
  return loss;
}

at::Tensor hsm_loss_fwd_grad_cpu(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                                 int64_t weighting, double scale, int64_t reduction,
                                 const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                                 int64_t objective, int64_t output, const at::Tensor& grad_out) {
  const char* op = "cld_fast::hsm_loss_fwd_grad";
  const Dims n = check_hsm_loss(nullptr, out, u, t, sde, weighting, eps_v, seed, objective, output, true, op);
  const LossMode mode{static_cast<int>(weighting), static_cast<int>(objective), static_cast<int>(output)};
  check_reduction(reduction, op);
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == out.scalar_type() && grad_out.dim() == 2 &&
                  grad_out.size(0) == n.B && grad_out.size(1) == n.D,
              op, ": grad_out must be a (", n.B, ", ", n.D, ") CPU tensor of out's dtype, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  const Params p = read_params(sde);
  const at::Tensor oc = out.contiguous(), uc = u.contiguous();
  const auto ec = contiguous(eps_v);
  const InPlace w(grad_out);
  advise_huge_pages(w.work);
  at::Tensor loss;
  dispatch_state_net(u, out, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    loss = hsm_loss_fwd_kernel<T, O>(oc, uc, t, p, mode, scale, reduction, ec, seed, n.B, n.D, &w.work);
  });
  w.commit();
  return loss;
}

at::Tensor hsm_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& u, const at::Tensor& t,
                            const at::Tensor& sde, int64_t weighting, double scale,
                            const std::optional<at::Tensor>& eps_v, const std::optional<at::Tensor>& seed,
                            int64_t objective, int64_t output) {
  const char* op = "cld_fast::hsm_loss_bwd";
  const Dims n = check_hsm_loss(&grad, out, u, t, sde, weighting, eps_v, seed, objective, output, true, op);
  const LossMode mode{static_cast<int>(weighting), static_cast<int>(objective), static_cast<int>(output)};
  const Params p = read_params(sde);
  const at::Tensor gc = grad.contiguous(), oc = out.contiguous(), uc = u.contiguous();
  const auto ec = contiguous(eps_v);
  at::Tensor res;
  dispatch_state_net(u, out, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    res = hsm_loss_bwd_kernel<T, O>(gc, oc, uc, t, p, mode, scale, ec, seed, n.B, n.D);
  });
  return res;
}

// ---- mixed score ------------------------------------------------------------------------------

at::Tensor mixed_score_cpu(const at::Tensor& out, const at::Tensor& u, const at::Tensor& t, const at::Tensor& sde,
                           int64_t objective, int64_t output) {
  const Dims n = check_mixed_score(out, u, t, sde, objective, output, true);
  const int64_t B = n.B, D = n.D;
  const Params p = read_params(sde);
  const at::Tensor oc = out.contiguous(), uc = u.contiguous();
  at::Tensor res = at::empty({B, D}, u.options());
  advise_huge_pages(res);
  dispatch_state_net(u, out, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    const std::vector<T> coef = per_sample<T, 2>(B, [&](int64_t b) {
      const MixedCoefficients m =
          score_coefficients(p, time_at(t, b), static_cast<int>(objective), static_cast<int>(output));
      return Row<2>{{m.c0, m.c1}};
    });
    const O* po = oc.data_ptr<O>();
    const T* pu = uc.data_ptr<T>();
    T* pr = res.data_ptr<T>();
    for_rows(B, D, grain_for(Noise::None), [&](int64_t b, int64_t d0, int64_t d1) {
      const T c0 = coef[b * 2], c1 = coef[b * 2 + 1];
      const T* vr = pu + b * 2 * D + D;
      const O* orow = po + b * D;
      T* rr = pr + b * D;
      CLD_SIMD
      for (int64_t d = d0; d < d1; ++d) rr[d] = c0 * vr[d] + c1 * static_cast<T>(orow[d]);
    });
  });
  return res;
}

// ---- sampler steps ----------------------------------------------------------------------------

// The step index, range-checked on the host (the CPU can afford it), and the grid's size.
struct StepAt {
  int64_t k, n_ts;
};

StepAt read_step(const at::Tensor& step, const at::Tensor& ts, bool reads_next, const char* op) {
  const StepAt s{step.data_ptr<int64_t>()[0], ts.size(0)};
  check_step_range(s.k, s.n_ts, reads_next, op);
  return s;
}

// A half step (a_xx a_xv a_vx a_vv l11 l21 l22) in T.
template <typename T>
struct LinearT {
  T r[7];
};

template <typename T>
LinearT<T> to_state(const HalfStep& h) {
  return LinearT<T>{{static_cast<T>(h.a_xx), static_cast<T>(h.a_xv), static_cast<T>(h.a_vx), static_cast<T>(h.a_vv),
                     static_cast<T>(h.l11), static_cast<T>(h.l21), static_cast<T>(h.l22)}};
}

// One analytic half step, noise (ex, ev) when NOISY.
template <typename T, bool NOISY>
inline void linear_step(const LinearT<T>& c, T& x, T& v, T ex, T ev) {
  const T* r = c.r;
  T nx = r[0] * x + r[1] * v;
  T nv = r[2] * x + r[3] * v;
  if constexpr (NOISY) {
    nx = nx + r[4] * ex;
    nv = nv + r[5] * ex + r[6] * ev;
  }
  x = nx;
  v = nv;
}

// The network output a step kernel reads (contiguous (B, D) of O): y, or with y_uncond the classifier-free
// combination y + w (y - y_uncond) (opdefs ``guided_output``), each term cast to T first.
template <typename T, typename O>
struct NetOut {
  const O* y = nullptr;
  const O* yu = nullptr;  // nullptr: unguided
  T w = T(0);

  inline T at(int64_t i) const {
    const T a = static_cast<T>(y[i]);
    if (yu == nullptr) return a;
    return a + w * (a - static_cast<T>(yu[i]));
  }
};

// y and y_uncond made contiguous (kept alive by the caller) as a NetOut.
template <typename T, typename O>
NetOut<T, O> make_net_out(const at::Tensor& y, const std::optional<at::Tensor>& y_uncond, double w) {
  NetOut<T, O> n;
  n.y = y.data_ptr<O>();
  n.yu = y_uncond.has_value() ? y_uncond->data_ptr<O>() : nullptr;
  n.w = static_cast<T>(w);
  return n;
}

// The inpainting replacement of a step op (opdefs ``obs``), applied to a row piece [d0, d1) after the
// op's own update of it: an observed element (mask != 0) becomes A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v),
// with the noise from obs's channels 2, 3, else Philox tag INPAINT at step k (normals 2 pair, 2 pair + 1),
// else none; `exact` (a denoising step) sets x = x_obs and keeps v.
template <typename T>
struct Replacer {
  const T* obs = nullptr;
  int64_t channels = 0;
  T c[5] = {};  // a_xx a_vx l11 l21 l22
  bool exact = false, has_seed = false;
  int64_t seed = 0, k = 0;
  int pair = 0;

  inline void put(T* xr, T* vr, int64_t d, T xo, T m, T zx, T zv, bool noisy) const {
    if (m == T(0)) return;
    T rx = c[0] * xo, rv = c[1] * xo;
    if (noisy) {
      rx = rx + c[2] * zx;
      rv = rv + c[3] * zx + c[4] * zv;
    }
    xr[d] = rx;
    vr[d] = rv;
  }

  void apply(T* xr, T* vr, int64_t b, int64_t d0, int64_t d1, int64_t D) const {
    if (obs == nullptr) return;
    const T* xo = obs + b * channels * D;
    const T* m = xo + D;
    if (exact) {
      for (int64_t d = d0; d < d1; ++d)
        if (m[d] != T(0)) xr[d] = xo[d];
    } else if (channels == 4) {
      for (int64_t d = d0; d < d1; ++d) put(xr, vr, d, xo[d], m[d], xo[2 * D + d], xo[3 * D + d], true);
    } else if (has_seed) {
      with_normals<4>(seed, b * D, d0, d1, k, kTagInpaint, [&](int64_t lo, int64_t hi, const float* const* z) {
        for (int64_t d = lo; d < hi; ++d)
          put(xr, vr, d, xo[d], m[d], static_cast<T>(z[2 * pair][d - lo]), static_cast<T>(z[2 * pair + 1][d - lo]),
              true);
      });
    } else {
      for (int64_t d = d0; d < d1; ++d) put(xr, vr, d, xo[d], m[d], T(0), T(0), false);
    }
  }
};

// A Replacer for the contiguous obs (or none), at t_r (exact: the denoising rule).
template <typename T>
Replacer<T> make_replacer(const std::optional<at::Tensor>& obs, const Params& p, double t_r, bool exact,
                          const std::optional<at::Tensor>& seed, int64_t k, int pair) {
  Replacer<T> r;
  if (!obs.has_value()) return r;
  r.obs = obs->data_ptr<T>();
  r.channels = obs->size(1);
  r.exact = exact;
  if (!exact) {
    const Replacement c = replacement_coefficients(p, t_r);
    const double cs[5] = {c.a_xx, c.a_vx, c.l11, c.l21, c.l22};
    for (int i = 0; i < 5; ++i) r.c[i] = static_cast<T>(cs[i]);
  }
  r.has_seed = seed.has_value();
  r.seed = read_i64(seed);
  r.k = k;
  r.pair = pair;
  return r;
}

// n elements of a half step in place, noise (e0, e1) when NOISY.
template <typename T, bool NOISY, typename E>
CLD_ALWAYS_INLINE void half_step_piece_body(int64_t n, T* x, T* v, const E* e0, const E* e1, const LinearT<T>& c) {
  const LinearT<T> r = c;  // a local copy: its coefficients stay in registers across the stores
  CLD_SIMD
  for (int64_t i = 0; i < n; ++i) {
    T xi = x[i], vi = v[i];
    linear_step<T, NOISY>(r, xi, vi, NOISY ? static_cast<T>(e0[i]) : T(0), NOISY ? static_cast<T>(e1[i]) : T(0));
    x[i] = xi;
    v[i] = vi;
  }
}

template <typename T, bool NOISY, typename E>
inline void half_step_piece(int64_t n, T* x, T* v, const E* e0, const E* e1, const LinearT<T>& c) {
  wide([&]() CLD_INLINE_LAMBDA { half_step_piece_body<T, NOISY, E>(n, x, v, e0, e1, c); });
}

template <typename T>
void half_step_kernel(const at::Tensor& u, const LinearT<T>& r, int64_t k, const std::optional<at::Tensor>& eps,
                      const std::optional<at::Tensor>& seed, const Replacer<T>& rep, int64_t B, int64_t D) {
  T* pu = u.data_ptr<T>();
  const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
  const int64_t s = read_i64(seed);
  dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
      T* xr = pu + b * 2 * D;
      T* vr = xr + D;
      if constexpr (M == Noise::Seed) {
        with_normals<2>(s, b * D, d0, d1, k, kTagHalfStep, [&](int64_t lo, int64_t hi, const float* const* z) {
          half_step_piece<T, true, float>(hi - lo, xr + lo, vr + lo, z[0], z[1], r);
        });
      } else if constexpr (M == Noise::Eps) {
        const T* er = pe + b * 2 * D;
        half_step_piece<T, true, T>(d1 - d0, xr + d0, vr + d0, er + d0, er + D + d0, r);
      } else {
        half_step_piece<T, false, T>(d1 - d0, xr + d0, vr + d0, nullptr, nullptr, r);
      }
      rep.apply(xr, vr, b, d0, d1, D);
    });
  });
}

void half_step_cpu(const at::Tensor& u, const at::Tensor& ts, const at::Tensor& step, const at::Tensor& sde,
                   const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                   const std::optional<at::Tensor>& obs) {
  const char* op = "cld_fast::half_step_";
  const Dims n = check_half_step(u, ts, step, sde, eps, seed, obs, true);
  const StepAt s = read_step(step, ts, /*reads_next=*/true, op);
  const double t0 = time_at(ts, s.k), t1 = time_at(ts, s.k + 1);
  const Params p = read_params(sde);
  const HalfStep h = half_step_coefficients(p, t0, t0 - t1);
  const InPlace w(u);
  const auto ec = contiguous(eps);
  const auto oc = contiguous(obs);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cld_fast::half_step_", [&] {
    half_step_kernel<scalar_t>(w.work, to_state<scalar_t>(h), s.k, ec, seed,
                               make_replacer<scalar_t>(oc, p, t1, false, seed, s.k, 1), n.B, n.D);
  });
  w.commit();
}

// The network output of element i as a step reads it: y, or y + w (y - y_uncond) when GUIDED (NetOut::at).
template <typename T, typename O, bool GUIDED>
inline T net_value(const O* y, const O* yu, T w, int64_t i) {
  const T a = static_cast<T>(y[i]);
  if constexpr (GUIDED) return a + w * (a - static_cast<T>(yu[i]));
  return a;
}

// n elements of an SSCS step in place: v <- alpha v + kappa y, then the closing and opening half steps.
template <typename T, typename O, typename E, bool NOISY, bool GUIDED>
CLD_ALWAYS_INLINE void sscs_piece_body(int64_t n, T* x, T* v, const O* y, const O* yu, T w, const E* z0, const E* z1, const E* z2,
                       const E* z3, T alpha, T kappa, const LinearT<T>& cl, const LinearT<T>& op) {
  const LinearT<T> closing = cl, opening = op;  // local copies: the coefficients stay in registers
  CLD_SIMD
  for (int64_t i = 0; i < n; ++i) {
    T xi = x[i];
    T vi = alpha * v[i] + kappa * net_value<T, O, GUIDED>(y, yu, w, i);
    linear_step<T, NOISY>(closing, xi, vi, NOISY ? static_cast<T>(z0[i]) : T(0), NOISY ? static_cast<T>(z1[i]) : T(0));
    linear_step<T, NOISY>(opening, xi, vi, NOISY ? static_cast<T>(z2[i]) : T(0), NOISY ? static_cast<T>(z3[i]) : T(0));
    x[i] = xi;
    v[i] = vi;
  }
}

template <typename T, typename O, typename E, bool NOISY, bool GUIDED>
inline void sscs_piece(int64_t n, T* x, T* v, const O* y, const O* yu, T w, const E* z0, const E* z1, const E* z2,
                       const E* z3, T alpha, T kappa, const LinearT<T>& cl, const LinearT<T>& op) {
  wide([&]() CLD_INLINE_LAMBDA { sscs_piece_body<T, O, E, NOISY, GUIDED>(n, x, v, y, yu, w, z0, z1, z2, z3, alpha, kappa, cl, op); });
}

template <typename T, typename O>
void sscs_step_kernel(const at::Tensor& u, const NetOut<T, O>& y, const SscsStep& c, int64_t k,
                      const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                      const Replacer<T>& rep, int64_t B, int64_t D) {
  const T alpha = static_cast<T>(c.score.alpha), kappa = static_cast<T>(c.score.kappa);
  const LinearT<T> closing = to_state<T>(c.closing), opening = to_state<T>(c.opening);
  T* pu = u.data_ptr<T>();
  const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
  const int64_t s = read_i64(seed);
  dispatch_noise(noise_mode(eps, seed), [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
      T* xr = pu + b * 2 * D;
      T* vr = xr + D;
      const auto piece = [&](int64_t lo, int64_t hi, const auto* z0, const auto* z1, const auto* z2, const auto* z3) {
        using E = std::remove_cv_t<std::remove_pointer_t<decltype(z0)>>;
        constexpr bool NOISY = M != Noise::None;
        const O* yr = y.y + b * D + lo;
        if (y.yu != nullptr) {
          sscs_piece<T, O, E, NOISY, true>(hi - lo, xr + lo, vr + lo, yr, y.yu + b * D + lo, y.w, z0, z1, z2, z3, alpha,
                                           kappa, closing, opening);
        } else {
          sscs_piece<T, O, E, NOISY, false>(hi - lo, xr + lo, vr + lo, yr, nullptr, y.w, z0, z1, z2, z3, alpha, kappa,
                                            closing, opening);
        }
      };
      if constexpr (M == Noise::Seed) {
        with_normals<4>(s, b * D, d0, d1, k, kTagSscs, [&](int64_t lo, int64_t hi, const float* const* z) {
          piece(lo, hi, z[0], z[1], z[2], z[3]);
        });
      } else if constexpr (M == Noise::Eps) {
        const T* er = pe + b * 4 * D + d0;
        piece(d0, d1, er, er + D, er + 2 * D, er + 3 * D);
      } else {
        const T* none = nullptr;
        piece(d0, d1, none, none, none, none);
      }
      rep.apply(xr, vr, b, d0, d1, D);
    });
  });
}

void sscs_step_cpu(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                   const at::Tensor& sde, bool mixed, const std::optional<at::Tensor>& eps,
                   const std::optional<at::Tensor>& seed, bool official_half, const std::optional<at::Tensor>& obs,
                   const std::optional<at::Tensor>& y_uncond, double guide_weight) {
  const char* op = "cld_fast::sscs_step_";
  const Dims n = check_sscs_step(u, y, ts, step, sde, eps, seed, obs, y_uncond, guide_weight, true);
  const StepAt s = read_step(step, ts, /*reads_next=*/true, op);
  const double t1 = time_at(ts, s.k + 1), t2 = time_at(ts, std::min(s.k + 2, s.n_ts - 1));
  const Params p = read_params(sde);
  const SscsStep c = sscs_step_coefficients(p, time_at(ts, s.k), t1, t2, sscs_has_opening(s.k, s.n_ts), mixed,
                                            official_half);
  const InPlace w(u);
  const at::Tensor yc = y.contiguous();
  const auto uc = contiguous(y_uncond);
  const auto ec = contiguous(eps);
  const auto oc = contiguous(obs);
  dispatch_state_net(u, y, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    sscs_step_kernel<T, O>(w.work, make_net_out<T, O>(yc, uc, guide_weight), c, s.k, ec, seed,
                                      make_replacer<T>(oc, p, sscs_replacement_time(t1, t2), false, seed, s.k, 0),
                                      n.B, n.D);
  });
  w.commit();
}

// n elements of an affine step: (x, v) <- (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z). The
// output may be the input itself (an in-place step): each element is read before it is written.
template <typename T, typename O, typename E, bool NOISY, bool GUIDED>
CLD_ALWAYS_INLINE void affine_piece_body(int64_t n, const T* x, const T* v, const O* y, const O* yu, T w, const E* z, T* ox, T* ov,
                         const T* r) {
  const T r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3], r4 = r[4], r5 = r[5];
  CLD_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], vi = v[i];
    const T nx = r0 * xi + r1 * vi;
    T nv = r2 * xi + r3 * vi + r4 * net_value<T, O, GUIDED>(y, yu, w, i);
    if constexpr (NOISY) nv = nv + r5 * static_cast<T>(z[i]);
    ox[i] = nx;
    ov[i] = nv;
  }
}

template <typename T, typename O, typename E, bool NOISY, bool GUIDED>
inline void affine_piece(int64_t n, const T* x, const T* v, const O* y, const O* yu, T w, const E* z, T* ox, T* ov,
                         const T* r) {
  wide([&]() CLD_INLINE_LAMBDA { affine_piece_body<T, O, E, NOISY, GUIDED>(n, x, v, y, yu, w, z, ox, ov, r); });
}

template <typename T, typename O>
void affine_step_kernel(const at::Tensor& u, const NetOut<T, O>& y, const Affine& a, bool noisy, int64_t k,
                        const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& seed,
                        const at::Tensor& out, const Replacer<T>& rep, int64_t B, int64_t D) {
  const T r[6] = {static_cast<T>(a.c_xx), static_cast<T>(a.c_xv), static_cast<T>(a.c_vx),
                  static_cast<T>(a.c_vv), static_cast<T>(a.c_vy), static_cast<T>(a.sigma)};
  const T* pu = u.data_ptr<T>();  // may alias po (an in-place step): each element is read, then written
  T* po = out.data_ptr<T>();
  const T* pe = eps.has_value() ? eps->data_ptr<T>() : nullptr;
  const int64_t s = read_i64(seed);
  dispatch_noise(noisy ? noise_mode(eps, seed) : Noise::None, [&](auto Mc) {
    constexpr Noise M = decltype(Mc)::value;
    for_rows(B, D, grain_for(M), [&](int64_t b, int64_t d0, int64_t d1) {
      const T* xr = pu + b * 2 * D;
      const T* vr = xr + D;
      T* oxr = po + b * 2 * D;
      T* ovr = oxr + D;
      const auto piece = [&](int64_t lo, int64_t hi, const auto* z) {
        using E = std::remove_cv_t<std::remove_pointer_t<decltype(z)>>;
        constexpr bool NOISY = M != Noise::None;
        const O* yr = y.y + b * D + lo;
        if (y.yu != nullptr) {
          affine_piece<T, O, E, NOISY, true>(hi - lo, xr + lo, vr + lo, yr, y.yu + b * D + lo, y.w, z, oxr + lo,
                                             ovr + lo, r);
        } else {
          affine_piece<T, O, E, NOISY, false>(hi - lo, xr + lo, vr + lo, yr, nullptr, y.w, z, oxr + lo, ovr + lo, r);
        }
      };
      if constexpr (M == Noise::Seed) {
        with_normals<1>(s, b * D, d0, d1, k, kTagAffine,
                        [&](int64_t lo, int64_t hi, const float* const* z) { piece(lo, hi, z[0]); });
      } else if constexpr (M == Noise::Eps) {
        piece(d0, d1, pe + b * D + d0);
      } else {
        const T* none = nullptr;
        piece(d0, d1, none);
      }
      rep.apply(oxr, ovr, b, d0, d1, D);
    });
  });
}

void affine_step_cpu(const at::Tensor& u, const at::Tensor& y, const at::Tensor& ts, const at::Tensor& step,
                     const at::Tensor& sde, int64_t kind, bool mixed, const std::optional<at::Tensor>& eps,
                     const std::optional<at::Tensor>& seed, const at::Tensor& out,
                     const std::optional<at::Tensor>& obs, const std::optional<at::Tensor>& y_uncond,
                     double guide_weight) {
  const char* op = "cld_fast::affine_step";
  const Dims n = check_affine(u, y, ts, step, sde, kind, eps, seed, out, obs, y_uncond, guide_weight, true);
  const bool drift = kind == kAffinePfDrift;
  const StepAt s = read_step(step, ts, /*reads_next=*/!drift, op);
  const double t0 = time_at(ts, s.k);
  const double t1 = drift ? t0 : time_at(ts, s.k + 1);
  const Params p = read_params(sde);
  const Affine a = affine_coefficients(p, t0, t0 - t1, static_cast<int>(kind), mixed);
  const InPlace w(out);
  const at::Tensor src = source_for(u, out, w);
  if (!src.is_same(w.work)) advise_huge_pages(w.work);
  const at::Tensor yc = y.contiguous();
  const auto uc = contiguous(y_uncond);
  const auto ec = contiguous(eps);
  const auto oc = contiguous(obs);
  dispatch_state_net(out, y, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    affine_step_kernel<T, O>(src, make_net_out<T, O>(yc, uc, guide_weight), a, kind == kAffineEm, s.k, ec, seed, w.work,
                                        make_replacer<T>(oc, p, t1, kind == kAffineDenoise, seed, s.k, 0), n.B, n.D);
  });
  w.commit();
}

// ---- gDDIM step --------------------------------------------------------------------------------
// Row r = table[step] in T: cur = (cx, cv) = E (x, v, y); u <- Lin u + C_0 cur + sum_j C_j hist[(step - j) mod K];
// hist[step mod K] <- cur[:H]. Ring (K, B, H, D) contiguous; each element reads its history before
// overwriting its own slot (slot (step - 2) mod 2 is slot step mod 2 when K = 2).

inline int64_t ring_slot(int64_t i, int64_t k) {
  const int64_t m = i % k;
  return m < 0 ? m + k : m;
}

// nx += c[0] hx + c[1] hv, nv += c[2] hx + c[3] hv (hv only when H = 2), in the reference's order.
template <typename T, int H>
inline void add_history(const T* c, T hx, T hv, T& nx, T& nv) {
  nx = nx + c[0] * hx;
  nv = nv + c[2] * hx;
  if constexpr (H == 2) {
    nx = nx + c[1] * hv;
    nv = nv + c[3] * hv;
  }
}

template <typename T, typename O, int K, int H>
void gddim_step_kernel(const at::Tensor& u, const at::Tensor& hist, const NetOut<T, O>& y, const double* r, int64_t k,
                       const Replacer<T>& rep, int64_t B, int64_t D) {
  T* pu = u.data_ptr<T>();
  T* ph = K > 0 ? hist.data_ptr<T>() : nullptr;
  constexpr int64_t slots = K > 0 ? K : 1;
  const int64_t slab = B * H * D;  // one ring slot
  const int64_t own = ring_slot(k, slots) * slab;
  const int64_t prev1 = ring_slot(k - 1, slots) * slab;
  const int64_t prev2 = ring_slot(k - 2, slots) * slab;
  for_rows(B, D, grain_for(Noise::None), [&](int64_t b, int64_t d0, int64_t d1) {
    T* xr = pu + b * 2 * D;
    T* vr = xr + D;
    const int64_t hrow = b * H * D;
    for (int64_t d = d0; d < d1; ++d) {
      // float64 arithmetic for every state dtype: the first rows' Lin u and C_0 cur cancel (terms ~1e6)
      const double x = xr[d], v = vr[d], yy = static_cast<double>(y.at(b * D + d));
      const double cx = r[0] * x + r[1] * v + r[2] * yy;
      const double cv = r[3] * x + r[4] * v + r[5] * yy;
      double nx = r[6] * x + r[7] * v + r[10] * cx + r[11] * cv;
      double nv = r[8] * x + r[9] * v + r[12] * cx + r[13] * cv;
      if constexpr (K >= 1) {
        const T* h = ph + prev1 + hrow + d;
        add_history<double, H>(r + 14, h[0], H == 2 ? double(h[D]) : 0.0, nx, nv);
      }
      if constexpr (K >= 2) {
        const T* h = ph + prev2 + hrow + d;
        add_history<double, H>(r + 18, h[0], H == 2 ? double(h[D]) : 0.0, nx, nv);
      }
      if constexpr (K >= 1) {
        T* h = ph + own + hrow + d;
        h[0] = static_cast<T>(cx);
        if constexpr (H == 2) h[D] = static_cast<T>(cv);
      }
      xr[d] = static_cast<T>(nx);
      vr[d] = static_cast<T>(nv);
    }
    rep.apply(xr, vr, b, d0, d1, D);
  });
}

// Calls f(std::integral_constant<int, K>{}, std::integral_constant<int, H>{}) for the ring's (K, H).
template <typename F>
void dispatch_ring(int64_t k, int64_t h, const F& f) {
  using C0 = std::integral_constant<int, 0>;
  using C1 = std::integral_constant<int, 1>;
  using C2 = std::integral_constant<int, 2>;
  if (k == 0) {
    f(C0{}, C1{});  // no ring: H is not read
  } else if (k == 1) {
    h == 1 ? f(C1{}, C1{}) : f(C1{}, C2{});
  } else {
    h == 1 ? f(C2{}, C1{}) : f(C2{}, C2{});
  }
}

void gddim_step_cpu(const at::Tensor& u, const at::Tensor& hist, const at::Tensor& y, const at::Tensor& table,
                    const at::Tensor& step, const std::optional<at::Tensor>& ts, const std::optional<at::Tensor>& sde,
                    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& obs,
                    const std::optional<at::Tensor>& y_uncond, double guide_weight) {
  const char* op = "cld_fast::gddim_step_";
  const Dims n = check_gddim_step(u, hist, y, table, step, ts, sde, seed, obs, y_uncond, guide_weight, true);
  const int64_t k = step.data_ptr<int64_t>()[0];
  check_table_step_range(k, table.size(0), op);
  // The replacement at ts[k + 1]; k + 1 = len(ts) is the denoising row (x = x_obs).
  const bool exact = obs.has_value() && k + 1 >= ts->size(0);
  const double t_r = obs.has_value() && !exact ? time_at(*ts, k + 1) : 1.0;
  const Params p = obs.has_value() ? read_params(*sde) : Params{};
  const auto oc = contiguous(obs);
  double row[kGddimCols];
  for (int64_t c = 0; c < kGddimCols; ++c) {
    const int64_t off = k * table.stride(0) + c * table.stride(1);
    row[c] = table.scalar_type() == at::kDouble ? table.const_data_ptr<double>()[off]
                                                : static_cast<double>(table.const_data_ptr<float>()[off]);
  }
  const InPlace wu(u), wh(hist);
  const at::Tensor yc = y.contiguous();
  const auto uc = contiguous(y_uncond);
  dispatch_state_net(u, y, [&](auto tt, auto ot) {
    using T = decltype(tt);
    using O = decltype(ot);
    dispatch_ring(hist.size(0), hist.size(2), [&](auto kc, auto hc) {
      gddim_step_kernel<T, O, decltype(kc)::value, decltype(hc)::value>(
          wu.work, wh.work, make_net_out<T, O>(yc, uc, guide_weight), row, k,
          make_replacer<T>(oc, p, t_r, exact, seed, k, 0), n.B, n.D);
    });
  });
  wh.commit();
  wu.commit();
}

}  // namespace
}  // namespace cpu

// The kNonfinite* bits of this thread's last perturb, cleared by the read.
int64_t take_nonfinite_inputs() {
  const int64_t bits = cpu::last_nonfinite;
  cpu::last_nonfinite = 0;
  return bits;
}

// Linked into bindings.cpp's module attribute `has_cpu_kernels`.
bool cpu_kernels_compiled() { return true; }

}  // namespace cld

// Implementations only: the schemas are defined from Python (cld_fast.opdefs.define_library), before
// or after this library is loaded.
TORCH_LIBRARY_IMPL(cld_fast, CPU, m) {
  m.impl("perturb", &cld::cpu::perturb_cpu);
  m.impl("hsm_loss_fwd", &cld::cpu::hsm_loss_fwd_cpu);
  m.impl("hsm_loss_bwd", &cld::cpu::hsm_loss_bwd_cpu);
  m.impl("hsm_loss_fwd_grad", &cld::cpu::hsm_loss_fwd_grad_cpu);
  m.impl("mixed_score", &cld::cpu::mixed_score_cpu);
  m.impl("half_step_", &cld::cpu::half_step_cpu);
  m.impl("sscs_step_", &cld::cpu::sscs_step_cpu);
  m.impl("affine_step", &cld::cpu::affine_step_cpu);
  m.impl("gddim_step_", &cld::cpu::gddim_step_cpu);
}
