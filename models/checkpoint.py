"""Loading checkpoints written by the official CLD-SGM code.

Official checkpoints (e.g. ``checkpoint_800000.pth`` for CIFAR-10) are dicts with

* ``model``: the ``state_dict`` of the DDP-wrapped network (every key prefixed ``module.``);
* ``ema``: ``{'decay', 'num_updates', 'shadow_params'}`` where ``shadow_params`` is a list of
  tensors in ``parameters()`` order, trainable parameters only (the frozen Fourier ``W`` is not in it);
* ``optimizer``, ``step``: ignored here.

A plain ``state_dict`` (with or without the ``module.`` prefix) is accepted as well.
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .configs import build_model, resolve_config
from .layers import rename_legacy_combine_keys

__all__ = ["load_official_checkpoint", "extract_state_dict"]

_MAX_LISTED = 5


def _fmt_keys(keys: List[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{len(keys)}: [{shown}{more}]"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(ckpt: Mapping[str, Any]) -> Tuple[dict, Optional[list]]:
    """Split a loaded checkpoint into (state_dict without ``module.`` prefixes, EMA shadow list or None).

    Accepts the official format (``model`` + optional ``ema``) or a plain state_dict. Raises
    ``ValueError`` if neither is recognised or if stripping the prefix creates duplicate keys.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    shadow = None
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        raw = ckpt["model"]
        ema = ckpt.get("ema")
        if ema is not None:
            if not isinstance(ema, Mapping) or "shadow_params" not in ema:
                raise ValueError("checkpoint 'ema' entry has no 'shadow_params' list")
            shadow = list(ema["shadow_params"])
    elif _is_state_dict(ckpt):
        raw = ckpt
    else:
        raise ValueError("checkpoint is neither in the official CLD-SGM format (a dict with a 'model' "
                         f"state_dict) nor a plain state_dict; top-level keys: {_fmt_keys(list(ckpt))}")
    sd = {}
    for k, v in raw.items():
        nk = k[len("module."):] if k.startswith("module.") else k
        if nk in sd:
            raise ValueError(f"duplicate key after removing the 'module.' prefix: {nk!r}")
        sd[nk] = v
    return sd, shadow


def _check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint entries that are not tensors {_fmt_keys(not_tensors)}")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_fmt_keys(wrong)}")
    if problems:
        raise ValueError("checkpoint does not match the network built from the config: " + "; ".join(problems))


def _check_ema(model: nn.Module, shadow: list) -> List[Tuple[str, nn.Parameter]]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(shadow) != len(trainable):
        raise ValueError(f"wrong number of EMA shadow params: checkpoint has {len(shadow)}, the network has "
                         f"{len(trainable)} trainable parameters")
    bad = []
    for i, ((n, p), s) in enumerate(zip(trainable, shadow)):
        if not isinstance(s, torch.Tensor):
            bad.append(f"#{i} ({n}): not a tensor ({type(s).__name__})")
        elif tuple(s.shape) != tuple(p.shape):
            bad.append(f"#{i} ({n}): checkpoint {tuple(s.shape)} vs model {tuple(p.shape)}")
    if bad:
        raise ValueError(f"EMA shadow params do not match the network's parameters: wrong shapes {_fmt_keys(bad)}")
    return trainable


def load_official_checkpoint(path: Union[str, os.PathLike, Mapping[str, Any]], config: Any = "cifar10",
                             use_ema: bool = True, map_location: Any = "cpu") -> nn.Module:
    """Build the network for ``config`` and load an official CLD-SGM checkpoint into it.

    Args:
        path: checkpoint file (read with ``torch.load(..., weights_only=True)``), or an already
            loaded checkpoint dict.
        config: a preset name ('cifar10', 'celebahq256', 'toy2d', 'tiny'), a dict with the official
            config keys (e.g. the contents of an official config file; non-model keys are ignored),
            or the path of a JSON file holding such a dict (as ``cld-fast sample --config``).
        use_ema: copy the EMA ``shadow_params`` into the trainable parameters (in ``parameters()``
            order), as the official code does for sampling and evaluation. Requires an ``ema`` entry
            in an official-format checkpoint. A plain state_dict carries no EMA tensors and is
            loaded as is (``use_ema`` has no effect then).
        map_location: passed to ``torch.load``; when it is a device (str or ``torch.device``) the
            returned network is moved there too.

    Returns:
        The network (``NCSNpp`` or ``MLP``) with float32 weights, in eval mode.
        NCSN++: forward(u (B, 2C, H, W), t (B,)) -> (B, C, H, W).

    Raises:
        ValueError: on any mismatch (missing keys, unexpected keys, wrong shapes, wrong number or
            shapes of EMA tensors, no EMA entry with ``use_ema=True``), listing the first offending
            keys, or for a weight (or EMA tensor in use) holding NaN or inf, naming it. Nothing is
            loaded partially.
    """
    if isinstance(path, Mapping):
        ckpt = path
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    sd, shadow = extract_state_dict(ckpt)
    is_official = isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping)
    if use_ema and is_official and shadow is None:
        raise ValueError("use_ema=True but the checkpoint has no 'ema' entry; pass use_ema=False to load the raw "
                         "weights")

    for name, tensors in (("model", sd), ("ema shadow_params", shadow if use_ema else None)):
        items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors or ())
        for k, v in items:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"checkpoint tensor {name}[{k!r}] holds NaN or inf; refusing to load it")
    model = build_model(resolve_config(config))
    sd = rename_legacy_combine_keys(model, sd)
    _check_state_dict(model, sd)
    trainable = _check_ema(model, shadow) if (use_ema and shadow is not None) else None

    model.load_state_dict(sd, strict=True)
    if trainable is not None:
        with torch.no_grad():
            for (_, p), s in zip(trainable, shadow):
                p.copy_(s.to(device=p.device, dtype=p.dtype))

    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()
