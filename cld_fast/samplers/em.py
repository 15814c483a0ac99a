"""Euler-Maruyama on the reverse SDE (the baseline of the CLD paper, and the VP-SDE's sampler).

Step i from t = ts[i] to ts[i + 1] in reverse time, h = ts[i] - ts[i + 1]:

    u <- u + [-f(u, t) + G G^T score(u, t)] h + G sqrt(h) z,    z ~ N(0, I)

which the SDE object takes as one step (``sde.em_step_``: the fused CLD kernel, or plain torch ops
for the VP-SDE), followed by the optional noise-free denoising step at t = eps.
"""
from __future__ import annotations

import torch

from ..sde import CLD, VPSDE
from .core import Stepper, guided_kwargs, register_sampler


class EulerMaruyama(Stepper):
    conditions = True
    guides = True

    def step(self, u: torch.Tensor, y) -> None:
        """One reverse Euler-Maruyama step ts[counter] -> ts[counter + 1], then counter += 1 (a
        classifier-free ``Guided`` y is combined in the SDE's step)."""
        y, guide = guided_kwargs(y)
        self.sde.em_step_(u, y, self.plan.grid, self.counter, self.seed, mixed=self.mixed, backend=self.backend,
                          obs=self.obs, **guide)
        self.counter.add_(1)


register_sampler("em", stepper=EulerMaruyama, sdes=(CLD, VPSDE), summary="Euler-Maruyama on the reverse SDE")
