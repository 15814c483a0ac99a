"""Input checks at the API boundary: each bad input raises a ValueError or TypeError naming the argument.

Shape, dtype, device and layout checks read metadata only and always run. Value checks (t in
(0, 1], finite values, step and seed ranges) read tensor contents and never stop the device:

* CPU tensors are read in place on the host (no dispatched op, no synchronisation); a bad value
  raises at once, naming the argument.
* Tensors on an accelerator are checked by an asynchronous device assertion
  (``torch._assert_async``) queued behind the op: no host synchronisation. A bad value surfaces as
  a device-side assertion error at the next call that synchronises with the device (docs/guarantees.md).

Value checks are on by default (``CLD_FAST_VALUE_CHECKS=0`` turns the default off) and can be
switched off per thread with the ``cld_fast.value_checks(False)`` context manager: the switch of one
thread never changes another thread's checks.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

STATE_DTYPES = (torch.float32, torch.float64)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_DEFAULT_VALUE_CHECKS = os.environ.get("CLD_FAST_VALUE_CHECKS", "1").lower() not in ("0", "false", "no", "off")
_local = threading.local()


def _switches() -> list:
    """This thread's stack of ``value_checks`` switches (empty: the process default)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def value_checks_enabled() -> bool:
    """Whether value checks (t range, finiteness, step and seed ranges) run in this thread."""
    stack = _switches()
    return stack[-1] if stack else _DEFAULT_VALUE_CHECKS


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Context manager that turns value checks on or off inside its block, for the calling thread only."""
    stack = _switches()
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def on_host(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read on the host without a device synchronisation."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and type(x) is torch.Tensor


def host_values(x: torch.Tensor) -> np.ndarray:
    """The values of a CPU tensor as a NumPy array sharing its memory (no dispatched op, no copy).

    bfloat16 is widened to float32 (NumPy has no bfloat16); other dtypes keep theirs.
    """
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return (x.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)
    return x.numpy()


_FINITE_CHUNK = 1 << 16
_ZEROS = {np.dtype(np.float32): np.zeros(_FINITE_CHUNK, np.float32),
          np.dtype(np.float64): np.zeros(_FINITE_CHUNK, np.float64)}


def _all_finite(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is finite, in cache-sized chunks (no (N,) mask is allocated).

    float32 / float64 chunks go through a BLAS dot product with zeros: x * 0 is 0 for every finite x
    (the largest and the subnormal included) and NaN for NaN and +-inf, so the dot is finite exactly
    when the chunk is, at about 2.5x the speed of ``np.isfinite`` and a reduction. Other dtypes use
    ``np.isfinite``.
    """
    flat = a.reshape(-1)
    zeros = _ZEROS.get(flat.dtype)
    if zeros is not None:
        with np.errstate(invalid="ignore"):
            for start in range(0, flat.size, _FINITE_CHUNK):
                chunk = flat[start:start + _FINITE_CHUNK]
                if not np.isfinite(np.dot(chunk, zeros[:chunk.size])):
                    return False
        return True
    mask = np.empty(min(flat.size, _FINITE_CHUNK), dtype=bool)
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        part = mask[:chunk.size]
        np.isfinite(chunk, out=part)
        if not part.all():
            return False
    return True


def device_assert(condition: torch.Tensor, message: str) -> None:
    """Queue an asynchronous device assertion that ``condition`` (a one-element bool tensor) holds."""
    torch._assert_async(condition, message)


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


def nonfinite_error(name: str) -> ValueError:
    """The error of a failed finiteness check of argument ``name``."""
    return ValueError(f"{name} contains NaN or inf values")


def finite(x: torch.Tensor, name: str, wait: bool = True) -> None:
    """Raise if ``x`` holds NaN or inf (a value check).

    CPU tensors are checked at once. Others: with ``wait`` (for a check once per long job, such as
    a sampler's result) by a host read that synchronises; without (the ops) by a device assertion.
    """
    if not value_checks_enabled():
        return
    if on_host(x):
        if not _all_finite(host_values(x)):
            raise nonfinite_error(name)
    elif wait:
        if not bool(torch.isfinite(x).all()):
            raise nonfinite_error(name)
    else:
        device_assert(torch.isfinite(x).all(), f"{name} contains NaN or inf values")


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
        in_range(t, name, 0.0, 1.0, low_open=True, what="(forward time, t = 0 is data)")
    return t


def in_range(x: torch.Tensor, name: str, low: float, high: float, low_open: bool = False, what: str = "") -> None:
    """Value check: every element of ``x`` is finite and in [low, high] (``low_open``: (low, high]).

    The error reads "{name} must lie in [low, high] {what}"; on the host it adds the min and max.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    message = " ".join(part for part in (f"{name} must lie in {interval}", what) if part)
    if not on_host(x):
        above = (x > low) if low_open else (x >= low)
        device_assert((above & (x <= high)).all(), message)
        return
    a = host_values(x)
    if not _all_finite(a):
        raise ValueError(f"{name} contains NaN or inf values")
    lo, hi = a.min(), a.max()
    if (lo <= low if low_open else lo < low) or hi > high:
        raise ValueError(f"{message}, got min {float(lo):.3g}, max {float(hi):.3g}")


def int_in_range(x: torch.Tensor, name: str, low: int, high: int, message: str = "") -> Optional[int]:
    """Value check of a one-element int64 tensor: low <= x <= high. Returns the value when read on the host.

    ``message`` (default: "{name} must be in [low, high]") is the error; on the host ``{value}`` in it is
    replaced by the value read.
    """
    message = message or f"{name} must be in [{low}, {high}], got {{value}}"
    if not on_host(x):
        device_assert(((x >= low) & (x <= high)).all(), message.replace("{value}", "an out-of-range value"))
        return None
    value = int(host_values(x).reshape(-1)[0])
    if not low <= value <= high:
        raise ValueError(message.replace("{value}", str(value)))
    return value


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
