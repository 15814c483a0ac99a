"""k-diffusion-style sampler functions, one per registered sampler, with one signature, swapped by name.

    from cld_fast.kdiffusion import sample_sscs
    ts = cld_fast.sde.time_grid(49, 1e-3, "quadratic")          # forward times 1 -> eps
    x = sample_sscs(score, x, ts, sde=sde)                       # x: the CLD state (B, 2C, ...) at t = ts[0]

``sample_<name>(model, x, ts, extra_args=None, callback=None, disable=None, *, sde=None, denoise=True,
generator=None, backend=None, condition=None, guidance=None, **options)`` exists for every sampler of ``cf.SAMPLERS`` (a sampler
registered later gets one too); ``options`` are the sampler's declared options. ``model(x, t,
**extra_args)`` is a score function (grad_v log p_t(x), the data shape (B, C, ...)), e.g.
``cf.score_fn(net, sde)``. ``x`` is k-diffusion's name for the state; here it is the CLD state
(x and v stacked on dim 1). ``ts`` is a decreasing grid of CLD forward times in (0, 1] (not
k-diffusion's sigmas: the last entry is eps > 0, and ``denoise=True`` adds the official noise-free
last step there). Each function is a thin wrapper over ``cf.sample(u=x, timesteps=ts)``: the same
fused kernels, the same samples for the same generator (deterministic samplers ignore it).

``callback`` gets k-diffusion's dict after every step: ``x`` (the live state), ``i``, ``t`` (the
forward time of the step's score evaluation), ``sigma`` (the perturbation std of the data part at
t, sqrt(s_xx(t)) of the HSM kernel, what k-diffusion's sigma is for x) and ``denoised`` (E[x0 | state]
at that evaluation, the Tweedie estimate from the velocity score, data shape); with three parameters
it is called as ``(i, t, x)``. ``disable`` is tqdm's: True hides the bar, None hides it when stderr
is not a terminal.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .samplers import core
from .sampling import sample
from .score import NetworkScore


def _score(model: Callable, extra_args: Optional[dict]) -> Callable:
    """score(x, t) calling model(x, t, **extra_args); a cf.score_fn wrapper stays one (fused fast path)."""
    core.check_score_callable(model)
    if extra_args is None or len(extra_args) == 0:
        return model
    if not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for model, got {type(extra_args).__name__}")
    if isinstance(model, NetworkScore):
        return model.with_model(functools.partial(model.model, **extra_args))
    return functools.partial(model, **extra_args)


class _Recorder:
    """Keeps the last score evaluation (state copy, t, output) so the callback can report ``denoised``.

    With ``guidance`` the reported estimate is the guided one: a classifier-free batch-doubled output
    is combined with the guidance weight, and a classifier's term is evaluated again at the recorded
    state (one more classifier gradient per step, only when the callback takes the dict).
    """

    def __init__(self, score: Callable, sde, guidance=None):
        self.sde, self.last, self.guidance = sde, None, guidance
        if isinstance(score, NetworkScore):  # stay a NetworkScore: cf.sample keeps the fused path
            raw = score.raw

            def recording_raw(u, t, *args, **kw):
                out = raw(u, t, *args, **kw)
                self.last = (u.clone(), t, out, True)
                return out

            self.score = score.with_model(score.model)
            self.score.raw = recording_raw
            self.plain = score
        else:
            def recording(u, t, *args, **kw):
                y = score(u, t, *args, **kw)
                self.last = (u.clone(), t, y, False)
                return y

            if hasattr(score, "num_classes"):
                recording.num_classes = score.num_classes
            self.score = recording

    def _guided(self, u, tv, y, mixed):
        """(u, t, y, mixed) of the guided evaluation at the recorded state (module doc of the class)."""
        from .guidance import ClassifierFree, classifier_gradient

        g = self.guidance
        b = u.shape[0] // 2
        if isinstance(g, ClassifierFree) and y.shape[0] == 2 * b and g.weight != 0.0:
            return u[:b], tv[:b], core.Evaluator.combine(y[:b], y[b:], g.weight), mixed
        if g is not None and not isinstance(g, ClassifierFree) and g.scale != 0.0:
            term = classifier_gradient(g.classifier, g.labels, u, tv, self.sde).mul_(g.scale)
            if mixed:
                term = core.mixed_output_term(self.sde, term, tv)
            return u, tv, y + term.to(y.dtype), mixed
        return u, tv, y, mixed

    def info(self, i, t, state) -> dict:
        u, tv, y, mixed = self._guided(*self.last)
        k = self.sde.perturbation_kernel(torch.tensor([float(t)], dtype=torch.float64), "hsm")
        x, v = self.sde.split_state(u)
        if mixed and not self.plain.hsm_mixed:  # a non-HSM-mixed network: its score, through the wrapper
            y, mixed = self.plain(u, tv), False
        kc = self.sde.tweedie_coefficients(float(t), mixed).to(u.dtype)
        denoised = kc[0] * x + kc[1] * v + kc[2] * y.to(u.dtype)
        return {"x": state, "i": i, "t": t, "sigma": float(k.l11[0]), "denoised": denoised}


def _run(method: str, model, x, ts, extra_args, callback, disable, sde, denoise, generator, backend, condition,
         guidance, options):
    if sde is None:
        if not isinstance(model, NetworkScore):
            raise TypeError("sde= (a cf.CLD) is required unless model is a cf.score_fn(net, sde) wrapper")
        sde = model.sde
    core.check_sde(sde)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (the state (B, 2C, ...)), got {type(x).__name__}")
    if x.dtype not in core.DTYPES:
        raise TypeError(f"x must be float32 or float64 (the state dtype), got {x.dtype}")
    core.check_generator(generator)
    score = _score(model, extra_args)
    style = core.callback_style(callback)
    bound = None
    if style == "dict" and guidance is not None:
        from .guidance import bind_guidance
        bound = bind_guidance(guidance, score, x.shape[0], x.device)
    recorder = _Recorder(score, sde, bound) if style == "dict" else None
    if recorder is not None:
        score = recorder.score
    from tqdm.auto import tqdm

    spec = core.get_spec(method)
    n = core.check_timesteps(ts).numel() - 1 + int(bool(denoise)) if spec.fixed_steps else None
    bar = tqdm(total=n, desc=method, disable=disable, leave=False)

    def after(i, t, state):
        bar.update(1)
        if style == "dict":
            callback(recorder.info(i, t, state))
        elif style == "args":
            callback(i, t, state)

    try:
        res = sample(score, None, sde, method=method, u=x, timesteps=ts, denoise=denoise, generator=generator,
                     callback=after, dtype=x.dtype, backend=backend, condition=condition, guidance=guidance,
                     **options)
    finally:
        bar.close()
    return res.u


def _make(method: str):
    spec = core.get_spec(method)

    def sampler(model: Callable, x: torch.Tensor, ts, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, disable: Optional[bool] = None, *, sde=None,
                denoise: bool = True, generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                condition=None, guidance=None, **options) -> torch.Tensor:
        return _run(method, model, x, ts, extra_args, callback, disable, sde, denoise, generator, backend, condition,
                    guidance, options)

    opts = "".join(f"\n        {o.name}: {o.help} (default {o.default!r})." for o in spec.options) or " none."
    grid = ("exactly two entries [t_start, t_end] (the solver picks its own steps; the callback runs per "
            "accepted step)" if not spec.fixed_steps else
            "the score is evaluated at ts[0] .. ts[-2], then (``denoise``) once more at ts[-1]")
    sampler.__name__ = sampler.__qualname__ = f"sample_{method}"
    sampler.__doc__ = f"""{spec.summary[:1].upper() + spec.summary[1:]}, from the state ``x`` at forward time ts[0].

    Args:
        model: score function ``model(x, t, **extra_args)`` -> (B, C, ...) grad_v log p_t(x); x (B, 2C, ...),
            t (B,) forward times. A ``cf.score_fn`` wrapper also supplies ``sde`` and runs fused.
        x: (B, 2C, ...) float32 or float64 state at t = ts[0] (e.g. ``sde.prior_sampling`` for ts[0] = 1);
            not modified.
        ts: decreasing forward times in (0, 1] (1-D tensor or list): {grid}.
        extra_args: keyword arguments for ``model`` (e.g. class labels).
        callback: ``callback({{"x", "i", "t", "sigma", "denoised"}})`` after every step (module doc).
        disable: tqdm's ``disable``.
        sde: the ``cf.CLD`` (default: ``model.sde`` of a ``cf.score_fn`` wrapper).
        denoise: end with the official noise-free step at t = ts[-1].
        generator: ``torch.Generator`` for the run's Philox seed (deterministic samplers ignore it).
        backend: force a kernel backend.
        condition: inpainting, as ``cf.sample``'s (``cf.Inpaint(x_obs, mask)``; docs/inpainting.md).
        guidance: class-conditional sampling, as ``cf.sample``'s (``cf.ClassifierGuidance`` or
            ``cf.ClassifierFree``; docs/guidance.md; the latter needs ``model(x, t, class_labels=...)`` with
            a ``num_classes`` attribute).
    Options of {method!r}:{opts}
    Returns:
        (B, 2C, ...) final state in x's dtype (the data = first C channels).
    """
    return sampler


def __getattr__(name: str):
    """``sample_<name>`` for every registered sampler, made on first use."""
    if name.startswith("sample_") and name[7:] in core.SAMPLERS:
        fn = _make(name[7:])
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {f"sample_{n}" for n in core.SAMPLERS})


sample_sscs = _make("sscs")
sample_em = _make("em")
sample_gddim = _make("gddim")
sample_ode = _make("ode")

__all__ = ["sample_sscs", "sample_em", "sample_gddim", "sample_ode"]
