"""Input checks at the API boundary: each bad input raises a ValueError or TypeError naming the argument.

Shape, dtype and device checks are free (metadata only). Value checks (t in (0, 1], finite
values) read tensor contents, which costs a host synchronisation for CUDA tensors; they are on by
default and can be switched off for hot loops with ``cld_fast.value_checks(False)`` (a context
manager) or ``CLD_FAST_VALUE_CHECKS=0``. The built-in trainer and samplers make their own times and
switch them off internally.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional, Sequence

import torch

STATE_DTYPES = (torch.float32, torch.float64)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_value_checks = [os.environ.get("CLD_FAST_VALUE_CHECKS", "1").lower() not in ("0", "false", "no", "off")]


def value_checks_enabled() -> bool:
    """Whether value checks (t range, finiteness) run; see the module docstring."""
    return _value_checks[-1]


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Context manager that turns value checks on or off inside its block."""
    _value_checks.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks.pop()


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, name: str, dtypes: Sequence[torch.dtype] = STATE_DTYPES, min_dim: int = 0) -> torch.Tensor:
    """Check that ``x`` is a tensor of one of ``dtypes`` with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def same_device(reference: torch.Tensor, ref_name: str, **others) -> None:
    """Check every tensor in ``others`` lives on ``reference``'s device."""
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {reference.device}; put them on one device")


def finite(x: torch.Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or inf (a value check)."""
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def time(t, batch: int, device: torch.device, name: str = "t") -> torch.Tensor:
    """Check forward times: a floating tensor of shape (batch,) on ``device`` with values in (0, 1]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {str(t.dtype).replace('torch.', '')}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one time per sample), got {tuple(t.shape)}")
    if t.device != torch.device(device) and not (t.device.type == torch.device(device).type == "cuda" and torch.device(device).index is None):
        raise ValueError(f"{name} is on {t.device} but the data is on {device}; put them on one device")
    if value_checks_enabled():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(
                f"{name} must lie in (0, 1] (forward time, t = 0 is data), got min {float(t.min()):.3g}, max {float(t.max()):.3g}"
            )
    return t


def state_for(u: torch.Tensor, x_shape: Sequence[int], name: str = "u", x_name: str = "x") -> None:
    """Check that ``u`` is (B, 2C, ...) for data of shape ``x_shape`` = (B, C, ...)."""
    x_shape = tuple(x_shape)
    expected = (x_shape[0], 2 * x_shape[1]) + x_shape[2:]
    if tuple(u.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} (x and v stacked along dim 1) for {x_name} of shape {x_shape}, got {tuple(u.shape)}"
        )


def data_shape_of(u: torch.Tensor, name: str = "u"):
    """The data shape (B, C, ...) of a state (B, 2C, ...); odd channel counts are an error."""
    if u.dim() < 2:
        raise ValueError(f"{name} must have shape (B, 2C, ...), got {tuple(u.shape)}")
    if u.shape[1] % 2:
        raise ValueError(f"{name} must have an even size along dim 1 (x and v stacked), got shape {tuple(u.shape)}")
    return (u.shape[0], u.shape[1] // 2) + tuple(u.shape[2:])


def step_tensor(step, device: torch.device, name: str = "step") -> torch.Tensor:
    """A (1,) int64 tensor on ``device`` from an int or a tensor (a device tensor is read in-kernel)."""
    if isinstance(step, bool):
        raise TypeError(f"{name} must be an int or a (1,) int64 tensor, got bool")
    if isinstance(step, int):
        if step < 0:
            raise ValueError(f"{name} must be >= 0, got {step}")
        return torch.tensor([step], dtype=torch.int64, device=device)
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"{name} must be an int or a (1,) int64 tensor, got {type(step).__name__}")
    if step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"{name} must be a (1,) int64 tensor, got dtype {step.dtype} and shape {tuple(step.shape)}")
    if step.device != torch.device(device) and not (step.device.type == "cuda" == torch.device(device).type):
        raise ValueError(f"{name} is on {step.device} but the data is on {device}")
    return step.reshape(1)


def optional_int(value, name: str, minimum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
