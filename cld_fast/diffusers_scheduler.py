"""diffusers schedulers and a pipeline for CLD: every fixed-step sampler of the registry behind
diffusers' ``SchedulerMixin`` contract.

Needs ``diffusers`` (``pip install "cld_fast[diffusers]"``); ``import cld_fast`` never imports it.

    sched = CLDSSCSScheduler(num_channels=C)             # or CLDScheduler(method="gddim", num_channels=C)
    sched.set_timesteps(50, device=device)
    u = torch.randn((B, 2 * C, H, W), generator=g) * sched.init_noise_sigma   # the CLD prior
    for t in sched.timesteps:                             # forward times, 1 -> eps
        out = unet(sched.scale_model_input(u, t), t).sample
        u = sched.step(out, t, u, generator=g).prev_sample
    x = u[:, :C]

The state ``sample`` is the CLD state (B, 2C, ...) (x, then v, on dim 1). ``model_output`` is, by
default (``mixed=True``), the HSM mixed-score network output that ``cf.score_fn`` consumes (score =
-v / s_vv(t) - out / l22(t)); with ``mixed=False`` it is the score grad_v log p_t(u) itself. Times
are CLD forward times in (0, 1] (t = 0 is data). ``scale_model_input`` is the identity, so a loop
may duplicate the batch before the network for classifier-free guidance and either combine the
outputs itself or hand both halves to ``step(cond, t, u, model_output_uncond=uncond,
guidance_scale=s)``, which combines them inside the fused step kernel.

SSCS starts from the state at t = 1 as from an already opened prior draw (the CLD prior is invariant
under SSCS's linear half step, so this is exact in distribution): the loop above gives
``cf.sample(cf.score_fn(net, sde), shape, sde, steps=50, generator=g, first_half_step=False)`` bit for
bit; EM and gDDIM give ``cf.sample(..., method=...)`` bit for bit.

Random numbers: a run draws one Philox seed at its first ``step`` from the ``generator`` given to
``set_timesteps``, else from the one given to that ``step`` (a ``torch.Generator`` or a list of them,
one per sample as diffusers pipelines pass: the seed is drawn from each in turn and mixed, so the
same list reproduces the run), else from torch's default generator.

Training with a diffusers-style loop: ``add_noise(x0, noise, t)`` perturbs data with the HSM kernel
(``noise`` of the state shape (B, 2C, ...)) and ``training_target(noisy, noise, t)`` is the regression
target of the HSM loss for a mixed-score network: ``mse(unet(noisy, t), target)`` summed over the
data dimensions is ``cf.hsm_loss``'s default ``reweightedv2`` loss.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

try:
    from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only where diffusers is missing
    raise ImportError("cld_fast.diffusers_scheduler needs diffusers: pip install diffusers "
                      "(or the extra: pip install 'cld_fast[diffusers]')") from exc

from . import checks, guidance, ops, philox
from .samplers import core
from .sde import CLD, CLD_DEFAULTS

TESTED_DIFFUSERS = "0.42.1"
_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class CLDSchedulerOutput(BaseOutput):
    """``prev_sample``: (B, 2C, ...) the state after the step (the next network input)."""

    prev_sample: torch.Tensor


def _mixed_seed(generators, device) -> torch.Tensor:
    """One (1,) int64 Philox seed drawn from each generator of a list in turn and mixed (order matters)."""
    seed = None
    for g in generators:
        s = philox.seed_from_generator(g, device)
        seed = s if seed is None else torch.bitwise_xor(torch.bitwise_right_shift(seed, 1), s)
    return seed


class CLDScheduler(SchedulerMixin, ConfigMixin):
    """A fixed-step CLD sampler of ``cf.SAMPLERS`` as a diffusers scheduler; loop in the module doc.

    Config (saved by ``save_pretrained``): ``method`` (a registered fixed-step sampler; None: the
    subclass's own), the CLD parameters ``beta0``, ``beta1``, ``m_inv``, ``gamma``, ``numerical_eps``;
    ``num_channels`` C of the data (the state has 2C) and ``spatial_dims`` (2 for images, 0 for (B, D)
    vectors), which shape ``init_noise_sigma``; ``eps`` the last forward time; ``striding`` (None: the
    sampler's default, as ``cf.sample``); ``denoise`` (the noise-free last step at t = eps); ``mixed``
    (model output convention); ``backend`` (force a kernel backend); ``options`` (a dict of the
    sampler's declared options, e.g. ``{"order": 3}`` for gDDIM); ``num_train_timesteps`` (integer
    training timesteps k in [0, N) given to ``add_noise`` mean forward times t = (k + 1) / N).
    """

    config_name = "scheduler_config.json"
    _compatibles: List[str] = []
    order = 1
    default_method = "sscs"

    @register_to_config
    def __init__(self, method: Optional[str] = None, beta0: float = CLD_DEFAULTS["beta0"],
                 beta1: float = CLD_DEFAULTS["beta1"], m_inv: float = CLD_DEFAULTS["m_inv"],
                 gamma: float = CLD_DEFAULTS["gamma"], numerical_eps: float = CLD_DEFAULTS["numerical_eps"],
                 num_channels: int = 3, spatial_dims: int = 2,
                 eps: float = 1e-3, striding: Optional[str] = None, denoise: bool = True, mixed: bool = True,
                 backend: Optional[str] = None, options: Optional[dict] = None, num_train_timesteps: int = 1000):
        self.method = self.default_method if method is None else method
        spec = core.get_spec(self.method)
        if not spec.fixed_steps or CLD not in spec.sdes:
            raise ValueError(f"method must be a fixed-step CLD sampler, one of {core.sampler_names(CLD(), True)}, "
                             f"got {self.method!r}")
        self.spec = spec
        self.sde = CLD(beta0=beta0, beta1=beta1, m_inv=m_inv, gamma=gamma, numerical_eps=numerical_eps)
        for name, value, low in (("num_channels", num_channels, 1), ("spatial_dims", spatial_dims, 0),
                                 ("num_train_timesteps", num_train_timesteps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        core.check_eps(eps)
        self.striding = spec.default_striding if striding is None else striding
        core.check_striding(self.striding)
        for name, value in (("denoise", denoise), ("mixed", mixed)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of {self.method}'s options, got {type(options).__name__}")
        given = dict(options or {})
        if "first_half_step" in given:
            raise ValueError("options: first_half_step is fixed to False here (scale_model_input is the identity)")
        if spec.option("first_half_step") is not None:
            given["first_half_step"] = False
        self.options = spec.validate_options(given)
        self._plan: Optional[core.FixedPlan] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._generator = None
        self._reset()

    def _reset(self):
        self._i = 0
        self._stepper = None

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
                      timesteps=None, generator=None):
        """Build the run: ``num_inference_steps`` score evaluations (the denoising step included, as
        ``cf.sample``'s ``steps``) on the config's grid, or a custom decreasing grid ``timesteps`` of
        forward times in (0, 1] starting at 1 (as ``cf.sample(timesteps=...)``). ``generator``: where the
        run's Philox seed comes from (module docstring). Sets ``timesteps`` ((steps,) float32 forward
        times of the score evaluations, on ``device``) and resets the step count."""
        _refuse_stock_pipelines(inspect.currentframe().f_back)
        _check_generators(generator)
        device = torch.device("cpu") if device is None else torch.device(device)
        ts = None
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass num_inference_steps or timesteps, not both")
            ts = core.check_timesteps(timesteps)
            if float(ts[0]) != 1.0:
                raise ValueError(f"timesteps must start at 1 (the prior's time), got {float(ts[0])}")
            steps = ts.numel() - 1 + int(self.config.denoise)
        else:
            steps = core.check_steps(num_inference_steps)
        self._plan = core.FixedPlan(steps, self.config.eps, self.striding, self.config.denoise, device,
                                    torch.float32, ts=ts)
        self.timesteps = self._plan.timesteps
        self.num_inference_steps = self._plan.steps
        self._generator = generator
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input: ``sample`` itself (a batch duplicated for guidance is fine)."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, model_output_uncond: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0):
        """Advance the state past the score evaluation at ``timestep`` (= ``timesteps[i]``, steps in order).

        Args:
            model_output: (B, C, ...) network output at ``sample`` (mixed-score output by default; the
                score with ``mixed=False``).
            timestep: the forward time of this step (checked when given as a number or CPU tensor).
            sample: (B, 2C, ...) float16/bfloat16/float32/float64 state (not modified); the step runs
                in float32 (float64 for a float64 state) and returns the state's dtype.
            generator: a ``torch.Generator`` or a list of them (module docstring).
            return_dict: return ``CLDSchedulerOutput`` (else a 1-tuple).
            model_output_uncond: classifier-free guidance, fused into the step: the network's output
                without the label (``model_output`` is the one with it); the step then uses
                uncond + guidance_scale (cond - uncond), diffusers' convention (``cf.ClassifierFree``
                weight w = guidance_scale - 1), combined inside the step kernel.
            guidance_scale: >= 1 (1: the conditional output alone); read only with ``model_output_uncond``.
        Returns:
            ``CLDSchedulerOutput(prev_sample)``: the new (B, 2C, ...) state.
        """
        plan = self._check_state(sample)
        _check_generators(generator)
        checks.tensor(model_output, "model_output", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        want = self.sde.data_shape(sample.shape, "sample")
        if tuple(model_output.shape) != want:
            raise ValueError(f"model_output must have the data shape {want} (C = half the state's channels), got "
                             f"{tuple(model_output.shape)}")
        checks.same_device(sample, "sample", model_output=model_output)
        weight = 0.0
        if model_output_uncond is not None:
            checks.tensor(model_output_uncond, "model_output_uncond", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
            if model_output_uncond.shape != model_output.shape:
                raise ValueError(f"model_output_uncond must have model_output's shape {tuple(model_output.shape)}, "
                                 f"got {tuple(model_output_uncond.shape)}")
            checks.same_device(sample, "sample", model_output_uncond=model_output_uncond)
            weight = guidance.check_number(guidance_scale, "guidance_scale", minimum=1.0) - 1.0
        self._check_time(timestep)
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        u = sample.detach().to(work, copy=True)
        with torch.no_grad(), checks.value_checks(False):
            if self._stepper is None:
                source = self._generator if self._generator is not None else generator
                seed = (_mixed_seed(source, u.device) if isinstance(source, (list, tuple))
                        else philox.seed_from_generator(source, u.device))
                self._stepper = self.spec.stepper(self.sde, plan, u, seed, self.config.mixed, self.config.backend,
                                                  **self.options)
                if plan.n >= 1:
                    self._stepper.begin(u)
            y = core.guided_input(self._stepper, model_output.to(work),
                                  None if model_output_uncond is None else model_output_uncond.to(work), weight)
            if self._i < plan.n:
                self._stepper.step(u, y)
            else:
                self._stepper.denoise(u, y)
        self._i += 1
        u = u.to(sample.dtype)
        return CLDSchedulerOutput(prev_sample=u) if return_dict else (u,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """u_t = mean(t) + L(t) noise of the CLD perturbation kernel (HSM: v0 marginalised).

        original_samples: (B, C, ...) data x0; noise: (B, 2C, ...) standard normal (eps_x, then eps_v);
        timesteps: (B,) forward times in (0, 1], or integer training timesteps k in [0,
        num_train_timesteps) meaning t = (k + 1) / num_train_timesteps (one number: for all).
        Returns (B, 2C, ...) in x0's dtype.
        """
        checks.tensor(original_samples, "original_samples", min_dim=2)
        checks.tensor(noise, "noise", min_dim=2)
        b = original_samples.shape[0]
        u_shape = self.sde.state_shape(tuple(original_samples.shape))
        if tuple(noise.shape) != u_shape:
            raise ValueError(f"noise must have the state shape {u_shape} (eps_x, then eps_v: "
                             f"torch.randn of twice the data's channels), got {tuple(noise.shape)}")
        t = self.forward_times(timesteps, b, original_samples.device)
        eps = noise.reshape(b, 2, -1).to(original_samples.dtype)
        u, _ = ops.perturb(original_samples, t, self.sde, objective="hsm", eps=eps, backend=self.config.backend)
        return u

    def training_target(self, noisy_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """(B, C, ...) regression target of the HSM loss for a mixed-score network at ``add_noise``'s output:
        eps_v - (l22 / s_vv) v, so that ``((out - target)^2)`` summed over the data dimensions is the
        ``reweightedv2`` HSM loss (out + v l22 / s_vv - eps_v)^2. Arguments as ``add_noise``."""
        checks.tensor(noisy_samples, "noisy_samples", min_dim=2)
        b = noisy_samples.shape[0]
        x_shape = self.sde.data_shape(noisy_samples.shape, "noisy_samples")
        if tuple(noise.shape) != tuple(noisy_samples.shape):
            raise ValueError(f"noise must have the state shape {tuple(noisy_samples.shape)}, got {tuple(noise.shape)}")
        t = self.forward_times(timesteps, b, noisy_samples.device)
        k = self.sde.perturbation_kernel(t, "hsm")
        ratio = (k.l22 / k.s_vv).to(noisy_samples.dtype).view((b,) + (1,) * (len(x_shape) - 1))
        v = self.sde.split_state(noisy_samples)[1]
        return self.sde.split_state(noise)[1].to(noisy_samples.dtype) - ratio * v

    def forward_times(self, timesteps, batch: int, device) -> torch.Tensor:
        """(B,) float64 forward times from float times in (0, 1] or integer training timesteps (``add_noise``)."""
        t = timesteps if isinstance(timesteps, torch.Tensor) else torch.tensor(timesteps)
        n = self.config.num_train_timesteps
        if not t.is_floating_point():
            t = (t.to(torch.float64) + 1.0) / n
        t = t.to(device=device, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be one number or (B,) = ({batch},) times, got shape {tuple(t.shape)}")
        return t.contiguous()

    def __len__(self) -> int:
        return self.num_inference_steps or 0

    # ---- internals -------------------------------------------------------------------------
    def _check_state(self, sample) -> core.FixedPlan:
        plan = self._plan
        if plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, device) first")
        if self._i >= plan.steps:
            raise RuntimeError(f"all {plan.steps} steps of this run have been taken; call set_timesteps() again")
        checks.tensor(sample, "sample", dtypes=_STATE_DTYPES, min_dim=2)
        if sample.shape[1] != 2 * self.config.num_channels:
            raise ValueError(f"sample must be the CLD state (B, 2C, ...) with C = num_channels = "
                             f"{self.config.num_channels} (set num_channels= to your data's channels), got shape "
                             f"{tuple(sample.shape)}")
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


def _check_generators(generator):
    if isinstance(generator, (list, tuple)):
        if not generator:
            raise ValueError("generator must be a torch.Generator, a non-empty list of them, or None")
        for g in generator:
            core.check_generator(g)
    else:
        core.check_generator(generator)


def _refuse_stock_pipelines(frame):
    """diffusers' own pipelines neither scale the prior by ``init_noise_sigma`` nor split the state:
    with a CLD scheduler they would return wrong images. Refuse them at ``set_timesteps``."""
    caller = frame.f_locals.get("self") if frame is not None else None
    if isinstance(caller, DiffusionPipeline) and not isinstance(caller, CLDPipeline) \
            and type(caller).__module__.startswith("diffusers."):
        raise TypeError(f"{type(caller).__name__} does not draw the CLD prior (randn * init_noise_sigma) and returns "
                        "the whole (x, v) state; use cld_fast.diffusers_scheduler.CLDPipeline(unet, scheduler)")


class CLDSSCSScheduler(CLDScheduler):
    """SSCS (symmetric splitting CLD sampler) as a diffusers scheduler: the samples of
    ``cf.sample(method="sscs", first_half_step=False)``."""

    default_method = "sscs"


class CLDEMScheduler(CLDScheduler):
    """Euler-Maruyama on the reverse CLD SDE as a diffusers scheduler: the samples of ``cf.sample(method="em")``."""

    default_method = "em"


class CLDGDDIMScheduler(CLDScheduler):
    """gDDIM as a diffusers scheduler (``options={"order": 1-3, "predict": "eps" | "x0"}``): the samples
    of ``cf.sample(method="gddim", ...)``."""

    default_method = "gddim"


class CLDPipeline(DiffusionPipeline):
    """Unconditional CLD sampling with a UNet (``unet(u, t).sample``, in_channels 2C, out_channels C) and a
    ``CLDScheduler``: draws the prior, runs the scheduler and returns the data part x mapped from
    [-1, 1] to images in [0, 1], as ``DDPMPipeline`` does for a DDPM.

        pipe = CLDPipeline(unet=unet, scheduler=CLDSSCSScheduler(num_channels=3))
        images = pipe(batch_size=4, num_inference_steps=50, generator=g).images
    """

    def __init__(self, unet, scheduler: CLDScheduler):
        super().__init__()
        if not isinstance(scheduler, CLDScheduler):
            raise TypeError(f"scheduler must be a CLDScheduler, got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 50, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample ``batch_size`` images. ``generator``: a torch.Generator or a list of ``batch_size`` of them;
        ``output_type``: "pil", "np" or "pt"."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        sched, size = self.scheduler, self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, 2 * sched.config.num_channels) + spatial
        device = self._execution_device
        sched.set_timesteps(num_inference_steps, device=device)
        u = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sched.init_noise_sigma
        for t in self.progress_bar(sched.timesteps):
            out = self.unet(sched.scale_model_input(u, t), t.expand(batch_size)).sample
            u = sched.step(out, t, u, generator=generator).prev_sample
        image = (sched.sde.split_state(u)[0] / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)


def __getattr__(name):
    """``CLD<NAME>Scheduler`` for any registered fixed-step CLD sampler (e.g. one registered by the user)."""
    if name.startswith("CLD") and name.endswith("Scheduler"):
        method = next((m for m in core.sampler_names(CLD(), True) if m.upper() == name[3:-9].upper()), None)
        if method is not None:
            return type(name, (CLDScheduler,), {"default_method": method, "__module__": __name__})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLDScheduler", "CLDSSCSScheduler", "CLDEMScheduler", "CLDGDDIMScheduler", "CLDPipeline",
           "CLDSchedulerOutput", "TESTED_DIFFUSERS"]
