// The CLD coefficients of cld_fast/sde.py in double precision, for host (C++) and device (CUDA) code.
//
// Every kernel derives its per-row (perturb, loss, mixed score) or per-step (sampler) coefficients
// from (t, sde) with these functions; the torch references of cld_fast/opdefs.py call the
// same-named methods of cld_fast.sde.CLD. The closed forms use sde.py's rearranged covariance (no
// exp(4 g B) * exp(-4 g B) overflow for large B) and its small-y series of P3, evaluated in the same
// operation order, so host results agree with sde.py to a few float64 ulps.
//
// Plain C++20 plus CUDA qualifiers: no torch; included by csrc/cpu, csrc/cuda and csrc/bindings.cpp.
#pragma once

#include "cld_hd.h"

namespace cld {

// ---- layout shared with Python (cld_fast.sde; checked by the bindings' _layout()) --------------

// Position of each CLD parameter in the (5,) float64 `sde` tensor (sde.PARAMS).
enum Param : int { kBeta0 = 0, kBeta1 = 1, kMInv = 2, kGamma = 3, kNumericalEps = 4, kNumParams = 5 };
constexpr const char* kParamNames[kNumParams] = {"beta0", "beta1", "m_inv", "gamma", "numerical_eps"};

// sde.OBJECTIVE_CODES, sde.WEIGHTING_CODES, sde.AFFINE_KIND_CODES (and sde.OUTPUT_CODES below).
enum Objective : int { kObjectiveHsm = 0, kObjectiveDsm = 1, kNumObjectives = 2 };
constexpr const char* kObjectiveNames[kNumObjectives] = {"hsm", "dsm"};

enum Weighting : int { kWeightingReweightedV2 = 0, kWeightingLikelihood = 1, kWeightingReweightedV1 = 2, kNumWeightings = 3 };
constexpr const char* kWeightingNames[kNumWeightings] = {"reweightedv2", "likelihood", "reweightedv1"};

// sde.OUTPUT_CODES: what the network outputs (mixed score, the official mixed_score=False eps, the score).
enum Output : int { kOutputMixed = 0, kOutputEps = 1, kOutputScore = 2, kNumOutputs = 3 };
constexpr const char* kOutputNames[kNumOutputs] = {"mixed", "eps", "score"};

enum AffineKind : int { kAffineEm = 0, kAffineDenoise = 1, kAffinePfDrift = 2, kNumAffineKinds = 3 };
constexpr const char* kAffineKindNames[kNumAffineKinds] = {"em", "denoise", "pf_drift"};

// ---- math functions (double; unaffected by --use_fast_math, which only touches float) ----------

namespace dmath {
CLD_HD double exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

CLD_HD double expm1(double x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  return std::expm1(x);
#endif
}

#if defined(__CUDA_ARCH__)
// On the device, IEEE double division and square root (div.rn.f64, sqrt.rn.f64) end in an
// out-of-line slow path whose call makes ptxas spill the registers live across it (the loaded data
// of a row kernel). These versions refine the hardware approximations by Newton steps instead:
// within an ulp or two (the coefficients are rounded to float32 afterwards), with no call.
__device__ __forceinline__ double rcp_approx(double x) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
  return r;
}

__device__ __forceinline__ double rsqrt_approx(double x) {
  double r;
  asm("rsqrt.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
  return r;
}
#endif

// a / b (host: IEEE division, as sde.py).
CLD_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  double r = rcp_approx(b);
  if (r == 0.0 || !isfinite(r)) return a * r;  // b infinite, zero or NaN
  r = fma(fma(-b, r, 1.0), r, r);
  r = fma(fma(-b, r, 1.0), r, r);
  const double q = a * r;
  return fma(fma(-b, q, a), r, q);
#else
  return a / b;
#endif
}

CLD_HD double sqrt(double x) {
#if defined(__CUDA_ARCH__)
  if (x < 0.0) return __longlong_as_double(0x7ff8000000000000LL);  // NaN, as sqrt
  if (!(x > 0.0) || isinf(x)) return x;                             // 0, +inf, NaN
  double y = rsqrt_approx(x);
  y = y * fma(-0.5 * x * y, y, 1.5);
  y = y * fma(-0.5 * x * y, y, 1.5);
  const double s = x * y;
  return fma(0.5 * y, fma(-s, s, x), s);
#else
  return std::sqrt(x);
#endif
}
}  // namespace dmath

// ---- parameters ---------------------------------------------------------------------------------

struct Params {
  double beta0, beta1, m_inv, gamma, numerical_eps;
};

CLD_HD Params params_from(const double* p) {
  return Params{p[kBeta0], p[kBeta1], p[kMInv], p[kGamma], p[kNumericalEps]};
}

// Gamma = 2 / sqrt(m_inv) (critical damping); g = sqrt(m_inv) / 2 = 1 / Gamma; M = 1 / m_inv.
CLD_HD double friction(const Params& p) { return dmath::div(2.0, dmath::sqrt(p.m_inv)); }
CLD_HD double rate_g(const Params& p) { return dmath::sqrt(p.m_inv) * 0.5; }  // exact: / 2
CLD_HD double mass(const Params& p) { return dmath::div(1.0, p.m_inv); }

CLD_HD double beta(const Params& p, double t) { return p.beta0 + p.beta1 * t; }
CLD_HD double beta_int(const Params& p, double t) { return p.beta0 * t + 0.5 * p.beta1 * t * t; }

// ---- P3, Q3 (sde._p3, sde._q3) ------------------------------------------------------------------

constexpr double kSeriesCutoff = 0.5;  // sde._SERIES_CUTOFF
constexpr int kSeriesFirst = 3;        // the series sums y^(k-3) / k! for k = 3 .. 17
constexpr int kSeriesLast = 17;

constexpr double factorial(int k) {
  double f = 1.0;
  for (int i = 2; i <= k; ++i) f *= i;  // exact in double up to 18!
  return f;
}

template <int K>
struct InvFactorial {
  static constexpr double value = 1.0 / factorial(K);  // as Python's 1.0 / math.factorial(K)
};

// sum_{k=K}^{17} y^(k-K) / k!, in sde._p3's Horner order (from 1/17! down).
template <int K>
CLD_HD double series_tail(double y) {
  if constexpr (K == kSeriesLast) {
    return InvFactorial<K>::value;
  } else {
    return series_tail<K + 1>(y) * y + InvFactorial<K>::value;
  }
}

// P3(y) = 1 - exp(-y) (1 + y + y^2 / 2), y >= 0; the direct form cancels for small y (P3 ~ y^3 / 6).
CLD_HD double p3(double y) {
  if (y < kSeriesCutoff) return dmath::exp(-y) * y * y * y * series_tail<kSeriesFirst>(y);
  return 1.0 - dmath::exp(-y) * (1.0 + y + 0.5 * y * y);
}

// Q3(y) = 1 - exp(-y) (1 - y + y^2 / 2), y >= 0 (no cancellation: Q3 ~ 2 y for small y).
CLD_HD double q3(double y) { return -dmath::expm1(-y) + dmath::exp(-y) * (y - 0.5 * y * y); }

// ---- forward transition and its Cholesky factor -------------------------------------------------

struct Transition {
  double a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv;
};

// Mean matrix and covariance of the forward linear SDE over an integrated-beta span b >= 0 from an
// initial covariance diag(s0x, s0v), plus eps on the diagonal (sde.CLD._transition).
CLD_HD Transition transition(double g, double b, double s0x, double s0v, double eps) {
  const double gb = g * b;
  const double c = dmath::exp(-2.0 * gb);
  const double m = c * c;
  const double y = 4.0 * gb;
  const double up = 1.0 + 2.0 * gb;
  const double down = 1.0 - 2.0 * gb;
  const double g2 = g * g;
  Transition r;
  r.a_xx = c * up;
  r.a_xv = c * (4.0 * g2 * b);
  r.a_vx = -c * b;
  r.a_vv = c * down;
  r.s_xx = p3(y) + m * (s0x * (up * up) + 16.0 * (g2 * g2) * b * b * s0v) + eps;
  r.s_xv = m * (4.0 * g * b * b - s0x * b * up + 4.0 * g * g * b * s0v * down);
  r.s_vv = dmath::div(q3(y), 4.0 * g * g) + m * (s0v * (down * down) + s0x * b * b) + eps;
  return r;
}

struct Cholesky {
  double l11, l21, l22;
};

// L L^T = [[s_xx, s_xv], [s_xv, s_vv]] with sde._cholesky2's guards: l21 = 0 where l11 = 0, and
// the Schur complement clamped at 0 (NaN propagates, as torch.clamp does).
CLD_HD Cholesky cholesky2(double s_xx, double s_xv, double s_vv) {
  const double l11 = dmath::sqrt(s_xx);
  const double l21 = l11 > 0.0 ? dmath::div(s_xv, l11) : 0.0;
  const double schur = s_vv - l21 * l21;
  return Cholesky{l11, l21, dmath::sqrt(schur < 0.0 ? 0.0 : schur)};
}

// ---- per-sample coefficients (perturb, loss, mixed score) ---------------------------------------

struct PerturbCoefficients {
  double a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv, l11, l21, l22;
};

// sde.CLD.perturbation_kernel(t, objective): HSM marginalises v0 ~ N(0, gamma M), DSM conditions on it.
CLD_HD PerturbCoefficients perturb_coefficients(const Params& p, double t, int objective) {
  const double s0v = objective == kObjectiveHsm ? p.gamma * mass(p) : 0.0;
  const Transition k = transition(rate_g(p), beta_int(p, t), 0.0, s0v, p.numerical_eps);
  const Cholesky l = cholesky2(k.s_xx, k.s_xv, k.s_vv);
  return PerturbCoefficients{k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.s_xx, k.s_xv, k.s_vv, l.l11, l.l21, l.l22};
}

struct LossCoefficients {
  double c, w, a;  // per-sample loss w * sum_d (a out + c v - eps_v)^2
};

// s_vv of the HSM kernel at t, reusing k when k already is the HSM kernel.
CLD_HD double hsm_s_vv(const Params& p, double t, int objective, const PerturbCoefficients& k) {
  return objective == kObjectiveHsm ? k.s_vv : perturb_coefficients(p, t, kObjectiveHsm).s_vv;
}

// sde.CLD.loss_coefficients(t, weighting, objective, output): l22 of the objective's kernel;
// c = l22 / s_vv_hsm (mixed output) or 0; a = -l22 (score output) or 1; w = 1 (reweightedv2),
// beta Gamma (reweightedv1) or beta Gamma / l22^2 (likelihood).
CLD_HD LossCoefficients loss_coefficients(const Params& p, double t, int weighting, int objective, int output) {
  const PerturbCoefficients k = perturb_coefficients(p, t, objective);
  LossCoefficients r{0.0, 1.0, 1.0};
  if (output == kOutputMixed) r.c = dmath::div(k.l22, hsm_s_vv(p, t, objective, k));
  if (output == kOutputScore) r.a = -k.l22;
  if (weighting == kWeightingLikelihood) r.w = dmath::div(beta(p, t) * friction(p), k.l22 * k.l22);
  if (weighting == kWeightingReweightedV1) r.w = beta(p, t) * friction(p);
  return r;
}

struct MixedCoefficients {
  double c0, c1;  // score = c0 v + c1 out
};

// sde.CLD.score_coefficients(t, objective, output): mixed (-1 / s_vv_hsm, -1 / l22), eps (0, -1 / l22),
// score (0, 1); l22 of the objective's kernel.
CLD_HD MixedCoefficients score_coefficients(const Params& p, double t, int objective, int output) {
  if (output == kOutputScore) return MixedCoefficients{0.0, 1.0};
  const PerturbCoefficients k = perturb_coefficients(p, t, objective);
  const double c1 = dmath::div(-1.0, k.l22);
  if (output == kOutputEps) return MixedCoefficients{0.0, c1};
  return MixedCoefficients{dmath::div(-1.0, hsm_s_vv(p, t, objective, k)), c1};
}

// sde.CLD.mixed_score_coefficients: (-1 / s_vv, -1 / l22) of the HSM kernel.
CLD_HD MixedCoefficients mixed_coefficients(const Params& p, double t) {
  return score_coefficients(p, t, kObjectiveHsm, kOutputMixed);
}

// ---- per-step coefficients (samplers) -----------------------------------------------------------

struct HalfStep {
  double a_xx, a_xv, a_vx, a_vv, l11, l21, l22;
};

CLD_HD HalfStep identity_half_step() { return HalfStep{1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0}; }

// sde.CLD.half_step_coefficients: the reverse linear part from forward time t to t - h, the forward
// transition over -Bd = B(t) - B(t - h) conjugated by diag(-1, 1).
CLD_HD HalfStep half_step_coefficients(const Params& p, double t, double h) {
  const double bd = beta_int(p, t - h) - beta_int(p, t);
  const Transition k = transition(rate_g(p), -bd, 0.0, 0.0, 0.0);
  const Cholesky l = cholesky2(k.s_xx, -k.s_xv, k.s_vv);
  return HalfStep{k.a_xx, -k.a_xv, -k.a_vx, k.a_vv, l.l11, l.l21, l.l22};
}

struct ScoreStep {
  double alpha, kappa;  // v <- alpha v + kappa y
};

// sde.CLD.score_step_coefficients; `mixed` folds the mixed score at t so y is the network output.
CLD_HD ScoreStep score_step_coefficients(const Params& p, double t, double h, bool mixed) {
  const double e = 2.0 * friction(p) * beta(p, t) * h;
  ScoreStep s{1.0 + e * p.m_inv, e};
  if (mixed) {
    const MixedCoefficients m = mixed_coefficients(p, t);
    s.alpha = s.alpha + e * m.c0;
    s.kappa = e * m.c1;
  }
  return s;
}

struct Affine {
  double c_xx, c_xv, c_vx, c_vv, c_vy, sigma;  // x' = c_xx x + c_xv v, v' = c_vx x + c_vv v + c_vy y + sigma z
};

// sde.CLD.reverse_affine_coefficients: em / denoise step t -> t - h, or the probability-flow drift
// at t (h unused); `mixed` folds the mixed score at t.
CLD_HD Affine affine_coefficients(const Params& p, double t, double h, int kind, bool mixed) {
  const double b = beta(p, t);
  const double G = friction(p);
  const double mi = p.m_inv;
  Affine a;
  if (kind == kAffinePfDrift) {
    a = Affine{0.0, mi * b, -b, -G * mi * b, -G * b, 0.0};
  } else {
    const double bh = b * h;
    a = Affine{1.0, -mi * bh, bh, 1.0 + G * mi * bh, 2.0 * G * bh, kind == kAffineEm ? dmath::sqrt(2.0 * G * bh) : 0.0};
  }
  if (mixed) {
    const MixedCoefficients m = mixed_coefficients(p, t);
    a.c_vv = a.c_vv + a.c_vy * m.c0;
    a.c_vy = a.c_vy * m.c1;
  }
  return a;
}

// ---- the SSCS step of opdefs.sscs_step_ref ------------------------------------------------------

// After the network evaluation at t0 = ts[i]: the score Euler step at (t0, h = t0 - t1), the closing
// half step t0 - h/2 -> t1 (official: t0 -> t0 - h/2, sde.CLD.sscs_closing_half_step), and the
// opening half step of step i + 1, t1 -> t1 - (t1 - t2)/2 with t2 = ts[i + 2] (the identity when
// step i is the last one).
struct SscsTimes {
  double t0, h, t_close, h_close, t_open, h_open;
};

CLD_HD SscsTimes sscs_times(double t0, double t1, double t2, bool official) {
  const double h = t0 - t1;
  if (official) return SscsTimes{t0, h, t0, 0.5 * h, t1, 0.5 * (t1 - t2)};
  const double t_close = t0 - 0.5 * h;
  return SscsTimes{t0, h, t_close, t_close - t1, t1, 0.5 * (t1 - t2)};
}

struct SscsStep {
  ScoreStep score;
  HalfStep closing, opening;
};

CLD_HD SscsStep sscs_step_coefficients(const Params& p, double t0, double t1, double t2, bool has_opening,
                                       bool mixed, bool official) {
  const SscsTimes s = sscs_times(t0, t1, t2, official);
  return SscsStep{score_step_coefficients(p, s.t0, s.h, mixed), half_step_coefficients(p, s.t_close, s.h_close),
                  has_opening ? half_step_coefficients(p, s.t_open, s.h_open) : identity_half_step()};
}

// ---- the inpainting replacement (opdefs ``obs``) ------------------------------------------------

// An observed element becomes A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v): the HSM kernel at t_r.
struct Replacement {
  double a_xx, a_vx, l11, l21, l22;
};

CLD_HD Replacement replacement_coefficients(const Params& p, double t_r) {
  const PerturbCoefficients k = perturb_coefficients(p, t_r, kObjectiveHsm);
  return Replacement{k.a_xx, k.a_vx, k.l11, k.l21, k.l22};
}

// The SSCS step's replacement time: the end of the opening half step, t1 - (t1 - t2) / 2 (t1 when
// t2 = t1, the grid's last step).
CLD_HD double sscs_replacement_time(double t1, double t2) { return t1 - 0.5 * (t1 - t2); }

// ---- step indices into a time grid ts of n_ts = S + 1 points ------------------------------------

// Step k runs ts[k] -> ts[k + 1]: valid for 0 <= k <= n_ts - 2; an op that reads only ts[k]
// (the pf_drift affine kind) accepts k = n_ts - 1 too.
CLD_HD bool step_in_range(int64_t k, int64_t n_ts, bool reads_next) {
  return k >= 0 && (reads_next ? k + 1 < n_ts : k < n_ts);
}

// Whether SSCS step k has an opening half step of step k + 1 (k + 2 <= S).
CLD_HD bool sscs_has_opening(int64_t k, int64_t n_ts) { return k + 2 <= n_ts - 1; }

// An index clamped into [0, n - 1] (out-of-range steps read a valid element, then poison the result).
CLD_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

}  // namespace cld
