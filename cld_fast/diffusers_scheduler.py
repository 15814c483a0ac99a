"""diffusers schedulers for CLD: SSCS and Euler-Maruyama behind diffusers' ``SchedulerMixin`` contract.

Needs ``diffusers`` (``pip install "cld_fast[diffusers]"``); ``import cld_fast`` never imports it.

    sched = CLDSSCSScheduler(num_channels=C)             # CLD parameters in the config
    sched.set_timesteps(50, device=device)
    u = torch.randn((B, 2 * C, H, W), generator=g) * sched.init_noise_sigma   # the CLD prior
    for t in sched.timesteps:                             # forward times, 1 -> eps
        out = unet(sched.scale_model_input(u, t), t).sample
        u = sched.step(out, t, u, generator=g).prev_sample
    x = u[:, :C]

The state ``sample`` is the CLD state (B, 2C, ...) (x, then v, on dim 1). ``model_output`` is, by
default (``mixed=True``), the mixed-score network output that ``cf.score_fn`` consumes (score =
-v / s_vv(t) - out / l22(t)); with ``mixed=False`` it is the score grad_v log p_t(u) itself. Times
are CLD forward times in (0, 1] (t = 0 is data), not integer training steps.

The steps run the fused kernels of ``cf.sample`` with its tables (``cld_fast.sampling._FixedPlan``),
so a loop like the one above gives ``cf.sample(cf.score_fn(net, sde), shape, sde, steps=50,
generator=g)`` bit for bit when ``net`` is called on the same inputs. Each ``step`` returns a new
tensor (the input state is not modified).

Random numbers: a run draws one Philox seed, when it first needs noise (SSCS: its first
``scale_model_input``, EM: its first ``step``), from the ``generator`` given to ``set_timesteps``,
else (EM only) from the one given to that ``step``, else from torch's default generator. With
``generator=g`` given to ``set_timesteps`` and used for the prior draw, the run is the one of
``cf.sample(..., generator=g)``.

SSCS opens every run with a half step of the linear part before the first score evaluation: the
first ``scale_model_input`` returns the opened state (a new tensor) and the network must see it; the
first ``step`` accepts either that tensor or the original state (it re-applies the same half step,
same seed, so both give the same result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

try:
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
except ImportError as exc:  # pragma: no cover - exercised only where diffusers is missing
    raise ImportError("cld_fast.diffusers_scheduler needs diffusers: pip install diffusers "
                      "(or the extra: pip install 'cld_fast[diffusers]')") from exc

from . import checks, ops, philox
from .sampling import (SAMPLERS, _check_eps, _check_generator, _check_steps, _check_striding, _check_timesteps,
                       _cld_denoise, _FixedPlan, _sscs_step)
from .sde import CLD

TESTED_DIFFUSERS = "0.42.1"


@dataclass
class CLDSchedulerOutput(BaseOutput):
    """``prev_sample``: (B, 2C, ...) the state after the step (the next network input)."""

    prev_sample: torch.Tensor


class _CLDScheduler(SchedulerMixin, ConfigMixin):
    """Shared code of the CLD schedulers; see the module docstring for the loop contract.

    Config (saved by ``save_pretrained``): the CLD parameters ``beta0``, ``beta1``, ``m_inv``,
    ``gamma``, ``numerical_eps``; ``num_channels`` C of the data (the state has 2C) and
    ``spatial_dims`` (2 for images, 0 for (B, D) vectors), which shape ``init_noise_sigma``; ``eps``
    the last forward time; ``striding`` (None: the sampler's default as in ``cf.sample``);
    ``denoise`` (the official noise-free last step at t = eps); ``mixed`` (model output convention);
    ``backend`` (force a kernel backend, None: automatic).
    """

    config_name = "scheduler_config.json"
    _compatibles: List[str] = []
    order = 1
    method = ""

    @register_to_config
    def __init__(self, beta0: float = 4.0, beta1: float = 0.0, m_inv: float = 4.0, gamma: float = 0.04,
                 numerical_eps: float = 1e-9, num_channels: int = 3, spatial_dims: int = 2, eps: float = 1e-3,
                 striding: Optional[str] = None, denoise: bool = True, mixed: bool = True,
                 backend: Optional[str] = None):
        self.sde = CLD(beta0=beta0, beta1=beta1, m_inv=m_inv, gamma=gamma, numerical_eps=numerical_eps)
        for name, value in (("num_channels", num_channels), ("spatial_dims", spatial_dims)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "num_channels" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'num_channels' else 0}, got {value!r}")
        _check_eps(eps)
        self.striding = SAMPLERS[self.method].default_striding if striding is None else striding
        _check_striding(self.striding)
        for name, value in (("denoise", denoise), ("mixed", mixed)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self._plan: Optional[_FixedPlan] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._generator: Optional[torch.Generator] = None
        self._reset()

    def _reset(self):
        self._i = 0
        self._seed = None
        self._counter = None
        self._opened = None

    # ---- the diffusers contract -------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """(2C,) + (1,) * spatial_dims float32 prior std per channel: 1 for x, sqrt(M) for v, so that
        ``randn(B, 2C, ...) * init_noise_sigma`` is the CLD prior (bit for bit ``sde.prior_sampling``)."""
        c = self.config.num_channels
        std = torch.tensor([1.0] * c + [math.sqrt(self.sde.M)] * c, dtype=torch.float32)
        device = self._plan.device if self._plan is not None else torch.device("cpu")
        return std.view((2 * c,) + (1,) * self.config.spatial_dims).to(device)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps=None, generator: Optional[torch.Generator] = None):
        """Build the run: ``num_inference_steps`` score evaluations (the denoising step included, as
        ``cf.sample``'s ``steps``) on the config's grid, or a custom decreasing grid ``timesteps`` of
        forward times in (0, 1] starting at 1 (as ``cf.sample(timesteps=...)``). ``generator``: where the
        run's Philox seed comes from (module docstring). Sets ``timesteps`` ((steps,) float32 forward
        times of the score evaluations, on ``device``) and resets the step count."""
        _check_generator(generator)
        device = torch.device("cpu") if device is None else torch.device(device)
        ts = None
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass num_inference_steps or timesteps, not both")
            ts = _check_timesteps(timesteps)
            if float(ts[0]) != 1.0:
                raise ValueError(f"timesteps must start at 1 (the prior's time), got {float(ts[0])}")
            steps = ts.numel() - 1 + int(self.config.denoise)
        else:
            steps = _check_steps(num_inference_steps)
        self._plan = _FixedPlan(self.sde, steps, self.config.eps, self.striding, self.config.denoise, device,
                                torch.float32, ts=ts)
        self.timesteps = self._plan.timesteps
        self.num_inference_steps = self._plan.steps
        self._generator = generator
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input for the current step: ``sample`` itself (EM, and SSCS after its first
        step); SSCS's first call returns the state after the opening half step (a new tensor)."""
        self._check_state(sample)
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """Advance the state past the score evaluation at ``timestep`` (= ``timesteps[i]``, steps in order).

        Args:
            model_output: (B, C, ...) network output for ``scale_model_input(sample, timestep)``
                (mixed-score output by default; the score with ``mixed=False``).
            timestep: the forward time of this step (checked when given as a number or CPU tensor).
            sample: (B, 2C, ...) float32/float64 state (not modified).
            generator: see the module docstring (EM's seed when ``set_timesteps`` got none).
            return_dict: return ``CLDSchedulerOutput`` (else a 1-tuple).
        Returns:
            ``CLDSchedulerOutput(prev_sample)``: the new (B, 2C, ...) state.
        """
        plan = self._check_state(sample)
        _check_generator(generator)
        checks.tensor(model_output, "model_output", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        if tuple(model_output.shape) != checks.data_shape_of(sample, "sample"):
            raise ValueError(f"model_output must have the data shape {checks.data_shape_of(sample, 'sample')} "
                             f"(C = half the state's channels), got {tuple(model_output.shape)}")
        checks.same_device(sample, "sample", model_output=model_output)
        self._check_time(timestep)
        opened = self._opened is not None and sample is self._opened
        u = sample.detach().clone()
        with torch.no_grad(), checks.value_checks(False):
            self._advance(plan, u, model_output, generator, opened)
        self._i += 1
        return CLDSchedulerOutput(prev_sample=u) if return_dict else (u,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """u_t = mean(t) + L(t) noise of the CLD perturbation kernel (HSM: v0 marginalised).

        original_samples: (B, C, ...) data x0; noise: (B, 2C, ...) standard normal (eps_x, then eps_v);
        timesteps: (B,) forward times in (0, 1] (or one number for all). Returns (B, 2C, ...) in x0's dtype.
        """
        checks.tensor(original_samples, "original_samples", min_dim=2)
        checks.tensor(noise, "noise", min_dim=2)
        b = original_samples.shape[0]
        u_shape = (b, 2 * original_samples.shape[1]) + tuple(original_samples.shape[2:])
        if tuple(noise.shape) != u_shape:
            raise ValueError(f"noise must have the state shape {u_shape} (eps_x, eps_v), got {tuple(noise.shape)}")
        t = timesteps if isinstance(timesteps, torch.Tensor) else torch.tensor(float(timesteps))
        t = t.to(device=original_samples.device, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(b)
        eps = noise.reshape(b, 2, -1).to(original_samples.dtype)
        u, _ = ops.perturb(original_samples, t.contiguous(), self.sde, objective="hsm", eps=eps,
                           backend=self.config.backend)
        return u

    def __len__(self) -> int:
        return self.num_inference_steps or 0

    # ---- internals -------------------------------------------------------------------------
    def _check_state(self, sample) -> _FixedPlan:
        plan = self._plan
        if plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, device) first")
        if self._i >= plan.steps:
            raise RuntimeError(f"all {plan.steps} steps of this run have been taken; call set_timesteps() again")
        checks.tensor(sample, "sample", min_dim=2)
        if sample.shape[1] != 2 * self.config.num_channels:
            raise ValueError(f"sample must be the CLD state (B, 2C, ...) with C = num_channels = "
                             f"{self.config.num_channels}, got shape {tuple(sample.shape)}")
        if sample.device != plan.device:
            raise ValueError(f"sample is on {sample.device} but set_timesteps built the run on {plan.device}")
        return plan

    def _check_time(self, timestep):
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.device.type != "cpu":
                return  # not read back from an accelerator (no host sync); the scheduler counts its steps
            timestep = float(timestep)
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            want = self._plan.times[self._i]
            if abs(float(timestep) - want) > 1e-6:
                raise ValueError(f"step {self._i} evaluates the score at t = {want:.6g}, got timestep = {timestep}")

    def _seed_for(self, device, generator=None) -> torch.Tensor:
        if self._seed is None:
            source = self._generator if self._generator is not None else generator
            self._seed = philox.seed_from_generator(source, device)
            self._counter = torch.zeros(1, dtype=torch.int64, device=device)
        return self._seed

    def _advance(self, plan: _FixedPlan, u: torch.Tensor, out: torch.Tensor, generator, opened: bool) -> None:
        """Step ``self._i`` in place on ``u`` (a copy of the caller's state); ``opened``: the caller passed
        the tensor that SSCS's first ``scale_model_input`` returned."""
        raise NotImplementedError


class CLDSSCSScheduler(_CLDScheduler):
    """SSCS (symmetric splitting CLD sampler) as a diffusers scheduler; config and loop in the module doc.
    The samples of ``cf.sample(method="sscs")``."""

    method = "sscs"

    def _open(self, plan: _FixedPlan, u: torch.Tensor) -> None:
        """The opening half step of step 0, in place (same seed and counter: the same bits every time)."""
        seed = self._seed_for(u.device)
        with torch.no_grad(), checks.value_checks(False):
            ops.half_step_(u, plan.opening, self.sde, step=torch.zeros_like(self._counter), seed=seed,
                           backend=self.config.backend)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        plan = self._check_state(sample)
        if self._i != 0 or plan.n < 1:
            return sample
        if sample is self._opened:
            return sample
        opened = sample.detach().clone()
        self._open(plan, opened)
        self._opened = opened
        return opened

    def _advance(self, plan, u, out, generator, opened):
        if self._i == 0 and plan.n >= 1:
            if self._opened is None:
                raise RuntimeError("SSCS evaluates its first score after an opening half step: feed the network "
                                   "scheduler.scale_model_input(sample, t), not the raw sample")
            if not opened:  # the original state: open it the same way
                self._open(plan, u)
        if self._i < plan.n:
            _sscs_step(plan, self.sde, u, out, self._counter, self.config.mixed, self._seed, self.config.backend)
            self._counter.add_(1)
        else:
            _cld_denoise(plan, self.sde, u, out, self.config.mixed, self.config.backend)


class CLDEMScheduler(_CLDScheduler):
    """Euler-Maruyama on the reverse CLD SDE as a diffusers scheduler (``scale_model_input`` is the
    identity); config and loop in the module doc. The samples of ``cf.sample(method="em")``."""

    method = "em"

    def _advance(self, plan, u, out, generator, opened):
        if self._i < plan.n:
            seed = self._seed_for(u.device, generator)
            ops.em_step_(u, out, plan.grid, self.sde, step=self._counter, mixed=self.config.mixed, seed=seed,
                         backend=self.config.backend)
            self._counter.add_(1)
        else:
            _cld_denoise(plan, self.sde, u, out, self.config.mixed, self.config.backend)


__all__ = ["CLDSSCSScheduler", "CLDEMScheduler", "CLDSchedulerOutput", "TESTED_DIFFUSERS"]
