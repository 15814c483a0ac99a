"""SSCS, the symmetric splitting CLD sampler (Dockhorn et al. 2022, the official ``get_sscs_sampler``).

One step of size h at forward time t, in reverse time:

    u <- A(h/2) u          the linear part solved exactly: mean K u and Gaussian noise of covariance Sigma_h
    v <- v + 2 Gamma (score(u, t) + m_inv v) beta(t) h      a full Euler step of the score part
    u <- A(h/2) u          the closing half step

The closing half step of step i and the opening half step of step i + 1 are one fused kernel
(``ops.sscs_step_``), so a run launches one kernel per network evaluation: the opening half step
of step 0 (``begin``), then per step the network and ``sscs_step_``, then the optional denoising
step (a noise-free Euler step of the reverse SDE at t = eps). All coefficients are computed
in-kernel from the time grid and the step counter; noise is Philox keyed by (seed, step).
"""
from __future__ import annotations

import torch

from .. import ops
from ..sde import CLD
from .core import Option, Stepper, guided_args, register_sampler


class SSCS(Stepper):
    options = (
        Option("sscs_official_half_steps", bool, False,
               "reproduce the official CLD-SGM half steps, whose closing half step integrates beta over the "
               "first half of the step (differs from the exact split when beta1 != 0; identical otherwise)"),
        Option("first_half_step", bool, True,
               "take the opening half step before the first score evaluation; False treats the start state as "
               "already opened, exact in distribution for a prior draw at t = 1 (the CLD prior is invariant "
               "under the linear half step): what the diffusers scheduler does"),
    )

    conditions = True
    guides = True

    def begin(self, u: torch.Tensor) -> None:
        """The opening half step of step 0: ts[0] -> ts[0] - h_0 / 2 (with a condition, its observed coordinates
        are then a perturbation of x_obs at ts[0] - h_0 / 2)."""
        if not self.opts["first_half_step"]:
            if float(self.plan.ts[0]) != 1.0:
                raise ValueError("first_half_step=False treats the start as an opened prior draw, so the run must "
                                 f"start at t = 1, not {float(self.plan.ts[0]):.6g}")
            super().begin(u)
            return
        t0, t1 = float(self.plan.ts[0]), float(self.plan.ts[1])
        opening = torch.tensor([t0, t0 - 0.5 * (t0 - t1)], dtype=torch.float64).to(u.device)
        ops.half_step_(u, opening, self.sde, step=torch.zeros_like(self.counter), seed=self.seed,
                       backend=self.backend, obs=self.obs)

    def step(self, u: torch.Tensor, y) -> None:
        """Score Euler step, closing half step and the next step's opening half step: one fused kernel
        (a classifier-free ``Guided`` y is combined in it)."""
        y, y_uncond, weight = guided_args(y)
        ops.sscs_step_(u, y, self.plan.grid, self.sde, step=self.counter, mixed=self.mixed, seed=self.seed,
                       backend=self.backend, official_half_steps=self.opts["sscs_official_half_steps"], obs=self.obs,
                       y_uncond=y_uncond, guide_weight=weight)
        self.counter.add_(1)


register_sampler("sscs", stepper=SSCS, sdes=(CLD,), default_striding="quadratic",
                 summary="symmetric splitting CLD sampler: exact linear half steps around a score Euler step")
