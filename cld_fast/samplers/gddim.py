"""gDDIM: a deterministic exponential-integrator multistep sampler in the R frame (Zhang et al. 2022).

With the perturbation covariance Sigma(t) = R(t) R(t)^T of the HSM kernel (R a rotated Cholesky factor
whose frame makes the integrals below smooth), write the probability-flow ODE in terms of
eps_R = -R^T grad_u log p_t(u). Between two grid times it is linear in u plus a term linear in eps_R;
eps_R is extrapolated with the Lagrange polynomial through the last ``order`` evaluations and the
linear part is solved exactly:

    u_{i+1} = Psi(t_{i+1}, t_i) u_i + sum_j C_j eps_R(u_{i-j}, t_{i-j})
    C_j = int_{t_i}^{t_{i+1}} Psi(t_{i+1}, tau) (D Sigma^-1 R / 2)(tau) l_j(tau) dtau

``predict="x0"`` extrapolates the Tweedie estimate E[x0 | u] instead. The last step (``denoise``)
sets x to E[x0 | u] at t = eps. The per-step coefficients (``gddim_table``) are computed once per run
in float64 by Gauss-Legendre quadrature; each step is the network plus one fused kernel
(``ops.gddim_step_``) that converts the score input to eps_R (or x0_hat), applies the update and
keeps the history in a ring buffer.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..sde import CLD, GDDIM_COLS, GDDIM_PREDICTIONS, integrate_log, legendre_nodes
from .core import Option, Stepper, guided_args, register_sampler

ORDERS = (1, 2, 3)
MIN_EPS = 1e-12  # below it the float64 table loses its digits (measured: garbage at 1e-17, drift at 1e-14)
# Chosen on four 2-D mixtures with exact and 1%-perturbed scores (bench/results/sampler_defaults-cpu.md):
# without it a 1% score error where a(t) ~ 1e-5 makes orders 2-3 diverge.
FIRST_ORDER_BELOW = 0.01


def gddim_table(sde: CLD, ts, order: int = 2, predict: str = "eps", mixed: bool = False, denoise: bool = True,
                nodes: int = 48, denoise_time: Optional[float] = None, first_order_below: float = 0.0) -> torch.Tensor:
    """Per-step coefficients of the exponential-integrator multistep sampler, (S, GDDIM_COLS) float64.

    Step i runs from ts[i] to ts[i + 1] (S = n steps, plus a last row when ``denoise``): with y the
    score input evaluated at (u, ts[i]) and cur = E (x, v, y) (2 numbers per element), the update is
    u <- Lin u + C_0 cur + sum_{j >= 1} C_j cur_{i - j}, and cur is kept for the next steps.
    ``predict="eps"``: cur = eps_R (gDDIM in the R frame), Lin = Psi(t_{i+1}, t_i) and
    C_j = int Psi(t_{i+1}, tau) (D Sigma^-1 R / 2)(tau) l_j(tau) dtau; ``predict="x0"``: cur = (x0_hat, 0),
    Lin = R(t_{i+1}) R(t_i)^-1 and C_j = -int R(t_{i+1}) R(tau)^-1 (D Sigma^-1 a / 2)(tau) l_j(tau) dtau;
    l_j the Lagrange basis on the last min(order, i + 1) evaluation times. The denoising row
    sets x to E[x0 | u] at ``denoise_time`` (default ts[n]; Tweedie) and keeps v. Columns: E (6, row-major 2x3), Lin (4),
    C_0, C_1, C_2 (4 each, row-major 2x2). Integrals by ``nodes``-point Gauss-Legendre.
    Evaluations made where the data's share of the mean, a_xx(ts[i]), is below ``first_order_below``
    take no part in any extrapolation (a step starting there is of order 1, and the later steps
    extrapolate only through evaluations made past it): there x0_hat and eps_R carry the score's error
    divided by a tiny a(t), which a higher order's extrapolation carries into the following steps.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if predict not in GDDIM_PREDICTIONS:
        raise ValueError(f"predict must be one of {GDDIM_PREDICTIONS}, got {predict!r}")
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    n = ts.numel() - 1
    f64 = torch.float64
    rows = torch.zeros(n + (1 if denoise else 0), GDDIM_COLS, dtype=f64)
    if n >= 1:
        theta = torch.zeros(n + 1, dtype=f64)
        theta[1:] = integrate_log(sde.rframe_angle_rate, ts[:-1], ts[1:], nodes).cumsum(0)
        x_gl, w_gl = legendre_nodes(nodes)
        low = (sde.perturbation_kernel(ts[:-1], "hsm").a_xx < first_order_below).tolist()
        usable = 0  # evaluations made where a_xx >= first_order_below, counted back from step i
        for i in range(n):
            s, t = ts[i], ts[i + 1]
            # nodes uniform in log tau (the integrands grow like tau^-3/2 towards 0): dtau = tau dlog tau
            half, mid = 0.5 * (torch.log(t) - torch.log(s)), 0.5 * (torch.log(t) + torch.log(s))
            tau = torch.exp(mid + half * x_gl)
            w_tau = w_gl * half * tau
            # theta at the nodes: theta(s) + int_s^tau (its own quadrature per node)
            th_tau = theta[i] + integrate_log(sde.rframe_angle_rate, s.expand_as(tau), tau, 16, pieces=1)
            r_tau = sde.rframe(tau, th_tau)
            k = sde.perturbation_kernel(tau, "hsm")
            det = k.s_xx * k.s_vv - k.s_xv * k.s_xv
            # (D Sigma^-1 / 2): only its v row, Gamma beta (Sigma^-1)_{v,:}
            gb = sde.Gamma * sde.beta(tau)
            dsi_v = torch.stack([-k.s_xv / det, k.s_xx / det], -1) * gb[:, None]  # (N, 2)
            r_s = sde.rframe(s, theta[i])
            r_t = sde.rframe(t, theta[i + 1])
            usable = 0 if low[i] else usable + 1
            k_order = max(1, min(order, usable))
            basis_nodes = [ts[i - j] for j in range(k_order)]
            if predict == "eps":
                vrow = (dsi_v[:, :, None] * r_tau).sum(1)  # (N, 2): (D Sigma^-1 R / 2) v row
                psi = sde.transition_matrix(t, tau)  # (N, 2, 2)
                integrand = psi[:, :, 1:2] * vrow[:, None, :]  # (N, 2, 2)
                lin = sde.transition_matrix(t, s)
            else:
                a_v = dsi_v[:, 0] * k.a_xx + dsi_v[:, 1] * k.a_vx  # (D Sigma^-1 a / 2)_v, (N,)
                col = torch.linalg.solve(r_tau, torch.stack([torch.zeros_like(a_v), a_v], -1)[..., None])
                integrand = torch.zeros(tau.numel(), 2, 2, dtype=f64)
                integrand[:, :, 0] = -(r_t @ col)[..., 0]
                lin = r_t @ torch.linalg.inv(r_s)
            rows[i, 6:10] = lin.reshape(4)
            for j in range(k_order):
                ell = torch.ones_like(tau)
                for m, tm in enumerate(basis_nodes):
                    if m != j:
                        ell = ell * (tau - tm) / (basis_nodes[j] - tm)
                cj = (integrand * (ell * w_tau)[:, None, None]).sum(0)
                rows[i, 10 + 4 * j:14 + 4 * j] = cj.reshape(4)
            kc = sde.tweedie_coefficients(s, mixed)
            if predict == "x0":
                rows[i, 0:3] = kc
            else:
                ks = sde.perturbation_kernel(s, "hsm")
                res = torch.stack([torch.stack([1.0 - ks.a_xx * kc[0], -ks.a_xx * kc[1], -ks.a_xx * kc[2]]),
                                   torch.stack([-ks.a_vx * kc[0], 1.0 - ks.a_vx * kc[1], -ks.a_vx * kc[2]])])
                rows[i, 0:6] = (torch.linalg.inv(r_s) @ res).reshape(6)
    if denoise:
        last = rows[-1]
        last[0:3] = sde.tweedie_coefficients(ts[-1] if denoise_time is None else float(denoise_time), mixed)
        last[6:10] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=f64)
        last[10] = 1.0
    return rows


class GDDIM(Stepper):
    conditions = True
    guides = True
    options = (
        Option("order", int, 2, "multistep order: Lagrange extrapolation through the last `order` evaluations",
               choices=ORDERS),
        Option("predict", str, "x0", "what is extrapolated: 'x0' (the Tweedie estimate) or 'eps' (eps_R, gDDIM)",
               choices=GDDIM_PREDICTIONS),
        Option("first_order_below", float, FIRST_ORDER_BELOW,
               "evaluations where a_xx(t) is below this take no part in extrapolation (order 1 there)", minimum=0.0),
    )

    def __init__(self, sde, plan, u, seed, mixed, backend=None, **options):
        super().__init__(sde, plan, u, seed, mixed, backend, **options)
        if plan.eps < MIN_EPS:
            raise ValueError(f"eps = {plan.eps:g} is below what gddim's float64 coefficients resolve; use eps >= "
                             f"{MIN_EPS:g} (the default is 1e-3)")
        self.table = gddim_table(sde, plan.ts, self.opts["order"], self.opts["predict"], mixed=mixed,
                                 denoise=plan.denoise, denoise_time=plan.eps,
                                 first_order_below=self.opts["first_order_below"]).to(u.device)
        self.hist = ops.gddim_history(u, self.opts["order"], self.opts["predict"])

    def step(self, u: torch.Tensor, y) -> None:
        """The fused step after the network evaluation at ts[counter], then counter += 1 (on the device);
        a classifier-free ``Guided`` y is combined in it."""
        y, y_uncond, weight = guided_args(y)
        ops.gddim_step_(u, y, self.hist, self.table, step=self.counter, backend=self.backend, obs=self.obs,
                        ts=self.plan.grid, sde=self.sde, seed=self.seed, y_uncond=y_uncond, guide_weight=weight)
        self.counter.add_(1)

    def denoise(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """The table's last row: x <- E[x0 | u] at t = eps (Tweedie), v kept."""
        self.step(u, y)


register_sampler("gddim", stepper=GDDIM, sdes=(CLD,), default_striding="polynomial",
                 summary="deterministic exponential-integrator multistep in the R frame (gDDIM), order 1-3")
