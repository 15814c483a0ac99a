"""Networks for CLD: NCSN++ (official-checkpoint compatible) and the 2-D toy MLP.

Installed as ``cld_fast.models`` (never as a top-level ``models`` package).

Public API::

    from cld_fast.models import build_model, get_config, load_official_checkpoint
    net = build_model("cifar10")            # NCSN++: net(u (B, 6, 32, 32), t (B,)) -> (B, 3, 32, 32)
    net = load_official_checkpoint("checkpoint_800000.pth", config="cifar10", use_ema=True)
    mlp = build_model("toy2d")               # MLP: mlp(u (B, 4), t (B,)) -> (B, 2)

Modules: ``up_or_down_sampling`` (FIR resampling in plain PyTorch), ``layers`` (NCSN++ blocks),
``ncsnpp`` (the network and its config), ``mlp`` (toy MLP), ``configs`` (presets, ``build_model``),
``checkpoint`` (``load_official_checkpoint``).
"""
from .checkpoint import extract_state_dict, load_official_checkpoint
from .configs import PRESETS, available_configs, build_model, get_config
from .mlp import MLP
from .ncsnpp import NCSNpp, NCSNppConfig

__all__ = [
    "NCSNpp",
    "NCSNppConfig",
    "MLP",
    "PRESETS",
    "available_configs",
    "build_model",
    "get_config",
    "load_official_checkpoint",
    "extract_state_dict",
]
