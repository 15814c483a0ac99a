"""Conditions for ``cf.sample``: inpainting / imputation by replacement, fused into the sampler step.

    cond = cf.Inpaint(x_obs, mask)                     # mask: 1 (True) = observed
    res = cf.sample(score_fn, x_obs.shape, sde, condition=cond)
    res.x                                               # res.x[mask] == x_obs[mask]

The replacement method (Song et al. 2021, appendix I), in CLD's state u = (x, v): after every step
the observed coordinates of the state, x and v jointly, are replaced by a fresh draw of the CLD
forward perturbation of x_obs at the time the step leaves the state at,

    (x, v) <- A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v),     v0 ~ N(0, gamma M) marginalised (the HSM kernel)

so the network always sees observed values distributed as p_t(u_obs | x0_obs), which is exact
because the perturbation kernel acts on every coordinate alone. The unobserved coordinates then follow
the unconditional score at those values: grad log p_t(u_free | u_obs) instead of the intractable
grad log p_t(u_free | x0_obs), an approximation that vanishes as t -> 0. The final denoising step
puts x_obs itself on the observed coordinates. The replacement happens inside the step kernel
(the ops' ``obs`` argument, ``cld_fast.opdefs``), so a run still launches one kernel per network
evaluation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import checks


class Inpaint:
    """Observed values and where they are observed, for ``cf.sample(..., condition=cf.Inpaint(x_obs, mask))``.

    Args:
        x_obs: (B, C, ...) or (1, C, ...) (broadcast over the batch) observed data, a floating
            tensor; its values at unobserved positions are ignored (NaN included).
        mask: the shape of x_obs, or broadcastable to it (e.g. (1, C, H, W) or (C, H, W) for one mask
            for all samples); bool, or 0/1 in any real dtype; 1 (True) = observed.
    """

    def __init__(self, x_obs: torch.Tensor, mask: torch.Tensor):
        checks.tensor(x_obs, "x_obs", dtypes=checks.OUTPUT_DTYPES + (torch.float64,), min_dim=2)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (bool or 0/1), got {type(mask).__name__}")
        if mask.device != x_obs.device:
            raise ValueError(f"mask is on {mask.device} but x_obs is on {x_obs.device}; put them on one device")
        if mask.is_complex():
            raise TypeError(f"mask must be bool or a real tensor of 0/1, got {mask.dtype}")
        try:
            shape = torch.broadcast_shapes(mask.shape, x_obs.shape)
        except RuntimeError:
            shape = None
        if shape != tuple(x_obs.shape):
            raise ValueError(f"mask must have the shape of x_obs {tuple(x_obs.shape)} or broadcast to it, got "
                             f"{tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 and 1 (1 = observed)")
            mask = mask != 0
        observed_bad = ~torch.isfinite(x_obs) & mask.expand(x_obs.shape)
        if bool(observed_bad.any()):
            raise ValueError("x_obs contains NaN or inf at observed positions")
        self.x_obs = x_obs.detach()
        self.mask = mask.expand(x_obs.shape)

    def __repr__(self):
        frac = float(self.mask.float().mean())
        return f"Inpaint(x_obs={tuple(self.x_obs.shape)}, observed={frac:.1%})"

    def check_shape(self, shape) -> None:
        """Raise ValueError unless x_obs fits the run's data shape (B, C, ...) (batch 1 broadcasts)."""
        shape = tuple(shape)
        got = tuple(self.x_obs.shape)
        if got[1:] != shape[1:] or got[0] not in (1, shape[0]):
            raise ValueError(f"condition: x_obs has shape {got} but the run samples the data shape {shape} "
                             f"(x_obs must be (B, ...) or (1, ...) of that shape)")

    def packed(self, shape, dtype: torch.dtype, device, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``obs`` argument of the step ops: (B, 2, D) (x_obs, mask as 0/1) in ``dtype`` on ``device``,
        contiguous; with ``noise`` ((B, 2, D): explicit replacement noise z_x, z_v) (B, 4, D).

        Unobserved x_obs entries are zeroed, so non-finite values there never reach a kernel.
        """
        self.check_shape(shape)
        b, d = shape[0], int(math.prod(shape[1:]))
        x = self.x_obs.to(device=device, dtype=dtype).expand(shape).reshape(b, d)
        m = self.mask.to(device=device).expand(shape).reshape(b, d)
        parts = [torch.where(m, x, torch.zeros_like(x)), m.to(dtype)]
        if noise is not None:
            if tuple(noise.shape) != (b, 2, d):
                raise ValueError(f"noise must have shape {(b, 2, d)} (z_x, z_v per element), got {tuple(noise.shape)}")
            parts += [noise[:, 0].to(device=device, dtype=dtype), noise[:, 1].to(device=device, dtype=dtype)]
        return torch.stack(parts, dim=1).contiguous()

    def start_(self, u: torch.Tensor, t: float, sde, obs: torch.Tensor, seed, backend=None) -> None:
        """Replace the observed coordinates of the start state u (B, 2C, ...) in place by a perturbation of
        x_obs at forward time t (``perturb`` with the run's Philox seed, tag PERTURB, then a select):
        for samplers whose first score evaluation sees the start state as it is."""
        from . import ops

        b = u.shape[0]
        x_shape = (b, u.shape[1] // 2) + tuple(u.shape[2:])
        x_obs = obs[:, 0].reshape(x_shape)
        times = torch.full((1,), float(t), dtype=u.dtype, device=u.device).expand(b)
        draw, _ = ops.perturb(x_obs, times, sde, seed=seed, backend=backend)
        keep = obs[:, 1].reshape(x_shape) != 0
        u.copy_(torch.where(torch.cat([keep, keep], dim=1), draw, u))


CONDITIONS = (Inpaint,)

__all__ = ["Inpaint", "CONDITIONS"]
