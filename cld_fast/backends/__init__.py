"""Backend registry: which kernel implementation runs an op, and why another one can't.

Backends, in order of preference on their devices:

    cuda    hand-written CUDA C++ (``cld_fast._C``), CUDA tensors, float32 state
    triton  Triton kernels (``cld_fast.triton_kernels``), CUDA tensors, or CPU under TRITON_INTERPRET=1
    cpu     C++ with OpenMP (``cld_fast._C``), CPU tensors, float32 / float64 state
    torch   plain PyTorch, any device and float dtype: the reference

``CLD_FAST_BACKEND=<name>`` forces one for every op; a forced backend that can't run here, or
can't run on the given tensors, raises a RuntimeError that says why.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from typing import List

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
_MODULES = {
    "cuda": ".cuda_backend",
    "triton": ".triton_backend",
    "cpu": ".cpu_backend",
    "torch": ".torch_backend",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_loaded = {}


def get(name: str):
    """The backend module ``name`` (imported lazily); raises ValueError for an unknown name."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name], __name__)
        except ImportError as exc:  # a backend whose dependency is missing
            _loaded[name] = _Missing(name, str(exc))
    return _loaded[name]


class _Missing:
    def __init__(self, name, why):
        self.NAME = name
        self._why = why

    def is_available(self):
        return False

    def why_unavailable(self):
        return self._why

    def supports(self, device, dtype):
        return False


def available() -> List[str]:
    """Names of the backends that can run on this machine, in preference order."""
    return [n for n in BACKEND_NAMES if get(n).is_available()]


def forced() -> str:
    """The backend named by ``CLD_FAST_BACKEND``, or '' when unset."""
    name = os.environ.get("CLD_FAST_BACKEND", "").strip().lower()
    if name and name not in _MODULES:
        raise RuntimeError(f"CLD_FAST_BACKEND={name!r} is not a backend; expected one of {BACKEND_NAMES}")
    return name


def select(device: torch.device, dtype: torch.dtype, backend: str = None):
    """The backend module to run an op on tensors of ``device`` and state ``dtype``.

    ``backend`` (or else ``CLD_FAST_BACKEND``) forces a choice; otherwise the first available
    backend in preference order that supports the device and dtype.
    """
    name = backend or forced()
    device = torch.device(device)
    if name:
        mod = get(name)
        if not mod.is_available():
            raise RuntimeError(f"backend {name!r} was requested but can't run here: {mod.why_unavailable()}")
        if not mod.supports(device, dtype):
            raise RuntimeError(
                f"backend {name!r} was requested but does not support {dtype} tensors on {device.type}"
            )
        return mod
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        mod = get(candidate)
        if mod.is_available() and mod.supports(device, dtype):
            return mod
    return get("torch")


class _CallableModule(types.ModuleType):
    """Lets ``cld_fast.backends()`` (the public API) and the ``cld_fast.backends`` registry be one object."""

    def __call__(self) -> List[str]:
        return available()


sys.modules[__name__].__class__ = _CallableModule
