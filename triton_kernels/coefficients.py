"""The CLD coefficients of ``cld_fast/sde.py``, written once as @triton.jit float64 helpers.

Every kernel derives its own per-row (or per-step) coefficients from the time(s) and the (5,)
float64 ``sde`` parameter tensor, read in-kernel, so a call needs no host-made coefficient table and
no float64 ops outside the kernel. The helpers are elementwise: they work on a (BLOCK_B, 1) row
vector of a 2-D tile, on a 1-D block (``probe``) or on 0-d scalars (the sampler's per-step values),
always in float64 (cost: a few hundred flops per row per program, nothing next to the memory
traffic); kernels cast the results to their compute dtype.

The formulas mirror ``cld_fast.sde`` term for term, in the same evaluation order, so float64
results agree with it to a few ulp: the rearranged closed forms of ``CLD._transition`` (no
exp(4 g B) * exp(-4 g B)), the small-y series of ``_p3`` with the same Horner coefficients, and for
Q3 below the series cutoff Q3(y) = exp(-y) (2 y + y^3 S3(y)) (S3 = P3's series sum: Triton has no
portable expm1; above the cutoff 1 - exp(-y) is as good as expm1). Float literals are only values
exact in float32 (0.5, 1, 2, 4, 16), which no Triton version or the interpreter can round; the
constants 1/k! are computed in float64 from exact integer products (constant-folded when compiled).

Enum codes and the parameter order are named here once (``LAYOUT``; checked against ``cld_fast.sde``
and the C++ header by tests/test_coefficients.py). ``probe`` evaluates the helpers for a vector of
times so they can be tested against ``cld_fast.sde`` directly.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import device_guard, launch
from .philox import TAGS

# ---- layout: parameter order and enum codes (the order of cld_fast.sde.PARAMS / *_CODES) ----------

PARAM_INDEX = {"beta0": 0, "beta1": 1, "m_inv": 2, "gamma": 3, "numerical_eps": 4}
OBJECTIVE_CODES = {"hsm": 0, "dsm": 1}
WEIGHTING_CODES = {"reweightedv2": 0, "likelihood": 1, "reweightedv1": 2}
OUTPUT_CODES = {"mixed": 0, "eps": 1, "score": 2}
KIND_CODES = {"em": 0, "denoise": 1, "pf_drift": 2}

P_BETA0 = tl.constexpr(PARAM_INDEX["beta0"])
P_BETA1 = tl.constexpr(PARAM_INDEX["beta1"])
P_M_INV = tl.constexpr(PARAM_INDEX["m_inv"])
P_GAMMA = tl.constexpr(PARAM_INDEX["gamma"])
P_NUMERICAL_EPS = tl.constexpr(PARAM_INDEX["numerical_eps"])
HSM = tl.constexpr(OBJECTIVE_CODES["hsm"])
DSM = tl.constexpr(OBJECTIVE_CODES["dsm"])
REWEIGHTEDV2 = tl.constexpr(WEIGHTING_CODES["reweightedv2"])
LIKELIHOOD = tl.constexpr(WEIGHTING_CODES["likelihood"])
REWEIGHTEDV1 = tl.constexpr(WEIGHTING_CODES["reweightedv1"])
OUT_MIXED = tl.constexpr(OUTPUT_CODES["mixed"])
OUT_EPS = tl.constexpr(OUTPUT_CODES["eps"])
OUT_SCORE = tl.constexpr(OUTPUT_CODES["score"])
EM = tl.constexpr(KIND_CODES["em"])
DENOISE = tl.constexpr(KIND_CODES["denoise"])
PF_DRIFT = tl.constexpr(KIND_CODES["pf_drift"])

LAYOUT = {
    "params": tuple(sorted(PARAM_INDEX, key=PARAM_INDEX.get)),
    "objective": dict(OBJECTIVE_CODES),
    "weighting": dict(WEIGHTING_CODES),
    "output": dict(OUTPUT_CODES),
    "kind": dict(KIND_CODES),
    "philox_tags": dict(TAGS),
}

# Below this y, P3 and Q3 are summed as a series (as cld_fast.sde._SERIES_CUTOFF); the series runs
# to 1/17! (SERIES_LAST), like sde._SERIES_COEFFS.
SERIES_CUTOFF = tl.constexpr(0.5)
SERIES_LAST = tl.constexpr(17)


# ---- parameters and elementary functions ------------------------------------------------------


@triton.jit
def load_sde(sde_ptr, s_sde):
    """(beta0, beta1, m_inv, gamma, numerical_eps): float64 scalars from the (5,) ``sde`` tensor."""
    beta0 = tl.load(sde_ptr + P_BETA0 * s_sde).to(tl.float64)
    beta1 = tl.load(sde_ptr + P_BETA1 * s_sde).to(tl.float64)
    m_inv = tl.load(sde_ptr + P_M_INV * s_sde).to(tl.float64)
    gamma = tl.load(sde_ptr + P_GAMMA * s_sde).to(tl.float64)
    neps = tl.load(sde_ptr + P_NUMERICAL_EPS * s_sde).to(tl.float64)
    return beta0, beta1, m_inv, gamma, neps


@triton.jit
def beta_at(t, beta0, beta1):
    """beta(t) = beta0 + beta1 t."""
    return beta0 + beta1 * t


@triton.jit
def beta_int(t, beta0, beta1):
    """B(t) = beta0 t + beta1 t^2 / 2."""
    return beta0 * t + 0.5 * beta1 * t * t


@triton.jit
def rate(m_inv):
    """g = sqrt(m_inv) / 2 (sde.CLD.g)."""
    return tl.sqrt(m_inv) * 0.5


@triton.jit
def friction(m_inv):
    """Gamma = 2 / sqrt(m_inv) (sde.CLD.Gamma)."""
    return 2.0 / tl.sqrt(m_inv)


@triton.jit
def _series(y):
    """S3(y) = sum_{k=3..17} y^(k-3) / k!, Horner from 1/17! down, as sde._p3 (float64)."""
    fact = tl.full([], 1.0, tl.float64)
    for k in tl.static_range(2, SERIES_LAST + 1):
        fact = fact * k  # 17!, exact in float64
    total = 1.0 / fact
    for j in tl.static_range(0, SERIES_LAST - 3):
        fact = fact / (SERIES_LAST - j)  # (16 - j)!, exact
        total = total * y + 1.0 / fact
    return total


@triton.jit
def p3_q3(y):
    """(P3(y), Q3(y)) for y >= 0 (float64): P3 = 1 - e^-y (1 + y + y^2/2), Q3 = 1 - e^-y (1 - y + y^2/2).

    Below SERIES_CUTOFF: P3 = e^-y y^3 S3(y) (sde._p3) and Q3 = e^-y (2 y + y^3 S3(y)), both
    free of cancellation. Above it, the forms of sde._p3 / sde._q3 with -expm1(-y) = 1 - e^-y
    (exact or one rounding for y >= 1/2): the same roundings as sde.py, which matters where a caller
    cancels against Q3 (the mixed pf_drift c_vv = -Gamma beta (m_inv - 1 / s_vv) as s_vv -> M).
    """
    ys = tl.minimum(y, SERIES_CUTOFF)
    es = tl.exp(-ys)
    s3 = _series(ys)
    y3 = ys * ys * ys
    p_series = es * ys * ys * ys * s3
    q_series = es * (2.0 * ys + y3 * s3)
    e = tl.exp(-y)
    p_direct = 1.0 - e * (1.0 + y + 0.5 * y * y)
    q_direct = (1.0 - e) + e * (y - 0.5 * y * y)
    small = y < SERIES_CUTOFF
    return tl.where(small, p_series, p_direct), tl.where(small, q_series, q_direct)


@triton.jit
def transition(b, g, s0v, neps):
    """Mean matrix and covariance of the forward linear SDE over an integrated-beta span b >= 0.

    sde.CLD._transition with s0x = 0 (every caller's initial x variance; its terms vanish exactly).
    Returns a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv (float64, b's shape).
    """
    gb = g * b
    c = tl.exp(-2.0 * gb)
    m = c * c
    y = 4.0 * gb
    a_xx = c * (1.0 + 2.0 * gb)
    a_xv = c * (4.0 * g * g * b)
    a_vx = -c * b
    a_vv = c * (1.0 - 2.0 * gb)
    p3, q3 = p3_q3(y)
    one_m = 1.0 - 2.0 * gb
    s_xx = p3 + m * (16.0 * g * g * g * g * b * b * s0v) + neps
    s_xv = m * (4.0 * g * b * b + 4.0 * g * g * b * s0v * one_m)
    s_vv = q3 / (4.0 * g * g) + m * (s0v * (one_m * one_m)) + neps
    return a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv


@triton.jit
def cholesky2(s_xx, s_xv, s_vv):
    """(l11, l21, l22) of [[s_xx, s_xv], [s_xv, s_vv]] with sde._cholesky2's guards (NaN-preserving)."""
    l11 = tl.sqrt(s_xx)
    pos = l11 > 0
    l21 = tl.where(pos, s_xv / tl.where(pos, l11, 1.0), 0.0)
    d = s_vv - l21 * l21
    l22 = tl.sqrt(tl.where(d < 0, 0.0, d))
    return l11, l21, l22


# ---- per-row coefficients of the training ops -----------------------------------------------


@triton.jit
def perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE: tl.constexpr):
    """sde.CLD.perturbation_kernel(t, objective): a_xx a_xv a_vx a_vv s_xx s_xv s_vv l11 l21 l22."""
    b = beta_int(t, beta0, beta1)
    if OBJECTIVE == HSM:
        s0v = gamma * (1.0 / m_inv)  # gamma * M
    else:
        s0v = 0.0
    a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv = transition(b, rate(m_inv), s0v, neps)
    l11, l21, l22 = cholesky2(s_xx, s_xv, s_vv)
    return a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv, l11, l21, l22


@triton.jit
def mixed_coefficients(t, beta0, beta1, m_inv, gamma, neps):
    """(c0, c1) = (-1 / s_vv, -1 / l22) of the HSM kernel: mixed score = c0 v + c1 out."""
    _, _, _, _, _, _, s_vv, _, _, l22 = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, HSM)
    return -1.0 / s_vv, -1.0 / l22


@triton.jit
def score_coefficients(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE: tl.constexpr, OUTPUT: tl.constexpr):
    """(c0, c1) of sde.CLD.score_coefficients(t, objective, output): score = c0 v + c1 out."""
    if OUTPUT == OUT_SCORE:
        c0 = t * 0.0
        c1 = c0 + 1.0
    else:
        _, _, _, _, _, _, s_vv, _, _, l22 = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE)
        c1 = -1.0 / l22
        if OUTPUT == OUT_EPS:
            c0 = c1 * 0.0
        else:
            if OBJECTIVE != HSM:
                _, _, _, _, _, _, s_vv, _, _, _ = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, HSM)
            c0 = -1.0 / s_vv
    return c0, c1


@triton.jit
def loss_coefficients(t, beta0, beta1, m_inv, gamma, neps, WEIGHTING: tl.constexpr, OBJECTIVE: tl.constexpr,
                      OUTPUT: tl.constexpr):
    """(c, w, a) of sde.CLD.loss_coefficients: loss = w sum (a out + c v - eps_v)^2."""
    _, _, _, _, _, _, s_vv, _, _, l22 = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE)
    if OUTPUT == OUT_MIXED:
        if OBJECTIVE != HSM:
            _, _, _, _, _, _, s_vv, _, _, _ = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, HSM)
        c = l22 / s_vv
    else:
        c = l22 * 0.0
    if OUTPUT == OUT_SCORE:
        a = -l22
    else:
        a = l22 * 0.0 + 1.0
    if WEIGHTING == LIKELIHOOD:
        # beta (Gamma / l22^2): one ulp from sde.py's beta Gamma / l22^2, and no float32 spill in the
        # seed-mode loss kernels (bench/aot_compile.py)
        w = beta_at(t, beta0, beta1) * (friction(m_inv) / (l22 * l22))
    elif WEIGHTING == REWEIGHTEDV1:
        w = beta_at(t, beta0, beta1) * friction(m_inv)
    else:
        w = l22 * 0.0 + 1.0
    return c, w, a


# ---- per-step coefficients of the sampler ops ------------------------------------------------


@triton.jit
def half_step_coefficients(t, h, beta0, beta1, m_inv):
    """sde.CLD.half_step_coefficients: reverse linear part from t to t - h: a_xx a_xv a_vx a_vv l11 l21 l22."""
    bd = beta_int(t - h, beta0, beta1) - beta_int(t, beta0, beta1)
    # The reverse linear part is the forward one conjugated by diag(-1, 1).
    a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv = transition(-bd, rate(m_inv), 0.0, 0.0)
    l11, l21, l22 = cholesky2(s_xx, -s_xv, s_vv)
    return a_xx, -a_xv, -a_vx, a_vv, l11, l21, l22


@triton.jit
def score_step_coefficients(t, h, beta0, beta1, m_inv, gamma, neps, MIXED: tl.constexpr):
    """(alpha, kappa) of the SSCS score step v <- alpha v + kappa y (sde.CLD.score_step_coefficients)."""
    e = 2.0 * friction(m_inv) * beta_at(t, beta0, beta1) * h
    alpha = 1.0 + e * m_inv
    kappa = e
    if MIXED:
        c0, c1 = mixed_coefficients(t, beta0, beta1, m_inv, gamma, neps)
        alpha = alpha + e * c0
        kappa = e * c1
    return alpha, kappa


@triton.jit
def affine_coefficients(t, h, beta0, beta1, m_inv, gamma, neps, KIND: tl.constexpr, MIXED: tl.constexpr):
    """c_xx c_xv c_vx c_vv c_vy sigma of sde.CLD.reverse_affine_coefficients (h unused for pf_drift)."""
    beta = beta_at(t, beta0, beta1)
    big_g = friction(m_inv)
    zero = beta * 0.0
    if KIND == PF_DRIFT:
        c_xx = zero
        c_xv = m_inv * beta
        c_vx = -beta
        c_vv = -big_g * m_inv * beta
        c_vy = -big_g * beta
        sigma = zero
    else:
        bh = beta * h
        c_xx = zero + 1.0
        c_xv = -m_inv * bh
        c_vx = bh
        c_vv = 1.0 + big_g * m_inv * bh
        c_vy = 2.0 * big_g * bh
        if KIND == EM:
            sigma = tl.sqrt(2.0 * big_g * bh)
        else:
            sigma = zero
    if MIXED:
        c0, c1 = mixed_coefficients(t, beta0, beta1, m_inv, gamma, neps)
        c_vv = c_vv + c_vy * c0
        c_vy = c_vy * c1
    return c_xx, c_xv, c_vx, c_vv, c_vy, sigma


@triton.jit
def sscs_coefficients(t0, t1, t2, opening, beta0, beta1, m_inv, gamma, neps, MIXED: tl.constexpr,
                      OFFICIAL: tl.constexpr):
    """The 16 coefficients of one fused SSCS step (opdefs.sscs_step_ref), network evaluated at t0.

    alpha, kappa (score step at t0 with h = t0 - t1), the closing half step t0 - h/2 -> t1 (OFFICIAL:
    t0 -> t0 - h/2, sde.CLD.sscs_closing_half_step), and the opening half step t1 -> t1 - (t1 - t2)/2
    of the next step where ``opening`` is true, else the identity (a_xx = a_vv = 1, the rest 0).
    """
    h = t0 - t1
    alpha, kappa = score_step_coefficients(t0, h, beta0, beta1, m_inv, gamma, neps, MIXED)
    if OFFICIAL:
        tc = t0
        hc = 0.5 * h
    else:
        tc = t0 - 0.5 * h
        hc = tc - t1
    c_xx, c_xv, c_vx, c_vv, c11, c21, c22 = half_step_coefficients(tc, hc, beta0, beta1, m_inv)
    # a zero span is exactly the identity (a_xx = a_vv = 1, the rest 0), so no per-value selects
    h_open = tl.where(opening, 0.5 * (t1 - t2), 0.0)
    o_xx, o_xv, o_vx, o_vv, o11, o21, o22 = half_step_coefficients(t1, h_open, beta0, beta1, m_inv)
    return (alpha, kappa, c_xx, c_xv, c_vx, c_vv, c11, c21, c22,
            o_xx, o_xv, o_vx, o_vv, o11, o21, o22)


# ---- probe: the helpers above on a vector of times, for tests ------------------------------

PROBE_COLUMNS = {
    "perturb": ("a_xx", "a_xv", "a_vx", "a_vv", "s_xx", "s_xv", "s_vv", "l11", "l21", "l22"),
    "loss": ("c", "w", "a"),
    "mixed": ("c0", "c1"),
    "half_step": ("a_xx", "a_xv", "a_vx", "a_vv", "l11", "l21", "l22"),
    "score_step": ("alpha", "kappa"),
    "affine": ("c_xx", "c_xv", "c_vx", "c_vv", "c_vy", "sigma"),
}
_PROBE_KINDS = {name: i for i, name in enumerate(PROBE_COLUMNS)}


@triton.jit
def _put(out_ptr, rows, mask, K: tl.constexpr, j: tl.constexpr, value):
    tl.store(out_ptr + rows * K + j, value.to(tl.float64), mask=mask)


@triton.jit
def _probe_kernel(t_ptr, h_ptr, sde_ptr, out_ptr, n, s_t, s_h,
                  WHAT: tl.constexpr, CODE: tl.constexpr, MIXED: tl.constexpr, OBJECTIVE: tl.constexpr,
                  OUTPUT: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = rows < n
    t = tl.load(t_ptr + rows * s_t, mask=mask, other=1.0).to(tl.float64)
    h = tl.load(h_ptr + rows * s_h, mask=mask, other=0.5).to(tl.float64)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, 1)
    if WHAT == 0:
        r = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps, CODE)
        for j in tl.static_range(10):
            _put(out_ptr, rows, mask, K, j, r[j])
    elif WHAT == 1:
        c, w, a = loss_coefficients(t, beta0, beta1, m_inv, gamma, neps, CODE, OBJECTIVE, OUTPUT)
        _put(out_ptr, rows, mask, K, 0, c)
        _put(out_ptr, rows, mask, K, 1, w)
        _put(out_ptr, rows, mask, K, 2, a)
    elif WHAT == 2:
        c0, c1 = score_coefficients(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE, OUTPUT)
        _put(out_ptr, rows, mask, K, 0, c0)
        _put(out_ptr, rows, mask, K, 1, c1)
    elif WHAT == 3:
        r = half_step_coefficients(t, h, beta0, beta1, m_inv)
        for j in tl.static_range(7):
            _put(out_ptr, rows, mask, K, j, r[j])
    elif WHAT == 4:
        alpha, kappa = score_step_coefficients(t, h, beta0, beta1, m_inv, gamma, neps, MIXED)
        _put(out_ptr, rows, mask, K, 0, alpha)
        _put(out_ptr, rows, mask, K, 1, kappa)
    else:
        r = affine_coefficients(t, h, beta0, beta1, m_inv, gamma, neps, CODE, MIXED)
        for j in tl.static_range(6):
            _put(out_ptr, rows, mask, K, j, r[j])


def probe(kind: str, t: torch.Tensor, h: torch.Tensor, params: List[float], code: int = 0,
          mixed: bool = False, objective: int = 0, output: int = 0) -> torch.Tensor:
    """Evaluate the in-kernel coefficient helpers for each time, in float64.

    Args:
        kind: one of ``PROBE_COLUMNS`` ("perturb", "loss", "mixed", "half_step", "score_step", "affine").
        t, h: (N,) float tensors on one device (h: the step size; read by half_step, score_step, affine).
        params: the 5 CLD parameters in ``cld_fast.sde.PARAMS`` order.
        code: the objective (perturb), weighting (loss) or affine kind code; ignored otherwise.
        mixed: fold the mixed score (score_step, affine).
        objective, output: the objective and output codes of "loss" and "mixed" (score_coefficients).
    Returns:
        (N, len(PROBE_COLUMNS[kind])) float64 tensor on t's device, columns as ``PROBE_COLUMNS[kind]``.
    """
    if kind not in PROBE_COLUMNS:
        raise ValueError(f"kind must be one of {tuple(PROBE_COLUMNS)}, got {kind!r}")
    n = t.numel()
    k = len(PROBE_COLUMNS[kind])
    sde = torch.tensor([float(p) for p in params], dtype=torch.float64, device=t.device)
    out = torch.empty(n, k, dtype=torch.float64, device=t.device)
    if n == 0:
        return out
    t1, h1 = t.reshape(n), h.reshape(n)
    block = 128
    with device_guard(t.device):
        launch(_probe_kernel, (triton.cdiv(n, block),), t1, h1, sde, out, n, t1.stride(0), h1.stride(0),
               WHAT=_PROBE_KINDS[kind], CODE=int(code), MIXED=bool(mixed), OBJECTIVE=int(objective),
               OUTPUT=int(output), K=k, BLOCK=block)
    return out
