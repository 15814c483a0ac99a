"""Named network configurations (official CLD-SGM key names) and ``build_model``.

Presets:

* ``cifar10``     the official CLD-SGM CIFAR-10 NCSN++ (``configs/default_cifar10.txt``): 107,593,987
                  parameters; this is the network of the released ``checkpoint_800000.pth``.
* ``celebahq256`` the official CLD-SGM CelebA-HQ-256 model (103,073,795 parameters): no FIR,
                  progressive none/none, positional embedding of t, 4 res-blocks, ch_mult
                  1,1,2,2,2,2,2, numerical_eps 1e-6, beta(t) = 0.1 + 6.9 t (see the comment at
                  ``_CELEBAHQ256`` for where the values come from).
* ``toy2d``       the MLP for 2-D toy data (official ``name = mlp``, ``configs/default_toy_data.txt``).
* ``digits8``     a small NCSN++ for 8x8 grey digits (scikit-learn's ``digits``): 16..32 channels,
                  two levels (8, 4), 1 res-block per level, attention at 4, no dropout.
* ``mnist28``     a small NCSN++ for 28x28 grey digits (``mnist5k``): 32..64 channels, three levels
                  (28, 14, 7), 1 res-block per level, attention at 7, no dropout.
* ``tiny``        a very small NCSN++ for tests (8x8 images, 8..16 channels, every CIFAR-10 option
                  kind exercised: BigGAN FIR blocks, residual input pyramid, attention).

Besides the network keys, the presets carry the official SDE and objective keys (``sde``,
``beta_type``, ``beta0``, ``beta1``, ``m_inv``, ``gamma``, ``numerical_eps``, ``mixed_score``,
``cld_objective``, ...): ``cld_fast.build_sde``, ``cld_fast.load_score_model`` and ``cld-fast sample
--config`` build the SDE from them. ``build_model`` ignores them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Union

import torch.nn as nn

from cld_fast.sde import CLD_DEFAULTS

from .mlp import MLP
from .ncsnpp import NCSNpp, NCSNppConfig

__all__ = ["PRESETS", "available_configs", "get_config", "resolve_config", "build_model", "model_option_names"]

# The SDE block of the official configs/specific_cifar10.txt and default_toy_data.txt: the CLD defaults.
_CLD_SDE: Dict[str, Any] = {"sde": "cld", "beta_type": "linear", **CLD_DEFAULTS}

_CIFAR10: Dict[str, Any] = {
    "name": "ncsnpp",
    "image_size": 32,
    "image_channels": 3,
    "n_channels": 128,
    "ch_mult": "1,2,2,2",
    "n_resblocks": 8,
    "attn_resolutions": "16",
    "resamp_with_conv": True,
    "use_fir": True,
    "fir_kernel": "1,3,3,1",
    "skip_rescale": True,
    "resblock_type": "biggan",
    "progressive": "none",
    "progressive_input": "residual",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "init_scale": 0.0,
    "fourier_scale": 16,
    "conv_size": 3,
    "embedding_type": "fourier",
    "dropout": 0.1,
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    # SDE and objective (official configs/specific_cifar10.txt)
    **_CLD_SDE,
    "mixed_score": True,
    "cld_objective": "hsm",
    "loss_eps": 1e-5,
    "weighting": "reweightedv2",
}

# The official configs/default_celeba_post_paper.txt + specific_celeba_post_paper.txt (nv-tlabs/CLD-SGM),
# the run of the released celebahq256_600000.pth (600k iterations): 4 res-blocks, beta(t) = 0.1 + 6.9 t,
# loss_eps 1e-3. The "paper" variant (specific_celeba_paper.txt) differs in n_resblocks = 2, beta0 = 4,
# beta1 = 0 and loss_eps = 1e-5. Sampling keys are left out: the official defaults (the ODE, sampling_eps
# 1e-3, denoising) are what a config without them gets.
_CELEBAHQ256: Dict[str, Any] = dict(
    _CIFAR10,
    image_size=256,
    n_channels=128,
    ch_mult="1,1,2,2,2,2,2",
    n_resblocks=4,
    attn_resolutions="16",
    resamp_with_conv=True,
    use_fir=False,
    fir_kernel="1,3,3,1",
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    attention_type="ddpm",
    init_scale=0.0,
    fourier_scale=16,
    conv_size=3,
    embedding_type="positional",
    dropout=0.1,
    mixed_score=True,
    numerical_eps=1e-6,
    beta0=0.1,
    beta1=6.9,
    cld_objective="hsm",
    loss_eps=1e-3,
    weighting="reweightedv2",
)

_TOY2D: Dict[str, Any] = {
    "name": "mlp",
    "data_dim": 2,
    "hidden_dim": 128,
    # official configs/default_toy_data.txt
    **_CLD_SDE,
    "numerical_eps": 1e-6,
    "cld_objective": "hsm",
    "loss_eps": 1e-5,
    "weighting": "reweightedv2",
}

_TINY: Dict[str, Any] = dict(
    _CIFAR10,
    image_size=8,
    n_channels=8,
    ch_mult="1,2",
    n_resblocks=1,
    attn_resolutions="4",
    dropout=0.0,
)

# Digit presets: the CIFAR-10 block types at a size a 2-core CPU trains in minutes (8x8) or in
# about half an hour (28x28); parameter counts in docs/images.md.
_DIGITS8: Dict[str, Any] = dict(
    _CIFAR10, image_size=8, image_channels=1, n_channels=16, ch_mult="1,2", n_resblocks=1,
    attn_resolutions="4", dropout=0.0,
)

_MNIST28: Dict[str, Any] = dict(
    _CIFAR10, image_size=28, image_channels=1, n_channels=32, ch_mult="1,2,2", n_resblocks=1,
    attn_resolutions="7", dropout=0.0,
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar10": _CIFAR10,
    "digits8": _DIGITS8,
    "mnist28": _MNIST28,
    "celebahq256": _CELEBAHQ256,
    "toy2d": _TOY2D,
    "tiny": _TINY,
}

_ALIASES = {"cifar": "cifar10", "celebahq": "celebahq256", "celeba_hq_256": "celebahq256",
            "celebahq_256": "celebahq256", "toy": "toy2d", "mlp": "toy2d"}


def available_configs() -> list:
    """Names of the presets accepted by :func:`get_config` / :func:`build_model` (list of str)."""
    return sorted(PRESETS)


def get_config(name: str) -> Dict[str, Any]:
    """Return a (deep) copy of the preset dict ``name`` (official key names; list options as strings).

    Raises ``ValueError`` for an unknown name.
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PRESETS:
        raise ValueError(f"unknown config {name!r}; available: {available_configs()}")
    return copy.deepcopy(PRESETS[key])


def resolve_config(config: Union[str, Mapping[str, Any], NCSNppConfig]) -> Dict[str, Any]:
    """A preset name, a dict with official keys, the path of a JSON file holding such a dict, or an
    ``NCSNppConfig`` -> a plain config dict (copy)."""
    if isinstance(config, os.PathLike) or (isinstance(config, str) and str(config).lower() not in PRESETS
                                           and str(config).lower() not in _ALIASES and os.path.isfile(config)):
        try:
            with open(config) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"config file {os.fspath(config)!r} is not readable JSON: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {os.fspath(config)!r} must hold a JSON object, got {type(loaded).__name__}")
        return dict(loaded)
    if isinstance(config, str):
        return get_config(config)
    if isinstance(config, NCSNppConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a preset name, a dict or an NCSNppConfig, got {type(config).__name__}")


def model_option_names(config: Union[str, Mapping[str, Any]]) -> set:
    """The config keys the network that ``config`` names reads (anything else would be ignored)."""
    cfg = resolve_config(config)
    name = str(cfg.get("name", "ncsnpp")).lower()
    if name == "mlp":
        return {"name", "sde", "data_dim", "input_dim", "hidden_dim"}
    if name == "ncsnpp":
        return {f.name for f in dataclasses.fields(NCSNppConfig)}
    raise ValueError(f"unknown model name {name!r} (expected 'ncsnpp' or 'mlp')")


def build_model(config: Union[str, Mapping[str, Any], NCSNppConfig] = "cifar10") -> nn.Module:
    """Build a freshly initialised network (float32, CPU, train mode) from a preset name or config dict.

    ``config['name']`` picks the class: 'ncsnpp' (the default) -> :class:`NCSNpp` taking
    u (B, 2C, H, W), t (B,) -> (B, C, H, W); 'mlp' -> :class:`MLP` taking u (B, 2D), t (B,) -> (B, D).
    Missing NCSN++ keys take the CIFAR-10 values.
    """
    cfg = resolve_config(config)
    name = str(cfg.get("name", "ncsnpp")).lower()
    if name == "mlp":
        return MLP(cfg)
    if name == "ncsnpp":
        return NCSNpp(NCSNppConfig.from_dict(cfg))
    raise ValueError(f"unknown model name {name!r} (expected 'ncsnpp' or 'mlp')")
