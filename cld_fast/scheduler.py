"""A diffusers-style SSCS scheduler: the same fused kernels as ``cf.sample``, driven from the user's own loop.

    sched = cf.SSCSScheduler(sde, steps=50)
    u = sched.init_noise((B, C, H, W), generator)      # prior sample, opening half step taken
    for t in sched.timesteps:                           # forward times of the score evaluations
        score = score_fn(u, t.expand(B))
        u = sched.step(score, t, u)                     # in place; returns u
    x, v = u.chunk(2, dim=1)

With the same generator this gives the samples of ``cf.sample(score_fn, shape, sde, steps=50)``
bit for bit: both draw the prior and then one Philox seed from the generator, build their tables
with the same code, and launch the same kernels with the same (1,) int64 device step counter.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import checks, philox
from .sampling import (SAMPLERS, _check_dtype, _check_eps, _check_generator, _check_shape, _check_steps,
                       _check_striding, _cld_denoise, _FixedPlan, _GDDIMPlan, _sscs_begin, _sscs_step, prior)
from .sde import CLD, GDDIM_PREDICTIONS


class SSCSScheduler:
    """Symmetric splitting CLD sampler (SSCS) as a scheduler.

    Args:
        sde: the ``cf.CLD``.
        steps: score evaluations, the denoising step included (as ``cf.sample``).
        eps: last forward time, in (0, 1).
        striding: time grid (``cld_fast.sde.time_grid``); None: the sampler's default, as ``cf.sample``.
        denoise: end with the official noise-free EM step at t = eps.
        mixed: False (default): ``step`` takes the score grad_v log p_t(u). True: ``step`` takes the
            raw output of a mixed-score network (out, with score = -v / s_vv - out / l22), folded into
            the step tables as ``cf.sample`` does for a ``cf.score_fn`` wrapper.
        backend: force a kernel backend.

    Attributes: ``timesteps`` ((steps,) tensor of forward times in the state dtype on the device of
    ``set_timesteps``), ``num_inference_steps``.
    """

    order = 1

    method = "sscs"

    def __init__(self, sde: CLD, steps: int = 50, eps: float = 1e-3, striding: Optional[str] = None,
                 denoise: bool = True, mixed: bool = False, backend: Optional[str] = None):
        if not isinstance(sde, CLD):
            raise TypeError(f"{type(self).__name__} needs a cld_fast.CLD, got {type(sde).__name__}")
        self.sde = sde
        self.eps = _check_eps(eps)
        striding = SAMPLERS[self.method].default_striding if striding is None else striding
        _check_striding(striding)
        self.striding = striding
        if not isinstance(denoise, bool) or not isinstance(mixed, bool):
            raise TypeError("denoise and mixed must be bools")
        self.denoise = denoise
        self.mixed = mixed
        self.backend = backend
        self.set_timesteps(steps)

    def set_timesteps(self, steps: int, device=None, dtype: torch.dtype = torch.float32):
        """Build the tables for ``steps`` score evaluations on ``device`` (default CPU) in ``dtype``; resets the run."""
        steps = _check_steps(steps)
        _check_dtype(dtype)
        device = torch.device("cpu") if device is None else torch.device(device)
        self._plan = _FixedPlan(self.sde, steps, self.eps, self.striding, self.denoise, device, dtype)
        self.num_inference_steps = steps
        self.timesteps = self._plan.timesteps
        self._i = None
        self._seed = None
        self._step = None

    @property
    def device(self) -> torch.device:
        return self._plan.device

    @property
    def dtype(self) -> torch.dtype:
        return self._plan.dtype

    def init_noise(self, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Start a run: draw u_1 from the prior and the run's Philox seed, take the opening half step.

        ``shape`` is the data shape (B, C, ...) or (B, D); returns the state (B, 2C, ...) at which the
        first score is evaluated.
        """
        shape = _check_shape(shape)
        _check_generator(generator)
        plan = self._plan
        with torch.no_grad():
            u = prior(self.sde, shape, generator, plan.device, plan.dtype)
            self._seed = philox.seed_from_generator(generator, plan.device)
            self._step = _sscs_begin(plan, self.sde, u, self._seed, self.backend)
        self._i = 0
        return u

    def step(self, score: torch.Tensor, t, u: torch.Tensor) -> torch.Tensor:
        """Advance u in place past the score evaluation at ``t`` (= ``timesteps[i]``) and return it.

        ``score``: (B, C, ...) grad_v log p_t(u) (the raw network output when ``mixed=True``). Steps
        must be taken in order (the scheduler counts them; ``t`` is accepted for the usual loop
        signature and not read back from the device).
        """
        if self._i is None:
            raise RuntimeError("call init_noise(shape, generator) before step()")
        plan = self._plan
        if self._i >= plan.steps:
            raise RuntimeError(f"all {plan.steps} steps of this run have been taken; call init_noise() to start a new run")
        checks.tensor(u, "u", min_dim=2)
        checks.tensor(score, "score", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        if tuple(score.shape) != checks.data_shape_of(u):
            raise ValueError(f"score must have the data shape {checks.data_shape_of(u)}, got {tuple(score.shape)}")
        if isinstance(t, (int, float)) and abs(float(t) - plan.times[self._i]) > 1e-6:
            raise ValueError(f"step {self._i} evaluates the score at t = {plan.times[self._i]:.6g}, got t = {t}")
        with torch.no_grad():
            if self._i < plan.n:
                _sscs_step(plan, self.sde, u, score, self._step, self.mixed, self._seed, self.backend)
                self._step.add_(1)
            else:
                _cld_denoise(plan, self.sde, u, score, self.mixed, self.backend)
        self._i += 1
        return u


class GDDIMScheduler(SSCSScheduler):
    """The gDDIM sampler (deterministic exponential-integrator multistep) as a scheduler.

    Same loop as ``SSCSScheduler``; gives the samples of ``cf.sample(score_fn, shape, sde, steps,
    method="gddim", order=order, predict=predict)`` bit for bit (same prior draw, table and kernels).
    ``order`` 1-3 (default 2) and ``predict`` "eps" (default) or "x0" as in ``cf.sample``.
    """

    method = "gddim"
    order = 2

    def __init__(self, sde: CLD, steps: int = 50, eps: float = 1e-3, striding: Optional[str] = None,
                 denoise: bool = True, mixed: bool = False, backend: Optional[str] = None, order: int = 2,
                 predict: str = "eps"):
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if predict not in GDDIM_PREDICTIONS:
            raise ValueError(f"predict must be one of {GDDIM_PREDICTIONS}, got {predict!r}")
        self.order, self.predict = order, predict
        super().__init__(sde, steps, eps, striding, denoise, mixed, backend)

    def init_noise(self, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Start a run: draw u_1 from the prior and build the run's table and ring buffer."""
        shape = _check_shape(shape)
        _check_generator(generator)
        plan = self._plan
        with torch.no_grad():
            u = prior(self.sde, shape, generator, plan.device, plan.dtype)
            self._gddim = _GDDIMPlan(self.sde, plan, u, self.order, self.predict, self.mixed)
        self._i = 0
        return u

    def step(self, score: torch.Tensor, t, u: torch.Tensor) -> torch.Tensor:
        """Advance u in place past the score evaluation at ``t`` (= ``timesteps[i]``) and return it."""
        if self._i is None:
            raise RuntimeError("call init_noise(shape, generator) before step()")
        plan = self._plan
        if self._i >= plan.steps:
            raise RuntimeError(f"all {plan.steps} steps of this run have been taken; call init_noise() to start a new run")
        if isinstance(t, (int, float)) and abs(float(t) - plan.times[self._i]) > 1e-6:
            raise ValueError(f"step {self._i} evaluates the score at t = {plan.times[self._i]:.6g}, got t = {t}")
        with torch.no_grad():
            self._gddim.advance(u, score, self.backend)
        self._i += 1
        return u


__all__ = ["SSCSScheduler", "GDDIMScheduler"]
