"""The ``torch`` backend: plain PyTorch on any device and float dtype; the readable reference.

Its ops are the ``reference`` functions of ``cld_fast.opdefs`` (every other backend is tested
against them). Coefficients come from ``cld_fast.sde`` in float64; noise, when a seed is given, is
the Philox contract of ``cld_fast.philox`` written in torch ops (slow, but exact).
"""
from __future__ import annotations

import torch

from .. import opdefs

NAME = "torch"


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def op(name: str):
    """The reference implementation of op ``name`` (arguments as in its opdefs schema)."""
    return opdefs.OPS[name].reference
