"""An independent float64 reference of the CLD and VP-SDE math, for tests.

Written from the published formulas (Dockhorn, Vahdat, Kreis, ICLR 2022, and /work/shared/SPEC.md;
Song et al. 2021 for the reverse SDE), in the plain textbook form and with nothing imported from
``cld_fast.sde``: a test that compares the package with this module cannot pass because both sides
share a formula. Every function takes plain floats or float64 tensors and returns float64 tensors.

Notation: forward time t (t = 0 is data), beta(t) = beta0 + beta1 t, B(t) = int_0^t beta,
Gamma = 2 / sqrt(m_inv), g = sqrt(m_inv) / 2. ``p`` is a dict (or an object with these attributes)
of beta0, beta1, m_inv, gamma, numerical_eps.
"""
import math

import torch

F64 = torch.float64


def _get(p, name):
    return p[name] if isinstance(p, dict) else getattr(p, name)


def _t(x):
    return x.to(F64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=F64)


def beta(p, t):
    return _get(p, "beta0") + _get(p, "beta1") * _t(t)


def big_b(p, t):
    t = _t(t)
    return _get(p, "beta0") * t + 0.5 * _get(p, "beta1") * t * t


def consts(p):
    """(m_inv, Gamma, g, M)."""
    m_inv = _get(p, "m_inv")
    return m_inv, 2.0 / math.sqrt(m_inv), math.sqrt(m_inv) / 2.0, 1.0 / m_inv


# ---- forward perturbation kernel (SPEC "Perturbation kernel") ----------------------------------------
def mean_matrix(p, t):
    """(..., 2, 2) A(t) with mean (x, v) = A (x0, v0)."""
    _, _, g, _ = consts(p)
    b = big_b(p, t)
    c = torch.exp(-2 * g * b)
    return torch.stack([torch.stack([c * (1 + 2 * g * b), c * 4 * g * g * b], -1),
                        torch.stack([-c * b, c * (1 - 2 * g * b)], -1)], -2)


def covariance(p, t, objective="hsm"):
    """(s_xx, s_xv, s_vv) of p(u_t | x0) (HSM: v0 marginalised) or p(u_t | x0, v0) (DSM), textbook form."""
    m_inv, gam, g, M = consts(p)
    s0x, s0v = (0.0, _get(p, "gamma") * M) if objective == "hsm" else (0.0, 0.0)
    eps = _get(p, "numerical_eps")
    b = big_b(p, t)
    m = torch.exp(-4 * g * b)
    s_xx = m * (s0x + 1 / m - 1 + 4 * g * b * (s0x - 1) + 4 * g ** 2 * b ** 2 * (s0x - 2)
                + 16 * g ** 4 * b ** 2 * s0v) + eps
    s_xv = m * (-s0x * b + 4 * g ** 2 * b * s0v - 2 * g * b ** 2 * (s0x - 2) - 8 * g ** 3 * b ** 2 * s0v)
    s_vv = m * (gam ** 2 * (1 / m - 1) / 4 + gam * b - 4 * g * b * s0v + 4 * g ** 2 * b ** 2 * s0v + s0v
                + b ** 2 * (s0x - 2)) + eps
    return s_xx, s_xv, s_vv


def cholesky(s_xx, s_xv, s_vv):
    """Lower factor (l11, l21, l22) of [[s_xx, s_xv], [s_xv, s_vv]] by torch.linalg.cholesky."""
    sig = torch.stack([torch.stack([s_xx, s_xv], -1), torch.stack([s_xv, s_vv], -1)], -2)
    low = torch.linalg.cholesky(sig)
    return low[..., 0, 0], low[..., 1, 0], low[..., 1, 1]


def perturb(p, x0, t, eps_x, eps_v, v0=None, objective="hsm"):
    """u_t = A (x0, v0) + L eps; x0, eps: (B, D); t: (B,). Returns (x, v) float64."""
    a = mean_matrix(p, t)
    l11, l21, l22 = cholesky(*covariance(p, t, objective))
    col = lambda c: c.reshape(-1, 1)  # noqa: E731
    x0 = x0.to(F64)
    v0 = torch.zeros_like(x0) if v0 is None else v0.to(F64)
    x = col(a[..., 0, 0]) * x0 + col(a[..., 0, 1]) * v0 + col(l11) * eps_x.to(F64)
    v = col(a[..., 1, 0]) * x0 + col(a[..., 1, 1]) * v0 + col(l21) * eps_x.to(F64) + col(l22) * eps_v.to(F64)
    return x, v


# ---- reverse time (SPEC "SSCS") -------------------------------------------------------------------------
def half_step(p, t_from, t_to, x, v, zx=None, zv=None):
    """Exact linear part of the reverse SDE from forward time t_from to t_to < t_from (scalar times)."""
    _, gam, g, _ = consts(p)
    bd = big_b(p, t_to) - big_b(p, t_from)
    k = torch.exp(2 * g * bd)
    nx = k * ((1 - 2 * g * bd) * x + 4 * g * g * bd * v)
    nv = k * (-bd * x + (1 + 2 * g * bd) * v)
    if zx is not None:
        k4 = torch.exp(4 * g * bd)
        s_xx = k4 * (1 / k4 - 1 + 4 * g * bd - 8 * g * g * bd * bd)
        s_xv = -k4 * 4 * g * bd * bd
        s_vv = k4 * (-gam ** 2 * (1 - 1 / k4) / 4 - gam * bd - 2 * bd * bd)
        l11 = torch.sqrt(s_xx)
        l21 = s_xv / l11
        l22 = torch.sqrt(s_vv - l21 * l21)
        nx = nx + l11 * zx
        nv = nv + l21 * zx + l22 * zv
    return nx, nv


def score_kick(p, t, h, v, score):
    """SSCS score part at forward time t, size h: v + 2 Gamma (score + m_inv v) beta(t) h."""
    m_inv, gam, _, _ = consts(p)
    return v + 2 * gam * (score + m_inv * v) * beta(p, t) * h


def sscs_step(p, t, t_next, x, v, score, z=None):
    """One SSCS step without its opening half step: score kick at t, closing half step t - h/2 -> t_next."""
    h = float(t) - float(t_next)
    v = score_kick(p, t, h, v, score)
    zx, zv = (None, None) if z is None else z
    return half_step(p, float(t) - 0.5 * h, t_next, x, v, zx, zv)


def reverse_drift(p, t, x, v, score, prob_flow=False):
    """(dx, dv) per unit of reverse time: minus the forward drift plus (2 or 1) Gamma beta score."""
    m_inv, gam, _, _ = consts(p)
    bt = beta(p, t)
    fx = m_inv * v * bt
    fv = (-x - gam * m_inv * v) * bt
    w = 1.0 if prob_flow else 2.0
    return -fx, -fv + w * gam * bt * score


def em_step(p, t, h, x, v, score, z=None):
    """Euler-Maruyama step of the reverse SDE from t to t - h; noise-free (the denoising step) when z is None."""
    _, gam, _, _ = consts(p)
    dx, dv = reverse_drift(p, t, x, v, score)
    nx, nv = x + h * dx, v + h * dv
    if z is not None:
        nv = nv + math.sqrt(2 * gam * float(beta(p, t)) * h) * z
    return nx, nv


def posterior_mean_x0(p, t, x, v, score_v):
    """E[x0 | u_t] from grad_v log p_t(u) (Tweedie, v0 marginalised), by a 2x2 inverse of Sigma(t)."""
    s_xx, s_xv, s_vv = covariance(p, t, "hsm")
    sig = torch.stack([torch.stack([s_xx, s_xv], -1), torch.stack([s_xv, s_vv], -1)], -2)
    prec = torch.linalg.inv(sig)
    a = mean_matrix(p, t)
    pv_x, pv_v = prec[..., 1, 0], prec[..., 1, 1]
    # grad_v log p = (P (a x0 - u))_v  =>  x0 = (score_v + (P u)_v) / (P a)_v
    return (score_v + pv_x * x + pv_v * v) / (pv_x * a[..., 0, 0] + pv_v * a[..., 1, 0])


# ---- VP-SDE (Song et al. 2021) -----------------------------------------------------------------------
def vp_beta(beta_min, beta_max, t):
    return beta_min + (beta_max - beta_min) * _t(t)


def vp_em_step(beta_min, beta_max, t, h, x, score, z=None):
    """Reverse SDE dx = [f - g^2 score] dt + g dW run backwards, f = -beta x / 2, g^2 = beta: one EM step."""
    bt = vp_beta(beta_min, beta_max, t)
    f = -0.5 * bt * x
    nx = x - h * (f - bt * score)
    if z is not None:
        nx = nx + torch.sqrt(bt * h) * z
    return nx


def vp_pf_drift(beta_min, beta_max, t, x, score):
    """Forward-time probability-flow drift f - g^2 score / 2."""
    bt = vp_beta(beta_min, beta_max, t)
    return -0.5 * bt * x - 0.5 * bt * score
