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
from .sampling import (_check_dtype, _check_eps, _check_generator, _check_shape, _check_steps, _check_striding,
                       _cld_denoise, _FixedPlan, _sscs_begin, _sscs_step, prior)
from .sde import CLD


class SSCSScheduler:
    """Symmetric splitting CLD sampler (SSCS) as a scheduler.

    Args:
        sde: the ``cf.CLD``.
        steps: score evaluations, the denoising step included (as ``cf.sample``).
        eps: last forward time, in (0, 1).
        striding: "linear" or "quadratic" time grid.
        denoise: end with the official noise-free EM step at t = eps.
        mixed: False (default): ``step`` takes the score grad_v log p_t(u). True: ``step`` takes the
            raw output of a mixed-score network (out, with score = -v / s_vv - out / l22), folded into
            the step tables as ``cf.sample`` does for a ``cf.score_fn`` wrapper.
        backend: force a kernel backend.

    Attributes: ``timesteps`` ((steps,) tensor of forward times in the state dtype on the device of
    ``set_timesteps``), ``num_inference_steps``.
    """

    order = 1

    def __init__(self, sde: CLD, steps: int = 50, eps: float = 1e-3, striding: str = "linear", denoise: bool = True,
                 mixed: bool = False, backend: Optional[str] = None):
        if not isinstance(sde, CLD):
            raise TypeError(f"SSCSScheduler needs a cld_fast.CLD, got {type(sde).__name__}")
        self.sde = sde
        self.eps = _check_eps(eps)
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


__all__ = ["SSCSScheduler"]
