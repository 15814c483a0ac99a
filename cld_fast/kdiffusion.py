"""k-diffusion-style sampler functions: one signature for every sampler, swapped by name.

    from cld_fast.kdiffusion import sample_sscs
    ts = cld_fast.sde.time_grid(49, 1e-3, "quadratic")          # forward times 1 -> eps
    u = sample_sscs(score, u, ts, sde=sde)                      # u: (B, 2C, ...) at t = ts[0]

``model(u, t, **extra_args)`` is a score function (grad_v log p_t(u), the data shape (B, C, ...)),
e.g. ``cf.score_fn(net, sde)``; ``ts`` is a decreasing grid of forward times in (0, 1] (CLD time,
not k-diffusion's sigmas: the last entry is eps > 0, and ``denoise=True`` adds the official
noise-free last step there). Each function is a thin wrapper over ``cf.sample(u=u, timesteps=ts)``:
the same fused kernels, the same samples for the same generator. ``callback`` gets k-diffusion's
dict ``{"x": u, "i": i, "t": t}`` (or, with three parameters, ``(i, t, u)``) after every step;
``disable`` is tqdm's: True hides the bar, None hides it when stderr is not a terminal.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .sampling import _callback_style, _check_score_callable, _check_timesteps, _dict_callback, sample
from .score import NetworkScore
from .sde import CLD


def _score(model: Callable, extra_args: Optional[dict]) -> Callable:
    """score(u, t) calling model(u, t, **extra_args); a cf.score_fn wrapper stays one (fused fast path)."""
    _check_score_callable(model)
    if extra_args is None or len(extra_args) == 0:
        return model
    if not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for model, got {type(extra_args).__name__}")
    if isinstance(model, NetworkScore):
        net = functools.partial(model.model, **extra_args)
        return NetworkScore(net, model.sde, mixed=model.mixed, autocast_dtype=model.autocast_dtype)
    return functools.partial(model, **extra_args)


def _run(method: str, model, u, ts, extra_args, callback, disable, sde, denoise, generator, backend, **options):
    if sde is None:
        if not isinstance(model, NetworkScore):
            raise TypeError("sde= (a cf.CLD) is required unless model is a cf.score_fn(net, sde) wrapper")
        sde = model.sde
    if not isinstance(sde, CLD):
        raise TypeError(f"sde must be a cld_fast.CLD, got {type(sde).__name__}")
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a tensor (B, 2C, ...), got {type(u).__name__}")
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"u must be float32 or float64 (the state dtype), got {u.dtype}")
    score = _score(model, extra_args)
    user = _dict_callback(callback) if _callback_style(callback) == "dict" else callback
    from tqdm.auto import tqdm

    n = _check_timesteps(ts).numel() - 1 + int(bool(denoise)) if method != "ode" else None
    bar = tqdm(total=n, desc=method, disable=disable, leave=False)

    def after(i, t, state):
        bar.update(1)
        if user is not None:
            user(i, t, state)

    try:
        res = sample(score, None, sde, method=method, u=u, timesteps=ts, denoise=denoise, generator=generator,
                     callback=after, dtype=u.dtype, backend=backend, **options)
    finally:
        bar.close()
    return res.u


def sample_sscs(model: Callable, u: torch.Tensor, ts, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, disable: Optional[bool] = None, *, sde: Optional[CLD] = None,
                denoise: bool = True, generator: Optional[torch.Generator] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """SSCS from the state ``u`` at forward time ts[0] along the grid ``ts``.

    Args:
        model: score function ``model(u, t, **extra_args)`` -> (B, C, ...) grad_v log p_t(u); u (B, 2C, ...),
            t (B,) forward times. A ``cf.score_fn`` wrapper also supplies ``sde`` and runs fused.
        u: (B, 2C, ...) float32 or float64 state at t = ts[0] (e.g. ``sde.prior_sampling`` for ts[0] = 1);
            not modified.
        ts: decreasing forward times in (0, 1] (1-D tensor or list, >= 2 entries); the score is
            evaluated at ts[0] .. ts[-2], then (``denoise``) once more at ts[-1]: NFE = len(ts) (len - 1
            without denoising).
        extra_args: keyword arguments for ``model`` (e.g. class labels).
        callback: ``callback({"x": u, "i": i, "t": t})`` after every step (see module doc).
        disable: tqdm's ``disable``.
        sde: the ``cf.CLD`` (default: ``model.sde`` of a ``cf.score_fn`` wrapper).
        denoise: end with the official noise-free step at t = ts[-1].
        generator: ``torch.Generator`` for the run's Philox seed.
        backend: force a kernel backend.
    Returns:
        (B, 2C, ...) final state in u's dtype (x = first C channels).
    """
    return _run("sscs", model, u, ts, extra_args, callback, disable, sde, denoise, generator, backend)


def sample_em(model: Callable, u: torch.Tensor, ts, extra_args: Optional[dict] = None,
              callback: Optional[Callable] = None, disable: Optional[bool] = None, *, sde: Optional[CLD] = None,
              denoise: bool = True, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE along ``ts``; arguments and result as ``sample_sscs``."""
    return _run("em", model, u, ts, extra_args, callback, disable, sde, denoise, generator, backend)


def sample_gddim(model: Callable, u: torch.Tensor, ts, extra_args: Optional[dict] = None,
                 callback: Optional[Callable] = None, disable: Optional[bool] = None, *, sde: Optional[CLD] = None,
                 denoise: bool = True, order: int = 2, predict: str = "eps",
                 backend: Optional[str] = None) -> torch.Tensor:
    """Deterministic gDDIM (order 1-3, ``predict`` "eps" or "x0") along ``ts``; otherwise as ``sample_sscs``."""
    return _run("gddim", model, u, ts, extra_args, callback, disable, sde, denoise, None, backend, order=order,
                predict=predict)


def sample_ode(model: Callable, u: torch.Tensor, ts, extra_args: Optional[dict] = None,
               callback: Optional[Callable] = None, disable: Optional[bool] = None, *, sde: Optional[CLD] = None,
               denoise: bool = True, rtol: float = 1e-5, atol: float = 1e-5,
               backend: Optional[str] = None) -> torch.Tensor:
    """Probability-flow ODE, adaptive Dormand-Prince 5(4), from ts[0] to ts[1]: ``ts`` has exactly two
    entries (the solver picks its own steps; the callback runs per accepted step). Otherwise as
    ``sample_sscs``."""
    return _run("ode", model, u, ts, extra_args, callback, disable, sde, denoise, None, backend, rtol=rtol,
                atol=atol)


__all__ = ["sample_sscs", "sample_em", "sample_gddim", "sample_ode"]
