"""``cf.sample``: draw samples with any registered sampler (``cld_fast/samplers/``, one file each).

    res = cf.sample(score_fn, (B, C, H, W), sde, steps=50)        # SSCS, the default for CLD
    res.x, res.v, res.nfe, res.u

Conventions (the official CLD-SGM sampler's): ``steps`` is the number of score evaluations (NFE)
including the optional final denoising step, so a fixed-step loop runs n = steps - 1 steps when
``denoise=True``. The grid comes from ``cld_fast.sde.time_grid`` (forward time t from 1 down to
eps), or is the caller's ``timesteps``; ``u=`` starts from a given state. Fixed-step samplers launch
one fused kernel per network evaluation and never synchronise with the host inside the loop.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import checks, philox
from .guidance import bind_guidance
from .samplers import core
from .samplers.core import (DEFAULT_EPS, DEFAULT_STEPS, SAMPLERS, NFEBudgetError, NonFiniteSamplesError,
                            SampleResult, SamplerRun, SamplerSpec, SamplingError, register_sampler, sampler_names)
from .samplers.ode import ODE_MAX_NFE, dopri5

METHODS = sampler_names()


def _check_start(u, shape, sde) -> tuple:
    """The data shape of a run, from ``shape`` and/or a start state ``u`` (checked against each other)."""
    if u is None:
        return core.check_shape(shape)
    checks.tensor(u, "u", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    x_shape = sde.data_shape(u.shape, "u")
    if shape is not None and core.check_shape(shape) != x_shape:
        raise ValueError(f"shape {tuple(shape)} does not match u of shape {tuple(u.shape)} (data shape {x_shape})")
    checks.finite(u, "u")
    return x_shape


def _check_grid(timesteps, steps, eps, striding, denoise, spec: SamplerSpec, has_u: bool):
    """(ts or None, steps, eps) of a run: the default grid's or the custom ``timesteps``'."""
    if timesteps is None:
        steps = DEFAULT_STEPS if steps is None else core.check_steps(steps)
        return None, steps, DEFAULT_EPS if eps is None else core.check_eps(eps)
    if not spec.custom_grid:
        raise ValueError(f"method={spec.name!r} does not take a custom grid (registered without custom_grid=True)")
    ts = core.check_timesteps(timesteps)
    if not has_u and float(ts[0]) != 1.0:
        raise ValueError(f"timesteps must start at 1 (the prior's time) unless u= gives the state at "
                         f"t = {float(ts[0]):.6g}")
    if striding is not None:
        raise ValueError("striding= and timesteps= are exclusive: timesteps is the grid")
    if not spec.fixed_steps and ts.numel() != 2:
        raise ValueError(f"method={spec.name!r} is adaptive: timesteps must be [t_start, t_end], got "
                         f"{ts.numel()} entries")
    n_eval = ts.numel() - 1 + int(bool(denoise))
    if spec.fixed_steps and steps is not None and core.check_steps(steps) != n_eval:
        raise ValueError(f"steps={steps} disagrees with timesteps: {ts.numel()} times give {n_eval} score "
                         f"evaluations (denoise={denoise}); leave steps unset")
    if eps is not None and core.check_eps(eps) != float(ts[-1]):
        raise ValueError(f"eps={eps} disagrees with timesteps[-1] = {float(ts[-1])}; leave eps unset")
    if spec.fixed_steps and n_eval < 1:
        raise ValueError("timesteps give no score evaluation")
    return ts, (n_eval if spec.fixed_steps else DEFAULT_STEPS), float(ts[-1])


def sample(score_fn: Callable, shape: Optional[Sequence[int]], sde, steps: Optional[int] = None, method: str = "sscs",
           eps: Optional[float] = None, striding: Optional[str] = None, denoise: bool = True,
           generator: Optional[torch.Generator] = None, device=None, progress: bool = False,
           callback: Optional[Callable] = None, dtype: torch.dtype = torch.float32, cuda_graph: bool = False,
           backend: Optional[str] = None, u: Optional[torch.Tensor] = None, timesteps=None,
           condition=None, guidance=None, **options) -> SampleResult:
    """Draw samples by integrating the reverse-time CLD (or VP) dynamics from the prior at t = 1 to t = eps.

    Args:
        score_fn: ``score_fn(u, t)`` with u (B, 2C, ...) (VP-SDE: x (B, C, ...)) and t (B,) forward
            times in the state dtype; returns grad_v log p_t(u) (VP: grad_x log p_t(x)) of the data
            shape. A ``cf.score_fn(model, sde)`` wrapper is recognised and its raw network output is
            fed to the fused kernels, which fold in the mixed-score coefficients themselves.
        shape: the data shape (B, C, ...) or (B, D); may be None when ``u`` is given.
        sde: ``cf.CLD`` or ``cf.VPSDE``.
        steps: number of score evaluations of a fixed-step sampler, the denoising step included (the
            loop takes steps - 1 steps when ``denoise``); default 50. Ignored by adaptive samplers.
        method: a registered sampler (``cf.SAMPLERS``; ``cld_fast/samplers/``): "sscs" (CLD only, the
            default), "em" (Euler-Maruyama on the reverse SDE), "gddim" (CLD only: deterministic
            exponential-integrator multistep) or "ode" (probability-flow ODE, adaptive).
        eps: last forward time, in (0, 1); default 1e-3.
        striding: "linear", "quadratic", "polynomial" or "log" time grid (``cld_fast.sde.time_grid``);
            None: the sampler's default (``cf.SAMPLERS[method].default_striding``).
        denoise: end with the official noise-free EM step at t = eps of size eps (one evaluation).
        generator: torch.Generator for the prior and the one Philox seed of the run (same seed, same samples).
        device: where to sample (default: u's device, else the network's, else the generator's, else CPU).
        progress: show a tqdm bar.
        callback: ``callback(i, t, u)`` after every step (i from 0, t the forward time of that
            step's score evaluation as a float, u the live state); adaptive samplers call it per
            accepted step. A callable taking one argument is called k-diffusion style,
            ``callback(info)``, with ``info = {"x": u, "i": i, "t": t}`` ("x" is the live state u).
        dtype: state dtype, torch.float32 (default) or torch.float64.
        cuda_graph: on CUDA, capture one step (network + fused kernel + counter increment) in a CUDA
            graph after one warm-up step and replay it; elsewhere (or if capture fails) warns and
            runs the eager loop.
        backend: force a kernel backend (see ``cld_fast.backends``).
        u: start from this state instead of a prior draw: (B, 2C, ...) (VP-SDE: (B, C, ...)) at the
            first forward time (1, or ``timesteps[0]``); copied into ``dtype`` on ``device``, never
            modified. The generator still gives the run's Philox seed, so
            ``u = sde.prior_sampling(shape, generator=g)`` followed by ``generator=g`` reproduces a
            run without ``u`` bit for bit.
        timesteps: a custom grid of forward times t_0 > t_1 > ... > t_n in (0, 1] (1-D tensor or
            list) instead of ``steps`` / ``eps`` / ``striding`` (which must then be left unset or
            agree): step i runs t_i -> t_{i+1}, the score is evaluated at t_0 .. t_{n-1}, and
            ``denoise`` adds the final step at eps = t_n (NFE = n + 1, or n without denoising).
            Without ``u``, t_0 must be 1 (the prior's time). Adaptive samplers take exactly two
            entries, [t_start, t_end].
        condition: sample conditionally, e.g. ``cf.Inpaint(x_obs, mask)`` (inpainting / imputation by
            replacement, fused into every step: ``cld_fast.conditions``, docs/inpainting.md); CLD
            only, with the samplers whose ``cf.SAMPLERS[method].conditions`` is True (sscs, em,
            gddim); the final denoising step puts x_obs itself on the observed coordinates.
        guidance: class-conditional sampling (``cld_fast.guidance``, docs/guidance.md):
            ``cf.ClassifierGuidance(classifier, labels, scale)`` adds scale * grad_v log p(y | u, t) of a
            noise-conditional classifier to the score; ``cf.ClassifierFree(labels, weight)`` samples a
            conditional score function with (1 + w) s(u, t, y) - w s(u, t, none), both halves in one
            batch-doubled call. Either works with every sampler; NFE counts score evaluations.
        **options: the sampler's own options, declared in its file and listed by
            ``cf.SAMPLERS[method].options`` (name, type, allowed values, default), e.g.
            ``order=3, predict="x0"`` for "gddim", ``rtol``, ``atol``, ``max_nfe`` for "ode",
            ``sscs_official_half_steps=True`` for "sscs". An option of another sampler is refused.
    Returns:
        ``SampleResult(x, v, nfe, u)``.
    Raises:
        NonFiniteSamplesError: the final samples hold NaN or inf (a NaN score, a diverging state);
            checked once after the loop (one host sync), the SampleResult is its ``result``.
        NFEBudgetError: an adaptive sampler ran out of ``max_nfe``.
    """
    spec = core.get_spec(method)
    core.check_sde(sde)
    if not isinstance(sde, spec.sdes):
        raise ValueError(f"method={method!r} does not handle a {type(sde).__name__}; "
                         f"use one of {sampler_names(sde)}")
    core.check_score_callable(score_fn)
    shape = _check_start(u, shape, sde)
    ts, steps, eps = _check_grid(timesteps, steps, eps, striding, denoise, spec, u is not None)
    striding = spec.default_striding if striding is None else striding
    core.check_striding(striding)
    opts = spec.validate_options(options)
    spec.check_condition(condition, sde, shape)
    core.check_dtype(dtype)
    core.check_generator(generator)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    if core.callback_style(callback) == "dict":
        callback = core.dict_callback(callback)
    device = core.default_device(score_fn, generator, device, u)
    if cuda_graph:
        if not spec.fixed_steps:
            core.warn_graph(f"the adaptive sampler {method!r} picks its steps on the host, so there is no fixed "
                            "step to capture")
            cuda_graph = False
        elif device.type != "cuda":
            core.warn_graph(f"the samples live on {device.type} and CUDA graphs need CUDA tensors")
            cuda_graph = False

    ev = core.Evaluator(score_fn, sde, shape, guidance=bind_guidance(guidance, score_fn, shape[0], device))
    with torch.no_grad(), checks.value_checks(False):
        state = core.prior(sde, shape, generator, device, dtype) if u is None else u.detach().to(device, dtype, copy=True)
        seed = philox.seed_from_generator(generator, device) if spec.fixed_steps else None
        bar = core.progress_bar(progress, steps if spec.fixed_steps else None, method)
        run = SamplerRun(sde=sde, ev=ev, u=state, steps=steps, eps=eps, striding=striding, denoise=denoise, seed=seed,
                         bar=bar, callback=callback, cuda_graph=cuda_graph, backend=backend, options=opts,
                         timesteps=ts if spec.fixed_steps else None, t_start=1.0 if ts is None else float(ts[0]),
                         condition=condition)
        try:
            nfe = spec.loop(run)
        finally:
            if bar is not None:
                bar.close()
        result = core.result_of(run.u, sde, nfe)
        # The one check of the run (one host sync, after the loop): a NaN score, a diverging state
        # or a kernel that poisoned an out-of-range step all end here instead of in silent NaN samples.
        bad = int((~torch.isfinite(run.u)).sum())
    if bad:
        raise NonFiniteSamplesError(
            f"{method}: {bad} of {run.u.numel()} values of the final state are NaN or inf after {nfe} score "
            "evaluations; the score function returned NaN/inf or the state diverged (check the network or "
            "checkpoint, eps and steps)", result)
    return result


__all__ = ["sample", "SampleResult", "SamplingError", "NonFiniteSamplesError", "NFEBudgetError", "SamplerRun",
           "SamplerSpec", "SAMPLERS", "register_sampler", "sampler_names", "dopri5", "METHODS", "ODE_MAX_NFE"]
