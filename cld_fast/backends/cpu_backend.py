"""The ``cpu`` backend: the C++ kernels of ``cld_fast._C`` (csrc/cpu), one fused OpenMP pass per op.

Same contract as ``torch_backend``. The kernels are ``torch.ops.cld_fast.*`` (registered by
``csrc/bindings.cpp`` for the CPU and, where built, CUDA dispatch keys), so this module and
``cuda_backend`` differ only in the device they accept: ``cuda_backend`` re-exports the op wrappers
below. Noise comes in as ``eps`` tensors drawn from a ``torch.Generator``, or in seed mode is drawn in
C++ by the same Philox contract as Triton and CUDA.

The wrappers cast what the reference casts (coefficients and noise to the state dtype, the loss's
``eps_v`` and ``grad`` to its accumulation dtype) and make inputs contiguous; a non-contiguous
in-place target is updated through a contiguous copy.
"""
from __future__ import annotations

import torch

from .._extension import compiled_parts, load_extension

NAME = "cpu"


def is_available() -> bool:
    return "cpu" in compiled_parts()


def why_unavailable() -> str:
    ext, why = load_extension()
    if ext is None:
        return f"the compiled extension cld_fast._C is not importable ({why})"
    if is_available():
        return ""
    return "cld_fast._C was built without the CPU kernels"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)


def _register_fakes():
    """Fake (meta) kernels so the ops trace under torch.compile; optional, eager works without them.

    Runs when this module is first imported (the backend registry imports backends lazily), i.e.
    before any op call can be traced: registering from inside a traced function would break the graph.
    """
    try:
        from .. import _fake_ops

        _fake_ops.register()
    except Exception:  # noqa: BLE001 - no extension, or a torch without register_fake
        pass


def _ops():
    load_extension()
    return torch.ops.cld_fast


def _c(t, dtype=None):
    """``t`` contiguous (and in ``dtype``), or None."""
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _loss_dtype(out, u):
    return torch.float64 if torch.float64 in (out.dtype, u.dtype) else torch.float32


class _InPlace:
    """A contiguous stand-in for an in-place target, copied back on exit when it had to be made."""

    def __init__(self, t):
        self.t = t
        self.work = t if t.is_contiguous() else t.contiguous()

    def __enter__(self):
        return self.work

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.work is not self.t:
            self.t.copy_(self.work)
        return False


def perturb(x0, coef, out, eps=None, seed=None, v0=None):
    dt = out.dtype
    with _InPlace(out) as o:
        _ops().perturb(_c(x0, dt), _c(v0, dt), _c(coef, dt), _c(eps, dt), seed, o)
    return out


def hsm_loss_fwd(out, u, coef, eps_v=None, seed=None):
    acc = _loss_dtype(out, u)
    return _ops().hsm_loss_fwd(_c(out), _c(u), _c(coef, u.dtype), _c(eps_v, acc), seed)


def hsm_loss_bwd(grad, out, u, coef, eps_v=None, seed=None):
    acc = _loss_dtype(out, u)
    return _ops().hsm_loss_bwd(_c(grad, acc), _c(out), _c(u), _c(coef, u.dtype), _c(eps_v, acc), seed)


def mixed_score(out, u, coef):
    return _ops().mixed_score(_c(out), _c(u), _c(coef, u.dtype))


def half_step_(u, table, step, eps=None, seed=None):
    with _InPlace(u) as w:
        _ops().half_step_(w, _c(table, u.dtype), step, _c(eps, u.dtype), seed)
    return u


def sscs_step_(u, y, table, step, eps=None, seed=None):
    with _InPlace(u) as w:
        _ops().sscs_step_(w, _c(y), _c(table, u.dtype), step, _c(eps, u.dtype), seed)
    return u


def affine_step(u, y, table, step, out, eps=None, seed=None):
    dt = out.dtype
    with _InPlace(out) as o:
        src = o if u is out else _c(u, dt)
        _ops().affine_step(src, _c(y), _c(table, dt), step, _c(eps, dt), seed, o)
    return out


_register_fakes()
