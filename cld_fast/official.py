"""Adapter for users of the official CLD-SGM code: their ``config`` and model in, ``cf.sample`` inputs out.

    run = cf.from_official(config, score_model)          # or a checkpoint path: "checkpoint_800000.pth"
    res = run.sample(generator=torch.Generator().manual_seed(0))   # instead of sampling_fn(score_model)
    nll = run.likelihood(x)                               # instead of the official likelihood_fn

``config`` is the official configuration: the flat attribute object the official ``main.py`` builds
from ``-cc``/``-sc`` config files and flags (``config.beta0``, ``config.image_size``, ...), an
ml_collections-style object with groups (``config.model.*``, ``config.data.*``, ``config.training.*``,
``config.sampling.*``: the groups are merged into one flat set of keys), or the same as a dict.
Key names are the official ones (see ``configs/specific_cifar10.txt`` in the official repository).

The SDE keys (``sde``, ``beta_type``, ``beta0``, ``beta1``, ``m_inv``, ``gamma``, ``numerical_eps``,
``mixed_score``, ``cld_objective``) are read by :func:`sde_settings`; missing ones take the official
CIFAR-10 values. ``cld-fast sample --config`` uses the same reader.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .sde import CLD

__all__ = ["OfficialRun", "from_official", "flatten_config", "sde_settings", "build_sde", "make_score_fn",
           "describe_sde", "SDE_DEFAULTS"]

# Official CIFAR-10 values (configs/specific_cifar10.txt); a config that omits a key gets these.
SDE_DEFAULTS: Dict[str, Any] = {
    "sde": "cld", "beta_type": "linear", "beta0": 4.0, "beta1": 0.0, "m_inv": 4.0, "gamma": 0.04,
    "numerical_eps": 1e-9, "mixed_score": True, "cld_objective": "hsm",
}
_GROUPS = ("data", "model", "training", "sampling", "eval", "optim", "sde")
_OBJECTIVES = ("hsm", "dsm")


def _as_dict(obj: Any, what: str) -> Dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        d = obj.to_dict()
        if isinstance(d, Mapping):
            return dict(d)
    if hasattr(obj, "__dict__"):  # argparse.Namespace, SimpleNamespace, plain objects
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(f"{what} must be a dict or an attribute object (argparse.Namespace, ml_collections "
                    f"ConfigDict, ...), got {type(obj).__name__}")


def flatten_config(config: Any) -> Dict[str, Any]:
    """The official config (attribute object or dict, flat or with groups) as one flat dict.

    Groups ``data``, ``model``, ``training``, ``sampling``, ``eval``, ``optim``, ``sde`` (ml_collections
    style) are merged into the top level; a key that appears in two groups with different values is
    an error. ``training.objective`` / ``objective`` is read as the official ``cld_objective``.
    """
    top = _as_dict(config, "config")
    flat: Dict[str, Any] = {}
    nested: Dict[str, Any] = {}
    for key, value in top.items():
        if key in _GROUPS and not isinstance(value, (str, int, float, bool)) and value is not None:
            for k, v in _as_dict(value, f"config.{key}").items():
                if k in nested and nested[k] != v:
                    raise ValueError(f"config key {k!r} has two values in different groups: {nested[k]!r} and {v!r}")
                nested[k] = v
        else:
            flat[key] = value
    out = {**nested, **flat}
    if "objective" in out and "cld_objective" not in out:
        out["cld_objective"] = out["objective"]
    return out


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"config {key!r} must be a boolean, got {value!r}")
    if isinstance(value, (bool, int)):
        return bool(value)
    raise ValueError(f"config {key!r} must be a boolean, got {type(value).__name__}")


def _to_float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {key!r} must be a number, got {value!r}") from None


def sde_settings(config: Any, **overrides: Any) -> Dict[str, Any]:
    """The SDE the official config describes, as a dict of plain values.

    Args:
        config: official config (see :func:`flatten_config`), or a ``cld_fast.models`` preset dict.
        overrides: values that win over the config (None values are ignored), same key names.
    Returns:
        ``{"beta0", "beta1", "m_inv", "gamma", "numerical_eps"}`` (floats), ``"mixed_score"`` (bool),
        ``"cld_objective"`` ('hsm' | 'dsm'), and ``"from_config"``: the keys that came from
        ``config`` (the others are overrides or the official CIFAR-10 defaults).
    Raises:
        NotImplementedError: ``sde`` other than 'cld' or ``beta_type`` other than 'linear'.
        ValueError: unreadable values or an unknown ``cld_objective``.
    """
    flat = flatten_config(config)
    given = {k: flat[k] for k in SDE_DEFAULTS if k in flat and flat[k] is not None}
    chosen = {**SDE_DEFAULTS, **given, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(overrides) - set(SDE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown SDE setting(s) {unknown}; known: {sorted(SDE_DEFAULTS)}")
    if str(chosen["sde"]).lower() != "cld":
        raise NotImplementedError(f"config sde={chosen['sde']!r}: only 'cld' configs are supported here")
    if str(chosen["beta_type"]).lower() != "linear":
        raise NotImplementedError(f"config beta_type={chosen['beta_type']!r}: only 'linear' "
                                  "(beta(t) = beta0 + beta1 t) is supported")
    objective = str(chosen["cld_objective"]).lower()
    if objective not in _OBJECTIVES:
        raise ValueError(f"config cld_objective={chosen['cld_objective']!r}: expected one of {_OBJECTIVES}")
    out = {k: _to_float(chosen[k], k) for k in ("beta0", "beta1", "m_inv", "gamma", "numerical_eps")}
    out["mixed_score"] = _to_bool(chosen["mixed_score"], "mixed_score")
    out["cld_objective"] = objective
    out["from_config"] = sorted(given)
    return out


def build_sde(settings: Mapping[str, Any]) -> CLD:
    """``cf.CLD`` from :func:`sde_settings` output."""
    return CLD(beta0=settings["beta0"], beta1=settings["beta1"], m_inv=settings["m_inv"], gamma=settings["gamma"],
               numerical_eps=settings["numerical_eps"])


def describe_sde(sde: CLD, mixed: bool, objective: str) -> str:
    """One line naming everything the score function and sampler use, e.g. for ``cld-fast sample``."""
    return (f"CLD(beta0={sde.beta0:g}, beta1={sde.beta1:g}, m_inv={sde.m_inv:g}, gamma={sde.gamma:g}, "
            f"numerical_eps={sde.numerical_eps:g}), mixed_score={mixed}, objective={objective}")


def make_score_fn(model: Callable, sde: CLD, mixed: bool, objective: str, autocast_dtype=None):
    """``cf.score_fn`` for the official ``mixed_score`` / ``cld_objective`` settings.

    The official score is ``-v / s_vv_hsm(t) * mixed + out * noise_multiplier(t)`` with the noise
    multiplier of the configured objective: ``mixed_score=False`` is ``output="eps"`` (score =
    -out / l22), not ``mixed=False`` (which means the output is the score itself).
    """
    from .score import score_fn

    return score_fn(model, sde, output="mixed" if mixed else "eps", objective=objective,
                    autocast_dtype=autocast_dtype)


def _data_shape(flat: Mapping[str, Any]) -> Tuple[int, ...]:
    is_image = flat.get("is_image")
    if is_image is None:
        is_image = str(flat.get("name", "ncsnpp")).lower() != "mlp"
    is_image = _to_bool(is_image, "is_image")
    if not is_image:
        return (int(flat.get("data_dim", 2)),)
    c = int(flat.get("image_channels", flat.get("num_channels", 3)))
    s = int(flat.get("image_size", 32))
    return (c, s, s)


_STRIDINGS = {"linear": "linear", "quadratic": "quadratic"}


@dataclass
class OfficialRun:
    """What ``cf.sample`` / ``cf.likelihood`` need for an official model and config.

    Fields:
        model: the network ``model(u, t) -> out`` (eval mode).
        score_fn: ``score_fn(u, t)`` -> grad_v log p_t(u), the official ``get_score_fn`` equivalent.
        sde: ``cf.CLD`` with the config's beta0, beta1, m_inv, gamma and numerical_eps.
        shape: sample shape (sampling_batch_size, C, H, W) or (sampling_batch_size, data_dim).
        eps: official ``sampling_eps`` (last forward time of the sampler).
        likelihood_eps: official ``likelihood_eps`` (where the data sits for ``cf.likelihood``).
        steps, method, striding, denoise: official ``n_discrete_steps``, ``sampling_method``,
            ``striding`` (None: the sampler's default) and ``denoising``.
        mixed, objective: the official ``mixed_score`` and ``cld_objective``.
        config: the flattened official config.
    """

    model: Any
    score_fn: Callable
    sde: CLD
    shape: Tuple[int, ...]
    eps: float
    likelihood_eps: float
    steps: int
    method: str
    striding: Optional[str]
    denoise: bool
    mixed: bool
    objective: str
    config: Dict[str, Any] = field(repr=False)

    def sample_kwargs(self, **overrides) -> Dict[str, Any]:
        """Keyword arguments for ``cf.sample(run.score_fn, **kwargs)``, with ``overrides`` applied."""
        kw = dict(shape=self.shape, sde=self.sde, steps=self.steps, method=self.method, eps=self.eps,
                  striding=self.striding, denoise=self.denoise)
        kw.update(overrides)
        return kw

    def sample(self, **overrides):
        """``cf.sample`` with the official settings (any ``cf.sample`` keyword overrides them).

        Returns ``SampleResult``: ``res.x`` (shape ``self.shape``), ``res.v``, ``res.nfe``.
        """
        from .sampling import sample

        return sample(self.score_fn, **self.sample_kwargs(**overrides))

    def likelihood(self, x: torch.Tensor, **overrides):
        """``cf.likelihood(run.score_fn, x, run.sde, eps=run.likelihood_eps, **overrides)``."""
        from .nll import likelihood

        kw = dict(eps=self.likelihood_eps)
        kw.update(overrides)
        return likelihood(self.score_fn, x, self.sde, **kw)


def _load_model(model_or_checkpoint: Any, flat: Dict[str, Any], use_ema: bool, map_location) -> Any:
    if isinstance(model_or_checkpoint, (str, os.PathLike, Mapping)):
        from .models import load_official_checkpoint

        return load_official_checkpoint(model_or_checkpoint, config=flat, use_ema=use_ema, map_location=map_location)
    if isinstance(model_or_checkpoint, torch.nn.Module):
        net = model_or_checkpoint
        # The official code wraps the network in DistributedDataParallel; sample with the bare one.
        if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            net = net.module
        return net.eval()
    if callable(model_or_checkpoint):
        return model_or_checkpoint
    raise TypeError("model_or_checkpoint must be the official network (an nn.Module or a callable model(u, t)), "
                    f"a checkpoint path or a loaded checkpoint dict, got {type(model_or_checkpoint).__name__}")


def from_official(config: Any, model_or_checkpoint: Any, use_ema: bool = True, batch_size: Optional[int] = None,
                  autocast_dtype=None, map_location: Any = "cpu") -> OfficialRun:
    """One call from the official CLD-SGM ``config`` and model (or checkpoint) to ``cf.sample`` inputs.

    Args:
        config: the official config: a flat attribute object (what the official ``main.py`` passes
            around), an ml_collections-style object with groups, or either as a dict.
        model_or_checkpoint: the official network (``nn.Module``, DDP-wrapped or not, called as
            ``model(u, t)``), a checkpoint path or a loaded checkpoint dict (official format:
            ``model`` + ``ema``; loaded with ``cld_fast.models.load_official_checkpoint`` into the
            network the config describes).
        use_ema: checkpoints only: load the EMA weights (as the official sampling code does).
        batch_size: samples per call (default: the config's ``sampling_batch_size``, else 64).
        autocast_dtype: passed to ``cf.score_fn`` (CUDA autocast of the network).
        map_location: checkpoints only: ``torch.load`` location and the network's device.
    Returns:
        :class:`OfficialRun` with ``score_fn``, ``sde``, ``shape``, ``eps``, ``likelihood_eps``,
        ``steps``, ``method``, ``striding``, ``denoise`` and ``sample()`` / ``likelihood()``.
    Raises:
        NotImplementedError: config options this version cannot reproduce (non-'cld' SDE, a non-linear
            beta).
        TypeError / ValueError: a config or model of the wrong kind, unreadable values.
    """
    flat = flatten_config(config)
    settings = sde_settings(flat)
    sde = build_sde(settings)
    net = _load_model(model_or_checkpoint, flat, use_ema, map_location)
    score = make_score_fn(net, sde, settings["mixed_score"], settings["cld_objective"], autocast_dtype)

    n = batch_size if batch_size is not None else int(flat.get("sampling_batch_size") or 64)
    if int(n) < 1:
        raise ValueError(f"batch_size must be >= 1, got {n}")
    method = str(flat.get("sampling_method", "sscs")).lower()
    striding = flat.get("striding")
    striding = _STRIDINGS.get(str(striding).lower()) if striding is not None else None
    if flat.get("striding") is not None and striding is None:
        raise NotImplementedError(f"config striding={flat['striding']!r}: cld_fast reproduces the official "
                                  f"'linear' and 'quadratic' grids only")
    denoise = flat.get("denoising")
    return OfficialRun(
        model=net, score_fn=score, sde=sde, shape=(int(n),) + _data_shape(flat),
        eps=_to_float(flat.get("sampling_eps", 1e-3), "sampling_eps"),
        likelihood_eps=_to_float(flat.get("likelihood_eps", 1e-5), "likelihood_eps"),
        steps=int(flat.get("n_discrete_steps", 500)), method=method, striding=striding,
        denoise=True if denoise is None else _to_bool(denoise, "denoising"),
        mixed=settings["mixed_score"], objective=settings["cld_objective"], config=flat)
