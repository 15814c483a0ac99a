"""Fake (meta) implementations of the ``torch.ops.cld_fast`` ops, so they trace under ``torch.compile``.

The compiled extension defines the schemas (``csrc/bindings.cpp``); these functions only describe
the outputs' shapes and dtypes. ``register()`` is called lazily by the ``cpu`` and ``cuda`` backends
the first time they run an op; it is idempotent and does nothing when the extension is missing or
``torch.library.register_fake`` is unavailable.
"""
from __future__ import annotations

import torch

_done = {"ok": False}


def _loss_dtype(out, u):
    return torch.float64 if torch.float64 in (out.dtype, u.dtype) else torch.float32


def _perturb(x0, v0, coef, eps, seed, out):
    return None


def _hsm_loss_fwd(out, u, coef, eps_v, seed):
    return u.new_empty((u.shape[0],), dtype=_loss_dtype(out, u))


def _hsm_loss_bwd(grad, out, u, coef, eps_v, seed):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _mixed_score(out, u, coef):
    return u.new_empty((u.shape[0], u.shape[2]))


def _half_step_(u, table, step, eps, seed):
    return None


def _sscs_step_(u, y, table, step, eps, seed):
    return None


def _affine_step(u, y, table, step, eps, seed, out):
    return None


FAKES = {
    "perturb": _perturb,
    "hsm_loss_fwd": _hsm_loss_fwd,
    "hsm_loss_bwd": _hsm_loss_bwd,
    "mixed_score": _mixed_score,
    "half_step_": _half_step_,
    "sscs_step_": _sscs_step_,
    "affine_step": _affine_step,
}


def register() -> bool:
    """Register every fake once; True when they are registered (now or before)."""
    if _done["ok"]:
        return True
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is None:
        return False
    from ._extension import load_extension

    ext, _ = load_extension()
    if ext is None:
        return False
    for name, fn in FAKES.items():
        try:
            register_fake(f"cld_fast::{name}")(fn)
        except RuntimeError as exc:  # already registered (e.g. the module was reloaded)
            if "already" not in str(exc):
                raise
    _done["ok"] = True
    return True
