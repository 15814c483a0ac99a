"""The SDE a config describes: ``build_sde(config)`` for every kind of config the package reads.

    sde = cf.build_sde(get_preset("toy"))             # a TrainConfig -> cf.CLD(...)
    sde = cf.build_sde({"sde": "vpsde"})              # cf.VPSDE()
    sde = cf.build_sde(official_config)               # official CLD-SGM config, flat or with groups
    sde = cf.build_sde("celebahq256")                 # a cld_fast.models preset name (or a JSON file)

A config names its SDE with ``sde`` ("cld", the default, or "vpsde") and its parameters with the
keys of ``SDE_KEYS`` (CLD: the official CLD-SGM names; VP-SDE: the ``TrainConfig`` names). A key the
config lacks takes the SDE class's own default (``CLD_DEFAULTS``, ``VPSDE_DEFAULTS``: read from the
dataclasses, so each default is written once; ``cf.CLD()`` holds the official CIFAR-10 values). The
score-model keys ``mixed_score`` and ``cld_objective`` (``objective`` in a ``TrainConfig``) ride
along in :func:`sde_settings`, as the official code keeps them next to the SDE.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Union

from .sde import CLD, CLD_DEFAULTS, OBJECTIVES, VPSDE, VPSDE_DEFAULTS

__all__ = ["build_sde", "sde_settings", "sde_from_settings", "flatten_config", "read_config", "SDE_CLASSES",
           "SDE_KEYS", "SDE_DEFAULTS", "SCORE_DEFAULTS"]

SDE_CLASSES = {"cld": CLD, "vpsde": VPSDE}
# config key -> dataclass field, per SDE kind
SDE_KEYS: Dict[str, Dict[str, str]] = {
    "cld": {name: name for name in CLD_DEFAULTS},
    "vpsde": {"vp_beta_min": "beta_min", "vp_beta_max": "beta_max"},
}
_CLASS_DEFAULTS = {"cld": CLD_DEFAULTS, "vpsde": VPSDE_DEFAULTS}
# What the score function of a config's network needs besides the SDE (official key names).
SCORE_DEFAULTS: Dict[str, Any] = {"mixed_score": True, "cld_objective": "hsm"}
# Every CLD setting of an official config with its default (the official CIFAR-10 values).
SDE_DEFAULTS: Dict[str, Any] = {"sde": "cld", "beta_type": "linear", **CLD_DEFAULTS, **SCORE_DEFAULTS}

_GROUPS = ("data", "model", "training", "sampling", "eval", "optim", "sde")
_BETA_TYPES = ("linear",)


def _as_dict(obj: Any, what: str) -> Dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # TrainConfig, NCSNppConfig
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        d = obj.to_dict()
        if isinstance(d, Mapping):
            return dict(d)
    if hasattr(obj, "__dict__"):  # argparse.Namespace, SimpleNamespace, plain objects
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(f"{what} must be a dict or an attribute object (argparse.Namespace, ml_collections "
                    f"ConfigDict, ...), got {type(obj).__name__}")


def flatten_config(config: Any) -> Dict[str, Any]:
    """A config (attribute object, dataclass or dict, flat or with groups) as one flat dict.

    Groups ``data``, ``model``, ``training``, ``sampling``, ``eval``, ``optim``, ``sde`` (ml_collections
    style) are merged into the top level, whose own keys win; a key that appears in two groups with
    different values is an error. ``objective`` (``training.objective``, ``TrainConfig.objective``)
    is read as the official ``cld_objective``.
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
    for level in (nested, flat):
        if "objective" in level and "cld_objective" not in level:
            level["cld_objective"] = level["objective"]
    return {**nested, **flat}


def read_config(config: Any) -> Dict[str, Any]:
    """:func:`flatten_config` of ``config``, where a str or path is a ``cld_fast.models`` preset name
    or the path of a JSON file holding the official keys."""
    if isinstance(config, (str, os.PathLike)):
        from .models.configs import resolve_config

        config = resolve_config(config)
    return flatten_config(config)


def to_bool(value: Any, key: str) -> bool:
    """A config boolean (bool, 0/1, or 'true'/'false'/'yes'/'no'/'on'/'off'); ValueError naming ``key``."""
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


def to_float(value: Any, key: str) -> float:
    """A config number; ValueError naming ``key``."""
    if isinstance(value, bool):
        raise ValueError(f"config {key!r} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {key!r} must be a number, got {value!r}") from None


def _known_keys() -> set:
    return {"sde", "beta_type", *SCORE_DEFAULTS, *(k for keys in SDE_KEYS.values() for k in keys)}


def sde_settings(config: Any = None, **overrides: Any) -> Dict[str, Any]:
    """The SDE and score settings a config describes, as plain values.

    Args:
        config: anything :func:`read_config` reads (None: no keys, every default).
        overrides: values that win over the config (None values are ignored), same key names.
    Returns:
        ``{"sde": "cld" | "vpsde"}``, the kind's parameters under their ``SDE_KEYS`` names (floats),
        ``"mixed_score"`` (bool), ``"cld_objective"`` ('hsm' | 'dsm'), ``"from_config"`` (the keys
        that came from ``config``, sorted) and ``"sources"`` ({key: "config" | "argument" | "default"}).
    Raises:
        NotImplementedError: ``beta_type`` other than 'linear'.
        ValueError: an unknown ``sde`` or ``cld_objective``, unreadable values.
        TypeError: an unknown override.
    """
    unknown = sorted(set(overrides) - _known_keys())
    if unknown:
        raise TypeError(f"unknown SDE setting(s) {unknown}; known: {sorted(_known_keys())}")
    flat = {} if config is None else read_config(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    kind = str(given.get("sde", flat.get("sde") or "cld")).lower()
    if kind not in SDE_CLASSES:
        raise ValueError(f"config sde={kind!r}: expected one of {tuple(SDE_CLASSES)}")
    keys = {"sde": kind, "beta_type": "linear", **{k: _CLASS_DEFAULTS[kind][f] for k, f in SDE_KEYS[kind].items()},
            **SCORE_DEFAULTS}
    foreign = sorted(set(given) - set(keys))
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: not a setting of sde={kind!r} (its keys: {sorted(keys)})")
    from_config = sorted(k for k in keys if flat.get(k) is not None)
    chosen = {**keys, **{k: flat[k] for k in from_config}, **given}
    if str(chosen["beta_type"]).lower() not in _BETA_TYPES:
        raise NotImplementedError(f"config beta_type={chosen['beta_type']!r}: only 'linear' "
                                  "(beta(t) = beta0 + beta1 t) is supported")
    objective = str(chosen["cld_objective"]).lower()
    if objective not in OBJECTIVES:
        raise ValueError(f"config cld_objective={chosen['cld_objective']!r}: expected one of {OBJECTIVES}")
    out: Dict[str, Any] = {"sde": kind, "beta_type": "linear"}
    out.update({k: to_float(chosen[k], k) for k in SDE_KEYS[kind]})
    out["mixed_score"] = to_bool(chosen["mixed_score"], "mixed_score")
    out["cld_objective"] = objective
    out["from_config"] = from_config
    out["sources"] = {k: "argument" if k in given else "config" if k in from_config else "default" for k in keys}
    return out


def sde_from_settings(settings: Mapping[str, Any]) -> Union[CLD, VPSDE]:
    """The ``cf.CLD`` / ``cf.VPSDE`` of :func:`sde_settings` output."""
    kind = settings.get("sde", "cld")
    return SDE_CLASSES[kind](**{field: settings[key] for key, field in SDE_KEYS[kind].items()})


def build_sde(config: Any = None, **overrides: Any) -> Union[CLD, VPSDE]:
    """The SDE a config describes.

    Args:
        config: a ``TrainConfig`` (or its ``to_dict()``), an official CLD-SGM config (flat or with
            groups; attribute object or dict), a dict with SDE keys, a ``cld_fast.models`` preset
            name or JSON file, an SDE object (returned as is), or None (``cf.CLD()``).
        overrides: SDE keys that win over the config (``beta0=...``; None values are ignored).
    Returns:
        ``cf.CLD`` or ``cf.VPSDE``; absent keys take the class defaults.
    """
    if getattr(config, "is_sde", False):
        if any(v is not None for v in overrides.values()):
            raise TypeError("build_sde(sde, ...): an SDE object takes no overrides; use dataclasses.replace(sde, ...)")
        return config
    return sde_from_settings(sde_settings(config, **overrides))
