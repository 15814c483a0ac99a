"""Schedulers: any fixed-step sampler of the registry, driven from the user's own loop.

    sched = cf.Scheduler(sde, method="sscs", steps=50)   # or cf.SSCSScheduler(sde, steps=50)
    u = sched.init_noise((B, C, H, W), generator)        # prior sample (SSCS: opening half step taken)
    for t in sched.timesteps:                             # forward times of the score evaluations
        score = score_fn(u, t.expand(B))
        u = sched.step(score, t, u)                       # in place; returns u
    x, v = u.chunk(2, dim=1)

With the same generator this gives the samples of ``cf.sample(score_fn, shape, sde, steps=50,
method=...)`` bit for bit: both draw the prior and then one Philox seed from the generator, and run
the same sampler ``Stepper`` (``cld_fast/samplers/``) with the same tables and kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import checks, guidance, philox
from .samplers import core


class Scheduler:
    """A fixed-step sampler of ``cf.SAMPLERS`` as a scheduler.

    Args:
        sde: the SDE (a ``cf.CLD`` for the CLD samplers).
        method: a registered fixed-step sampler (``cld_fast.samplers.sampler_names(fixed_steps=True)``).
        steps: score evaluations, the denoising step included (as ``cf.sample``).
        eps: last forward time, in (0, 1).
        striding: time grid (``cld_fast.sde.time_grid``); None: the sampler's default, as ``cf.sample``.
        denoise: end with the official noise-free step at t = eps.
        mixed: False (default): ``step`` takes the score grad_v log p_t(u). True: ``step`` takes the
            raw output of an HSM mixed-score network (score = -v / s_vv - out / l22), folded into the
            step kernels as ``cf.sample`` does for a ``cf.score_fn`` wrapper.
        backend: force a kernel backend.
        **options: the sampler's declared options (``cf.SAMPLERS[method].options``), also set as
            attributes of the scheduler.

    Attributes: ``timesteps`` ((steps,) tensor of forward times in the state dtype on the device of
    ``set_timesteps``), ``num_inference_steps``.
    """

    method = "sscs"

    def __init__(self, sde, method: Optional[str] = None, steps: int = 50, eps: float = 1e-3,
                 striding: Optional[str] = None, denoise: bool = True, mixed: bool = False,
                 backend: Optional[str] = None, **options):
        self.method = self.method if method is None else method
        spec = core.get_spec(self.method)
        if not spec.fixed_steps:
            raise ValueError(f"method={self.method!r} is adaptive; a scheduler drives one of "
                             f"{core.sampler_names(fixed_steps=True)}")
        core.check_sde(sde)
        if not isinstance(sde, spec.sdes):
            raise TypeError(f"{type(self).__name__}(method={self.method!r}) needs one of "
                            f"{[c.__name__ for c in spec.sdes]}, got {type(sde).__name__}")
        self.spec, self.sde = spec, sde
        self.eps = core.check_eps(eps)
        self.striding = spec.default_striding if striding is None else striding
        core.check_striding(self.striding)
        if not isinstance(denoise, bool) or not isinstance(mixed, bool):
            raise TypeError("denoise and mixed must be bools")
        self.denoise, self.mixed, self.backend = denoise, mixed, backend
        self.options = spec.validate_options(options)
        for name, value in self.options.items():
            setattr(self, name, value)
        self.set_timesteps(steps)

    def set_timesteps(self, steps: int, device=None, dtype: torch.dtype = torch.float32):
        """Build the grid for ``steps`` score evaluations on ``device`` (default CPU) in ``dtype``; resets the run."""
        steps = core.check_steps(steps)
        core.check_dtype(dtype)
        device = torch.device("cpu") if device is None else torch.device(device)
        self._plan = core.FixedPlan(steps, self.eps, self.striding, self.denoise, device, dtype)
        self.num_inference_steps = steps
        self.timesteps = self._plan.timesteps
        self._i = None
        self._stepper = None

    @property
    def device(self) -> torch.device:
        return self._plan.device

    @property
    def dtype(self) -> torch.dtype:
        return self._plan.dtype

    def init_noise(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                   condition=None) -> torch.Tensor:
        """Start a run: draw u_1 from the prior and the run's Philox seed, and take the sampler's ``begin``.

        ``shape`` is the data shape (B, C, ...) or (B, D); returns the state (B, 2C, ...) at which the
        first score is evaluated. ``condition``: as ``cf.sample``'s (e.g. ``cf.Inpaint(x_obs, mask)``),
        applied by every step of the run.
        """
        shape = core.check_shape(shape)
        core.check_generator(generator)
        self.spec.check_condition(condition, self.sde, shape)
        plan = self._plan
        with torch.no_grad(), checks.value_checks(False):
            u = core.prior(self.sde, shape, generator, plan.device, plan.dtype)
            seed = philox.seed_from_generator(generator, plan.device)
            self._stepper = self.spec.stepper(self.sde, plan, u, seed, self.mixed, self.backend, **self.options)
            if condition is not None:
                self._stepper.condition_on(condition, u)
            if plan.n >= 1:
                self._stepper.begin(u)
        self._i = 0
        return u

    def step(self, score: torch.Tensor, t, u: torch.Tensor, score_uncond: Optional[torch.Tensor] = None,
             guidance_weight: float = 1.0) -> torch.Tensor:
        """Advance u in place past the score evaluation at ``t`` (= ``timesteps[i]``) and return it.

        ``score``: (B, C, ...) grad_v log p_t(u) (the raw network output when ``mixed=True``). Steps
        must be taken in order (the scheduler counts them; ``t`` is accepted for the usual loop
        signature and checked only when it is a host number).

        Classifier-free guidance: ``score_uncond`` (B, C, ...) is the same network's evaluation without
        the label (same units as ``score``); the step then uses (1 + w) score - w score_uncond with
        w = ``guidance_weight`` (``cf.ClassifierFree``'s weight), combined inside the fused step kernel
        (sscs, em, gddim on a CLD), so the loop gives ``cf.sample(..., guidance=cf.ClassifierFree(labels,
        w))`` bit for bit when the two halves come from one batch-doubled call.
        """
        if self._i is None:
            raise RuntimeError("call init_noise(shape, generator) before step()")
        plan = self._plan
        if self._i >= plan.steps:
            raise RuntimeError(f"all {plan.steps} steps of this run have been taken; call init_noise() to start a new run")
        checks.tensor(u, "u", min_dim=2)
        checks.tensor(score, "score", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        want = self.sde.data_shape(u.shape, "u")
        if tuple(score.shape) != want:
            raise ValueError(f"score must have the data shape {want}, got {tuple(score.shape)}")
        if score_uncond is not None:
            checks.tensor(score_uncond, "score_uncond", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
            if score_uncond.shape != score.shape or score_uncond.dtype != score.dtype:
                raise ValueError(f"score_uncond must have score's shape {tuple(score.shape)} and dtype {score.dtype}, "
                                 f"got {tuple(score_uncond.shape)} {score_uncond.dtype}")
            checks.same_device(score, "score", score_uncond=score_uncond)
            guidance_weight = guidance.check_number(guidance_weight, "guidance_weight")
        if isinstance(t, (int, float)) and abs(float(t) - plan.times[self._i]) > 1e-6:
            raise ValueError(f"step {self._i} evaluates the score at t = {plan.times[self._i]:.6g}, got t = {t}")
        y = core.guided_input(self._stepper, score, score_uncond, guidance_weight)
        with torch.no_grad(), checks.value_checks(False):
            if self._i < plan.n:
                self._stepper.step(u, y)
            else:
                self._stepper.denoise(u, y)
        self._i += 1
        return u


class SSCSScheduler(Scheduler):
    """SSCS as a scheduler: ``cf.Scheduler(sde, method="sscs", ...)``; the samples of ``cf.sample(method="sscs")``."""

    method = "sscs"
    order = 1

    def __init__(self, sde, steps: int = 50, eps: float = 1e-3, striding: Optional[str] = None,
                 denoise: bool = True, mixed: bool = False, backend: Optional[str] = None, **options):
        super().__init__(sde, None, steps, eps, striding, denoise, mixed, backend, **options)


class GDDIMScheduler(Scheduler):
    """gDDIM as a scheduler: ``cf.Scheduler(sde, method="gddim", ...)``; the samples of
    ``cf.sample(method="gddim", **options)`` bit for bit, with the same defaults (``options``: gDDIM's
    ``order``, ``predict``, ``first_order_below``; ``cf.SAMPLERS["gddim"].options``)."""

    method = "gddim"

    def __init__(self, sde, steps: int = 50, eps: float = 1e-3, striding: Optional[str] = None,
                 denoise: bool = True, mixed: bool = False, backend: Optional[str] = None, **options):
        super().__init__(sde, None, steps, eps, striding, denoise, mixed, backend, **options)


__all__ = ["Scheduler", "SSCSScheduler", "GDDIMScheduler"]
