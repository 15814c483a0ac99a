"""The probability-flow ODE, integrated with adaptive Dormand-Prince 5(4) on the device.

    du/dt = f(u, t) - G G^T score(u, t) / 2        (forward time, from t = 1 down to eps)

The drift is the SDE's (``sde.pf_drift``: one fused kernel for CLD). The solver (written here) keeps
its state, step size and error norm on the device and reads back one small tensor per attempted
step, the accept/reject decision: one host synchronisation per attempted step, the price of
adaptivity. ``max_nfe`` bounds the score evaluations, the denoising step included.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from ..sde import CLD, VPSDE
from .core import NFEBudgetError, Option, SamplerRun, register_sampler

ODE_MAX_NFE = 10_000  # default score-evaluation budget

_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
# 5th-order minus embedded 4th-order weights (the error estimate).
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _combine(y: Sequence[torch.Tensor], h: torch.Tensor, weights, ks) -> List[torch.Tensor]:
    """y + h * sum_j w_j k_j for every component (h a 0-d device tensor)."""
    out = []
    for c, yc in enumerate(y):
        acc = None
        for w, k in zip(weights, ks):
            if w == 0.0:
                continue
            term = k[c] * w
            acc = term if acc is None else acc + term
        out.append(yc if acc is None else yc + (h * acc).to(yc.dtype))
    return out


def _rms_norm(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max over components of the RMS over all elements (float64 0-d device tensor)."""
    norms = [p.to(torch.float64).pow(2).mean().sqrt() for p in parts]
    return norms[0] if len(norms) == 1 else torch.stack(norms).max()


def dopri5(f: Callable, y0: Sequence[torch.Tensor], t0: float, t1: float, rtol: float, atol: float,
           on_accept: Optional[Callable] = None, max_steps: int = 100_000, max_nfe: Optional[int] = None):
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with adaptive Dormand-Prince 5(4).

    ``y0`` is a list of tensors (the state may have several components, e.g. (u, log p)); ``f(t, y)``
    gets t as a 0-d float64 device tensor and returns a list of the same shapes. The error norm is,
    per component, the RMS over the whole batch of err / (atol + rtol * max(|y|, |y_new|)), maximised
    over components; a step is accepted when it is <= 1. Step-size control as scipy's RK45
    (safety 0.9, factors in [0.2, 10], no growth right after a rejection), first step by Hairer's
    rule (two evaluations). Everything stays on the device; the one host synchronisation per
    attempted step reads five numbers (accepted, last step, t, new t, next h) at once.

    ``max_nfe``: raise :class:`NFEBudgetError` (naming the time reached) before an attempted step
    would take the evaluations past it.

    Returns (y1, nfe, n_accepted, n_rejected).
    """
    device = y0[0].device
    f64 = dict(dtype=torch.float64, device=device)
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.tensor(t0, **f64)
    t_end = torch.tensor(t1, **f64)
    span = abs(t1 - t0)
    y = list(y0)

    # Initial step (Hairer, Norsett, Wanner; as scipy's select_initial_step), on the device.
    k1 = f(t, y)
    scale0 = [atol + rtol * yc.abs() for yc in y]
    d0 = _rms_norm([yc / s for yc, s in zip(y, scale0)])
    d1 = _rms_norm([kc / s for kc, s in zip(k1, scale0)])
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.clamp(d1, min=1e-300))
    h0 = torch.clamp(h0, max=span)
    y_probe = [yc + (direction * h0 * kc).to(yc.dtype) for yc, kc in zip(y, k1)]
    k_probe = f(t + direction * h0, y_probe)
    d2 = _rms_norm([(kp - kc) / s for kp, kc, s in zip(k_probe, k1, scale0)]) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.clamp(dmax, min=1e-300)) ** 0.2)
    h = torch.minimum(torch.minimum(100.0 * h0, h1), torch.tensor(span, **f64))
    nfe = 2
    n_acc = n_rej = 0
    prev_rejected = torch.zeros((), dtype=torch.bool, device=device)
    t_host = float(t0)
    for _ in range(max_steps):
        if max_nfe is not None and nfe + 6 > max_nfe:
            raise NFEBudgetError(f"dopri5: max_nfe = {max_nfe} evaluations used up at t = {t_host:.6g} "
                                 f"(integrating from t = {t0:g} to {t1:g})", t_host, nfe)
        remaining = (t_end - t).abs()
        last = h >= remaining
        hs = direction * torch.minimum(h, remaining)
        ks = [k1]
        for stage in range(1, 6):  # k2 .. k6
            yi = _combine(y, hs, _DP_A[stage], ks)
            ks.append(f(t + _DP_C[stage] * hs, yi))
        y_new = _combine(y, hs, _DP_B, ks)
        k7 = f(t + hs, y_new)  # FSAL: the next step's first stage
        ks.append(k7)
        nfe += 6
        err = _combine([torch.zeros_like(yc) for yc in y], hs, _DP_E, ks)
        scale = [atol + rtol * torch.maximum(yc.abs(), yn.abs()) for yc, yn in zip(y, y_new)]
        err_norm = _rms_norm([e / s for e, s in zip(err, scale)])
        accept = err_norm <= 1.0
        factor = torch.where(err_norm == 0, torch.full_like(err_norm, _MAX_FACTOR),
                             _SAFETY * torch.clamp(err_norm, min=1e-300) ** -0.2)
        factor = torch.clamp(factor, _MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(accept & prev_rejected, torch.clamp(factor, max=1.0), factor)
        h = hs.abs() * factor
        t_new = t + hs
        prev_rejected = ~accept
        # The one host synchronisation of the step: accept?, last step?, t before and after, next h.
        acc, was_last, t_old, t_host, h_host = torch.stack([accept.double(), last.double(), t, t_new, h]).tolist()
        if not acc:
            t_host = t_old
        if acc:
            y, k1, t = y_new, k7, t_new
            n_acc += 1
            if on_accept is not None:
                on_accept(n_acc - 1, t_host, y)
            if was_last:
                return y, nfe, n_acc, n_rej
        else:
            n_rej += 1
            if not math.isfinite(h_host):
                raise RuntimeError(f"dopri5: the drift is not finite near t = {t_old:.6g} (NaN or inf in the "
                                   "score function's output or the state)")
            if h_host < 1e-14 * max(1.0, abs(t_old)):
                raise RuntimeError(f"dopri5: step size underflow at t = {t_old:.6g} (h = {h_host:.3g}); "
                                   "the tolerances may be too tight")
    raise RuntimeError(f"dopri5: no convergence after {max_steps} steps")


def _pf_drift(run: SamplerRun):
    """f(t, [u]) -> [du/dt] of the probability-flow ODE (forward time)."""
    sde, ev = run.sde, run.ev

    def f(t, y):
        u = y[0]
        tv = t.reshape(1)
        out = ev(u, tv.to(u.dtype).expand(u.shape[0]))
        return [sde.pf_drift(u, out, tv, mixed=ev.fold, backend=run.backend)]

    return f


def ode_loop(run: SamplerRun) -> int:
    """Integrate from ``run.t_start`` to ``run.eps``, then the optional denoising step; returns the NFE."""
    ev, u = run.ev, run.u

    def on_accept(i, t, y):
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(t=f"{t:.4g}", nfe=ev.calls)
        if run.callback is not None:
            run.callback(i, t, y[0])

    budget = run.max_nfe - (1 if run.denoise else 0)  # one evaluation is the denoising step's
    try:
        (u_end,), _, n_acc, _ = dopri5(_pf_drift(run), [u], run.t_start, run.eps, run.rtol, run.atol,
                                       on_accept=on_accept, max_nfe=budget)
    except NFEBudgetError as exc:  # restated with the caller's max_nfe
        raise NFEBudgetError(f"ode: max_nfe = {run.max_nfe} score evaluations used up at t = {exc.t:.6g} (from t = "
                             f"{run.t_start:g} to eps = {run.eps:g}); the score may be stiff or broken: raise max_nfe "
                             "or loosen rtol / atol", exc.t, exc.nfe) from None
    u.copy_(u_end)
    if run.denoise:
        y = ev(u, torch.full((u.shape[0],), run.eps, dtype=u.dtype, device=u.device))
        run.sde.denoise_(u, y, run.eps, mixed=ev.fold, backend=run.backend)
        if run.callback is not None:
            run.callback(n_acc, run.eps, u)
    return ev.calls


register_sampler(
    "ode", ode_loop, sdes=(CLD, VPSDE), fixed_steps=False, custom_grid=True,
    summary="probability-flow ODE, adaptive Dormand-Prince 5(4)",
    options=(Option("rtol", float, 1e-5, "relative tolerance of the adaptive solver", positive=True,
                    ignored_elsewhere=True),
             Option("atol", float, 1e-5, "absolute tolerance of the adaptive solver", positive=True,
                    ignored_elsewhere=True),
             Option("max_nfe", int, ODE_MAX_NFE, "most score evaluations allowed, the denoising step included",
                    minimum=8)))
