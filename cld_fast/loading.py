"""One way to load a score model: ``load_score_model(src, config=None)``.

    m = cf.load_score_model("runs/toy")                                  # our run folder (newest checkpoint)
    m = cf.load_score_model("checkpoint_800000.pth", config="cifar10")   # official CLD-SGM checkpoint
    m = cf.load_score_model(net, config=official_config)                 # a network in memory
    res = cf.sample(m.score_fn, (64,) + m.data_shape, m.sde)
    m.sources     # {"beta0": "checkpoint", ..., "data_shape": "checkpoint"}: where each setting came from

A checkpoint file is read once (``torch.load(..., weights_only=True)``); its ``format`` entry tells
ours (which carries its own training config) from an official one (whose config is the ``config``
argument: a ``cld_fast.models`` preset name, a JSON file, or the official config object or dict).
``cld-fast sample``, ``cf.from_official`` and ``cld_fast.train.load_for_sampling`` all load here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .sde_config import read_config, sde_from_settings, sde_settings, to_bool

__all__ = ["ScoreModel", "load_score_model", "network_score_fn", "data_shape", "OFFICIAL_DEFAULT_CONFIG"]

# The config of an official checkpoint loaded without one: the released CIFAR-10 model's.
OFFICIAL_DEFAULT_CONFIG = "cifar10"
# Official data keys, with the value an absent key takes (the official CIFAR-10 / toy configs).
SHAPE_DEFAULTS = {"is_image": True, "image_channels": 3, "image_size": 32, "data_dim": 2}


@dataclass
class ScoreModel:
    """A loaded score model: what ``cf.sample`` and ``cf.likelihood`` need.

    Fields:
        score_fn: the ``cf.score_fn`` wrapper, ``score_fn(u, t)`` -> grad_v log p_t(u) of the data shape.
        sde: ``cf.CLD`` or ``cf.VPSDE``.
        data_shape: one sample's shape, (C, H, W) or (D,) (no batch dimension); None when nothing
            gives it (a module with an SDE object or a ``TrainConfig`` as its config).
        network: the network in eval mode (or the callable given).
        sources: where each setting came from, {name: "checkpoint" | "config" | "argument" |
            "default"}: the SDE keys (``sde``, ``beta_type``, the parameters, ``mixed_score``,
            ``cld_objective``) and ``data_shape``.
        kind: "cld_fast" (our training checkpoint), "official" (an official checkpoint) or "module".
        path: the checkpoint file that was read (None for a dict or a module).
        config: the ``TrainConfig`` of our checkpoint, else the flat config dict ({} without one).
        step: the training step our checkpoint was written at (None for other kinds, or if unrecorded).
    """

    score_fn: Any
    sde: Any
    data_shape: Optional[Tuple[int, ...]]
    network: Any
    sources: Dict[str, str]
    kind: str
    path: Optional[str] = None
    config: Any = field(default_factory=dict, repr=False)
    step: Optional[int] = None

    @property
    def mixed(self) -> bool:
        """Whether the network outputs the official mixed score (``mixed_score``)."""
        return self.score_fn.output == "mixed"

    @property
    def objective(self) -> str:
        """The training objective of the network ("hsm" or "dsm"; ``cld_objective``)."""
        return self.score_fn.objective

    def describe(self) -> str:
        """One line naming the SDE and the score parameterisation, e.g. for ``cld-fast sample``."""
        return self.sde.describe(self.mixed, self.objective)


def network_score_fn(model: Callable, sde, mixed: bool, objective: str, autocast_dtype=None):
    """``cf.score_fn`` for the official ``mixed_score`` / ``cld_objective`` settings.

    The official score is ``-v / s_vv_hsm(t) * mixed + out * noise_multiplier(t)`` with the noise
    multiplier of the configured objective: ``mixed_score=False`` is ``output="eps"`` (score =
    -out / l22), not ``mixed=False`` (which means the output is the score itself).
    """
    from .score import score_fn

    return score_fn(model, sde, output="mixed" if mixed else "eps", objective=objective,
                    autocast_dtype=autocast_dtype)


def data_shape(flat: Mapping[str, Any]) -> Tuple[Tuple[int, ...], str]:
    """(one sample's shape, "config" or "default") from the official data keys of a flat config.

    ``is_image`` (absent: True unless the network ``name`` is 'mlp'), then ``data_dim`` for vectors
    or ``image_channels`` and ``image_size`` for images; an absent key takes ``SHAPE_DEFAULTS``.
    """
    is_image = flat.get("is_image")
    if is_image is None:
        is_image = str(flat.get("name", "ncsnpp")).lower() != "mlp"
    keys = ("image_channels", "image_size") if to_bool(is_image, "is_image") else ("data_dim",)
    values = [flat.get(k) if flat.get(k) is not None else SHAPE_DEFAULTS[k] for k in keys]
    try:
        values = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"config {dict(zip(keys, values))}: the data keys must be integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"config {dict(zip(keys, values))}: the data keys must be >= 1")
    shape = tuple(values) if len(keys) == 1 else (values[0], values[1], values[1])
    return shape, "config" if all(flat.get(k) is not None for k in keys) else "default"


def _unwrap(net):
    # The official code wraps the network in DistributedDataParallel; sample with the bare one.
    if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return net.module
    return net


class OwnSettingsError(ValueError):
    """A config or SDE override given for a cld_fast checkpoint, which carries its own."""


def _resolve_path(src) -> str:
    path = os.fspath(src)
    if os.path.isdir(path):
        return ckpt.resolve_resume(path, path, what="checkpoint folder")
    return path


def load_score_model(src: Any, config: Any = None, use_ema: bool = True, device=None, autocast_dtype=None,
                     overrides: Optional[Mapping[str, Any]] = None, kind: Optional[str] = None) -> ScoreModel:
    """Load a score model from a checkpoint, a run folder or a network in memory.

    Args:
        src: our training checkpoint (``ckpt_<step>.pt``), a run folder (its newest checkpoint), an
            official CLD-SGM checkpoint (``model`` + ``ema`` entries, or a plain state dict), any of
            these already loaded as a dict, or the network itself (``nn.Module``, DDP-wrapped or
            not, or a callable ``model(u, t)``).
        config: official checkpoints and networks only (ours carry their own): a ``cld_fast.models``
            preset name, a JSON file, or an official config (flat or with groups, attribute object
            or dict); for a network also a ``TrainConfig`` or an SDE object. An official checkpoint
            without one takes the ``cifar10`` preset (the released model's).
        use_ema: checkpoints: load the EMA weights (as the official sampling code does).
        device: where the network goes (default: the CPU for checkpoints; a module stays where it is).
        autocast_dtype: passed to ``cf.score_fn`` (CUDA autocast of the network), e.g. "bf16".
        overrides: SDE keys that win over the config (``{"beta0": 3.0}``; None values are ignored);
            not for our checkpoints.
        kind: "cld_fast" or "official": accept only that kind of checkpoint (None: either, or a network).
    Returns:
        :class:`ScoreModel` (``score_fn``, ``sde``, ``data_shape``, ``network``, ``sources``, ...).
    Raises:
        CheckpointError: a missing, unreadable or non-finite checkpoint.
        ValueError / TypeError: a config or network that does not fit, or a config for our checkpoint.
        NotImplementedError: official settings this package does not reproduce (a non-'cld' SDE, a
            non-linear beta).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if kind not in (None, "cld_fast", "official"):
        raise ValueError(f"kind must be None, 'cld_fast' or 'official', got {kind!r}")
    if isinstance(src, (str, os.PathLike)):
        path = _resolve_path(src)
        return _from_state(ckpt.open_checkpoint(path), path, config, overrides, use_ema, device, autocast_dtype, kind)
    if isinstance(src, Mapping):
        return _from_state(src, None, config, overrides, use_ema, device, autocast_dtype, kind)
    if kind is not None:
        raise TypeError(f"kind={kind!r} asks for a checkpoint, got {type(src).__name__}")
    if callable(src):
        return _from_module(src, config, overrides, device, autocast_dtype)
    raise TypeError("src must be a checkpoint path, a run folder, a loaded checkpoint dict or the network (an "
                    f"nn.Module or a callable model(u, t)), got {type(src).__name__}")


def _from_state(state, path, config, overrides, use_ema, device, autocast_dtype, kind) -> ScoreModel:
    fmt = state.get("format") if isinstance(state, dict) else None
    if isinstance(fmt, str) and fmt.startswith("cld_fast.train/"):  # ours, maybe of another version: named
        ckpt.check_format(state, path or "the checkpoint dict")
    if not ckpt.is_ours(state):
        if kind == "cld_fast":
            ckpt.check_state(state, path)  # raises, naming what a cld_fast checkpoint needs
        return _from_official(state, path, config, overrides, use_ema, device, autocast_dtype)
    if kind == "official":
        raise ckpt.CheckpointError(f"{path or 'the checkpoint dict'} is a cld_fast training checkpoint, not an "
                                   "official CLD-SGM one")
    if config is not None or overrides:
        given = "config" if config is not None else ", ".join(sorted(overrides))
        raise OwnSettingsError(f"{given}: {path or 'this checkpoint'} is a cld_fast training checkpoint, which "
                               "carries its own config and SDE; a config and SDE overrides apply to official "
                               "checkpoints and networks")
    return _from_ours(ckpt.check_state(state, path), path, use_ema, device, autocast_dtype)


def _from_ours(state, path, use_ema, device, autocast_dtype) -> ScoreModel:
    from .config import TrainConfig
    from .ema import ExponentialMovingAverage
    from .train import build_network

    name = path or "the checkpoint"
    ckpt.check_entries(state, name, ("config", "model"))
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{name}: its 'config' entry is not a valid training config: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    if not state.get("data_shape"):
        raise ckpt.CheckpointError(f"{name} has no 'data_shape' entry (written by every cld_fast trainer)")
    shape = tuple(int(d) for d in state["data_shape"])
    if use_ema and not isinstance(state.get("ema"), dict):
        raise ckpt.CheckpointError(f"{name} has no 'ema' entry; sample with the raw weights (--no-ema, use_ema=False)")
    try:
        net = build_network(config, shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ckpt.CheckpointError(f"{name}: its config does not describe a network that can be built: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    try:
        net.load_state_dict(ckpt.bare_state_dict(state["model"]))
        if use_ema:
            ema = ExponentialMovingAverage(net.parameters())
            ema.load_state_dict(state["ema"])
            ema.copy_to(net)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ckpt.CheckpointError(f"{name} does not fit the network its config describes "
                                   f"(model {config.model!r}): {detail[:300]}") from exc
    net = net.to(device or "cpu").eval()
    settings = sde_settings(config)
    sde = sde_from_settings(settings)
    score = network_score_fn(net, sde, settings["mixed_score"], settings["cld_objective"], autocast_dtype)
    sources = {k: "checkpoint" for k in (*settings["sources"], "data_shape")}
    step = state.get("step")
    step = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    return ScoreModel(score, sde, shape, net, sources, "cld_fast", path, config, step)


def official_settings(flat: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """:func:`cld_fast.sde_config.sde_settings` of an official config, which must describe a CLD."""
    settings = sde_settings(flat, **overrides)
    if settings["sde"] != "cld":
        raise NotImplementedError(f"config sde={settings['sde']!r}: only 'cld' official configs are supported here")
    return settings


def _from_official(state, path, config, overrides, use_ema, device, autocast_dtype) -> ScoreModel:
    from .models import load_official_checkpoint

    flat = read_config(OFFICIAL_DEFAULT_CONFIG if config is None else config)
    settings = official_settings(flat, overrides)
    sde = sde_from_settings(settings)
    net = load_official_checkpoint(state, config=flat, use_ema=use_ema)
    if device is not None:
        net = net.to(device)
    score = network_score_fn(net, sde, settings["mixed_score"], settings["cld_objective"], autocast_dtype)
    shape, shape_source = data_shape(flat)
    return ScoreModel(score, sde, shape, net, {**settings["sources"], "data_shape": shape_source}, "official", path,
                      flat)


def _from_module(module, config, overrides, device, autocast_dtype) -> ScoreModel:
    net = _unwrap(module)
    if isinstance(net, torch.nn.Module):
        net = net.eval() if device is None else net.to(device).eval()
    if getattr(config, "is_sde", False):
        if overrides:
            raise TypeError("overrides: config is an SDE object; build it with the values you want instead")
        sources = {"sde": "argument", "mixed_score": "default", "cld_objective": "default", "data_shape": "unknown"}
        return ScoreModel(network_score_fn(net, config, True, "hsm", autocast_dtype), config, None, net, sources,
                          "module")
    if config is None:
        raise TypeError("config is required with a network: the official config (preset name, JSON file, dict or "
                        "attribute object), a TrainConfig, or an SDE object (cf.CLD(...))")
    flat = read_config(config)
    settings = sde_settings(flat, **overrides)
    sde = sde_from_settings(settings)
    score = network_score_fn(net, sde, settings["mixed_score"], settings["cld_objective"], autocast_dtype)
    shape, shape_source = (None, "unknown") if _is_train_config(config) else data_shape(flat)
    return ScoreModel(score, sde, shape, net, {**settings["sources"], "data_shape": shape_source}, "module", None,
                      flat)


def _is_train_config(config) -> bool:
    from .config import TrainConfig

    return isinstance(config, TrainConfig)
