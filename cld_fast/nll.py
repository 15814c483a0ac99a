"""Negative log-likelihood bounds in bits/dim through the probability-flow ODE (official CLD-SGM definition).

    res = cf.likelihood(score_fn, x, sde)            # res.bpd (B,), res.nll (B,), res.nfe

CLD (official ``likelihood.py`` and ``compute_*_likelihood`` of CLD-SGM): draw v0 ~ N(0, gamma M I),
set u0 = (x, v0) at forward time t = eps, integrate the probability-flow ODE du/dt = f(u, t) together
with d(delta)/dt = div_u f(u, t) to t = 1, and take

    log p(u0) ~= prior_logp(u1) + delta,   nll = -log p(u0) - H(v0),   H(v0) = D/2 (1 + log(2 pi gamma M)),

an upper bound on -log p(x) in expectation over v0 (-log p(x) <= E_v0[-log p(x, v0)] - H(v0)).
Bits/dim: bpd = nll / (D ln 2) + offset, where D = elements of one x; the offset is 0 for continuous
data and, with ``dequantize=True`` (8-bit images given in [0, 1]: x = k / 255), the official uniform
dequantisation x <- (255 x + U[0, 1)) / 256 is applied and offset = 7 bits when the model sees
centred data 2 x - 1 (``centered=True``, the official ``center_image``) or 8 bits when it sees [0, 1).
A VP-SDE has no velocity: u = x and no entropy term.

The drift is affine in u plus the score term (``CLD.reverse_affine_coefficients(t, 0, "pf_drift")``):
f_x = c_xx x + c_xv v, f_v = c_vx x + c_vv v + c_vy score(u, t). Its divergence is D c_xx (exact)
plus the trace of the v-block d f_v / d v = c_vv I + c_vy d score / d v, estimated with Hutchinson
probes e over v (Rademacher or Gaussian, fixed for the whole solve as in the official code; one
vector-Jacobian product through ``score_fn`` per probe): e^T (c_vv e + c_vy (d score / d v) e). Or
"exact": one VJP per data dimension (for low-dimensional data). This has the expectation of the
official estimator (a probe over all of u) and a lower variance: the off-diagonal blocks, which
carry no trace, are left out. The VP-SDE is the same with x in place of v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import checks
from .samplers.core import Evaluator, check_generator, check_sde
from .samplers.ode import dopri5
from .score import NetworkScore

PROBES = ("rademacher", "gaussian", "exact")


@dataclass
class LikelihoodResult:
    """What ``cf.likelihood`` returns.

    bpd: (B,) float64 bits per dimension (the bound; dequantisation offset included).
    nll: (B,) float64 the bound in nats per sample (-log p(u0) - H(v0) for CLD), before the offset.
    nfe: score-function evaluations of the ODE solve (each with ``n_probes`` VJPs, or D for "exact").
    z: the state at t = 1, (B, 2C, ...) for CLD ((B, C, ...) for a VP-SDE).
    delta_logp: (B,) float64 integral of the drift divergence from eps to 1.
    prior_logp: (B,) float64 log prior density at z.
    """

    bpd: torch.Tensor
    nll: torch.Tensor
    nfe: int
    z: torch.Tensor
    delta_logp: torch.Tensor
    prior_logp: torch.Tensor


def _randn(shape, generator, device, dtype):
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def _rand(shape, generator, device, dtype):
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def _probes(kind: str, n: int, shape, generator, device, dtype) -> List[torch.Tensor]:
    out = []
    for _ in range(n):
        if kind == "gaussian":
            out.append(_randn(shape, generator, device, dtype))
        else:
            gdev = generator.device if generator is not None else device
            r = torch.randint(0, 2, shape, generator=generator, device=gdev).to(device=device, dtype=dtype)
            out.append(2.0 * r - 1.0)
    return out


def likelihood(score_fn: Callable, x: torch.Tensor, sde, eps: float = 1e-5, method: str = "rk45",
               rtol: float = 1e-5, atol: float = 1e-5, probe: str = "rademacher", n_probes: int = 1,
               dequantize: bool = False, centered: bool = True, generator: Optional[torch.Generator] = None,
               backend: Optional[str] = None) -> LikelihoodResult:
    """NLL bound in bits/dim of data ``x`` under the probability-flow ODE of ``score_fn``.

    Args:
        score_fn: ``score_fn(u, t)`` -> grad_v log p_t(u) (VP-SDE: grad_x log p_t(x)), differentiable
            in u with torch autograd. A ``cf.score_fn`` wrapper is switched to its
            ``.differentiable()`` variant automatically.
        x: (B, C, ...) or (B, D) data, float32 or float64 (the ODE state has this dtype). With
            ``dequantize=True``: 8-bit images scaled to [0, 1].
        sde: ``cf.CLD`` or ``cf.VPSDE``.
        eps: the forward time at which the data sits (official ``likelihood_eps`` 1e-5), in (0, 1).
        method: "rk45" (adaptive Dormand-Prince 5(4) on the device).
        rtol, atol: solver tolerances.
        probe: "rademacher" (default), "gaussian" or "exact" trace of the score Jacobian.
        n_probes: Hutchinson probes averaged per evaluation (ignored by "exact").
        dequantize: apply uniform dequantisation of 8-bit data and the matching bits/dim offset.
        centered: with ``dequantize``, feed the model 2 x - 1 (offset 7 bits) instead of x (8 bits).
        generator: torch.Generator for v0, the probes and the dequantisation noise.
        backend: unused by the autograd path; accepted for a uniform signature.
    Returns:
        ``LikelihoodResult`` with per-sample ``bpd``, ``nll`` and the solver's ``nfe``.
    """
    check_sde(sde)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(u, t), got {type(score_fn).__name__}")
    checks.tensor(x, "x", min_dim=2)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    eps = float(eps)
    if method != "rk45":
        raise ValueError(f"method must be 'rk45', got {method!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"{name} must be a positive float, got {tol!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an int >= 1, got {n_probes!r}")
    check_generator(generator)
    if isinstance(score_fn, NetworkScore) and not score_fn.is_differentiable:
        score_fn = score_fn.differentiable()

    device, dtype = x.device, x.dtype
    batch = x.shape[0]
    d = x[0].numel()
    offset = 0.0
    x = x.detach()
    if dequantize:
        if bool((x.min() < 0) | (x.max() > 1)):
            raise ValueError("dequantize=True expects 8-bit data scaled to [0, 1] (x = k / 255)")
        x = (255.0 * x + _rand(x.shape, generator, device, dtype)) / 256.0
        if centered:
            x = 2.0 * x - 1.0
        offset = 7.0 if centered else 8.0

    u0 = sde.likelihood_state(x, lambda shape: _randn(shape, generator, device, dtype))
    x_shape = tuple(x.shape)
    ev = Evaluator(score_fn, sde, x_shape, fold_ok=False)
    probe_shape = x_shape
    probes = [] if probe == "exact" else _probes(probe, n_probes, probe_shape, generator, device, dtype)
    f = _augmented_drift(sde, ev, probe, probes, d)
    logp0 = torch.zeros(batch, dtype=torch.float64, device=device)
    with checks.value_checks(False):
        (z, delta), nfe, _, _ = dopri5(f, [u0, logp0], eps, 1.0, rtol, atol)
    prior = sde.prior_logp(z)
    nll = -(prior + delta) - sde.likelihood_correction(d)
    bpd = nll / (d * math.log(2.0)) + offset
    return LikelihoodResult(bpd=bpd, nll=nll, nfe=nfe, z=z.detach(), delta_logp=delta, prior_logp=prior)


def _augmented_drift(sde, ev: Evaluator, probe: str, probes: List[torch.Tensor], d: int):
    """f(t, [u, delta]) -> [du/dt, div_u f] of the probability-flow ODE in forward time."""

    def f(t, y):
        u = y[0]
        batch = u.shape[0]
        tv = t.reshape(1)
        c_fixed, c_self, c_y = sde.pf_divergence_terms(tv)
        with torch.enable_grad():
            ug = u.detach().requires_grad_(True)
            s = ev(ug, tv.to(u.dtype).expand(batch))
            if not s.requires_grad:
                raise TypeError("cf.likelihood needs a score_fn that is differentiable in u with torch autograd "
                                "(it returned a tensor without grad_fn); for cf.score_fn wrappers use .differentiable()")
            trace = _block_trace(s, ug, sde, probe, probes, c_self, c_y)
        du = sde.pf_drift(u, s.detach().to(u.dtype), tv)
        return [du, trace + d * c_fixed]

    return f


def _block_trace(s: torch.Tensor, ug: torch.Tensor, sde, probe: str, probes, c_self, c_y) -> torch.Tensor:
    """(B,) float64 trace of the drift block d f_w / d w, f_w = c_self w + c_y s(u), w = v (CLD) or x (VP).

    "exact": D c_self + c_y tr(d s / d w) with one VJP per coordinate. Hutchinson: the mean over the
    probes e of e^T (c_self e + c_y (d s / d w) e); the probe sees the whole block, so the identity
    part and the score Jacobian, which nearly cancel close to the data, are estimated together.
    """
    batch = s.shape[0]
    c_self = c_self.to(torch.float64)
    c_y = c_y.to(torch.float64)
    if probe == "exact":
        flat = s.reshape(batch, -1)
        n = flat.shape[1]
        total = torch.zeros(batch, dtype=torch.float64, device=s.device)
        for j in range(n):
            (g,) = torch.autograd.grad(flat[:, j].sum(), ug, retain_graph=j + 1 < n, allow_unused=True)
            if g is not None:
                total = total + sde.score_part(g).reshape(batch, -1)[:, j].to(torch.float64)
        return n * c_self + c_y * total
    total = torch.zeros(batch, dtype=torch.float64, device=s.device)
    for k, e in enumerate(probes):
        (g,) = torch.autograd.grad((s * e.to(s.dtype)).sum(), ug, retain_graph=k + 1 < len(probes), allow_unused=True)
        ee = e.reshape(batch, -1).to(torch.float64)
        quad = torch.zeros(batch, dtype=torch.float64, device=s.device) if g is None else \
            (sde.score_part(g).reshape(batch, -1).to(torch.float64) * ee).sum(1)
        total = total + c_self * (ee * ee).sum(1) + c_y * quad
    return total / len(probes)


__all__ = ["likelihood", "LikelihoodResult", "PROBES"]
