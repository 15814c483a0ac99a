"""The ``triton`` backend: Triton kernels (``cld_fast.triton_kernels``), one launch per op.

Same contract as ``torch_backend`` (see there for shapes and semantics). Runs on CUDA tensors, or on
CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton kernels were defined (the Triton
interpreter; slow, for tests). State float32 (float64 also works); network outputs ``out`` / ``y``
may be bf16 / fp16; coefficient tables may be float64 (cast inside the kernels, no extra launch).
Seeds and steps are (1,) int64 device tensors read inside the kernels: no host synchronisation.

Every op is a PyTorch custom operator in the ``cld_fast_triton`` namespace, so it runs inside
``torch.compile``d code without a graph break:

* GPU (normal Triton): ``torch.library.triton_op`` with ``wrap_triton`` launches (torch >= 2.6), so
  Inductor sees the Triton kernels themselves; older torch: ``torch.library.custom_op`` +
  ``register_fake`` (an opaque op).
* TRITON_INTERPRET=1: ``custom_op`` + ``register_fake``. ``triton_op`` traces its body with fake
  tensors, which an interpreted kernel cannot run on, so the op must stay opaque there.

Ops that write their inputs (perturb -> out, half_step / sscs_step -> u, affine_step -> out) return
nothing at the op level; the functions below return the written tensor as the contract says.
"""
import os
from typing import Optional

import torch

NAME = "triton"
NAMESPACE = "cld_fast_triton"
# hsm_loss_bwd reads grad through its strides (the stride-0 gradient of a sum needs no copy).
STRIDED_LOSS_GRAD = True

try:
    import triton  # noqa: F401

    from ..triton_kernels import _common as _tk_common
    from ..triton_kernels import hsm_loss as _tk_loss
    from ..triton_kernels import mixed_score as _tk_mixed
    from ..triton_kernels import perturb as _tk_perturb
    from ..triton_kernels import sampler_steps as _tk_steps

    _IMPORT_ERROR = ""
except ImportError as _exc:  # triton missing: the backend reports itself unavailable
    _IMPORT_ERROR = f"triton is not importable ({_exc})"


def _interpreted() -> bool:
    """Whether this process's kernels were built for the Triton interpreter."""
    return not _IMPORT_ERROR and _tk_common.kernel_is_interpreted(_tk_perturb._perturb_kernel)


def is_available() -> bool:
    if _IMPORT_ERROR:
        return False
    return _interpreted() or torch.cuda.is_available()


def why_unavailable() -> str:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if _interpreted() or torch.cuda.is_available():
        return ""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return ("no CUDA device, and TRITON_INTERPRET=1 was set only after cld_fast's Triton kernels "
                "were defined (set it before importing cld_fast)")
    return "no CUDA device (set TRITON_INTERPRET=1 before importing cld_fast to run the kernels on the CPU)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    if not is_available() or dtype not in (torch.float32, torch.float64):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreted()


# ---- op bodies (plain functions of tensors; launched through wrap_triton where it applies) -----


def _perturb_impl(x0: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, eps: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], v0: Optional[torch.Tensor]) -> None:
    _tk_perturb.perturb(x0, coef, out, eps=eps, seed=seed, v0=v0)


def _hsm_loss_fwd_impl(out: torch.Tensor, u: torch.Tensor, coef: torch.Tensor, eps_v: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor]) -> torch.Tensor:
    return _tk_loss.hsm_loss_fwd(out, u, coef, eps_v=eps_v, seed=seed)


def _hsm_loss_bwd_impl(grad: torch.Tensor, out: torch.Tensor, u: torch.Tensor, coef: torch.Tensor,
                       eps_v: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> torch.Tensor:
    return _tk_loss.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v, seed=seed)


def _mixed_score_impl(out: torch.Tensor, u: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return _tk_mixed.mixed_score(out, u, coef)


def _half_step_impl(u: torch.Tensor, table: torch.Tensor, step: torch.Tensor, eps: Optional[torch.Tensor],
                    seed: Optional[torch.Tensor]) -> None:
    _tk_steps.half_step_(u, table, step, eps=eps, seed=seed)


def _sscs_step_impl(u: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                    eps: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> None:
    _tk_steps.sscs_step_(u, y, table, step, eps=eps, seed=seed)


def _affine_step_impl(u: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                      out: torch.Tensor, eps: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> None:
    _tk_steps.affine_step(u, y, table, step, out, eps=eps, seed=seed)


# ---- fake (meta) implementations, for the opaque custom_op registration ---------------------


def _fake_none(*args, **kwargs) -> None:
    return None


def _hsm_loss_fwd_fake(out, u, coef, eps_v, seed):
    acc = torch.float64 if (out.dtype == torch.float64 or u.dtype == torch.float64) else torch.float32
    return u.new_empty((u.shape[0],), dtype=acc)


def _hsm_loss_bwd_fake(grad, out, u, coef, eps_v, seed):
    return out.new_empty((u.shape[0], u.shape[2]), dtype=out.dtype)


def _mixed_score_fake(out, u, coef):
    return u.new_empty((u.shape[0], u.shape[2]), dtype=u.dtype)


_OPS = {
    # name: (body, mutated args, fake)
    "perturb": (_perturb_impl, ("out",), _fake_none),
    "hsm_loss_fwd": (_hsm_loss_fwd_impl, (), _hsm_loss_fwd_fake),
    "hsm_loss_bwd": (_hsm_loss_bwd_impl, (), _hsm_loss_bwd_fake),
    "mixed_score": (_mixed_score_impl, (), _mixed_score_fake),
    "half_step": (_half_step_impl, ("u",), _fake_none),
    "sscs_step": (_sscs_step_impl, ("u",), _fake_none),
    "affine_step": (_affine_step_impl, ("out",), _fake_none),
}

REGISTRATION = ""  # "triton_op", "custom_op" or "" (plain functions), set by _register()


def _existing(name):
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None


def _register():
    global REGISTRATION
    lib = torch.library
    use_triton_op = hasattr(lib, "triton_op") and not _interpreted()
    ops = {}
    for name, (fn, mutated, fake) in _OPS.items():
        qualname = f"{NAMESPACE}::{name}"
        if _existing(name) is None:
            if use_triton_op:
                lib.triton_op(qualname, fn, mutates_args=mutated)
            elif hasattr(lib, "custom_op"):
                op = lib.custom_op(qualname, fn, mutates_args=mutated)
                op.register_fake(fake)
            else:  # pragma: no cover - torch < 2.4: plain calls, no torch.compile integration
                ops[name] = fn
                continue
        ops[name] = _existing(name)
    if hasattr(lib, "custom_op"):
        REGISTRATION = "triton_op" if use_triton_op else "custom_op"
    return ops


_ops = _register() if not _IMPORT_ERROR else {}


# ---- the backend contract ----------------------------------------------------------------------


def perturb(x0, coef, out, eps=None, seed=None, v0=None):
    """u = A @ (x0, v0) + L @ eps written into ``out`` (B, 2, D); x0 (B, D), coef (B, 7)."""
    _ops["perturb"](x0, coef, out, eps, seed, v0)
    return out


def hsm_loss_fwd(out, u, coef, eps_v=None, seed=None):
    """Per-sample w * sum_d (out + c v - eps_v)^2 -> (B,) float32 (float64 for float64 inputs)."""
    return _ops["hsm_loss_fwd"](out, u, coef, eps_v, seed)


def hsm_loss_bwd(grad, out, u, coef, eps_v=None, seed=None):
    """d loss / d out = 2 w grad_b (out + c v - eps_v) -> (B, D) in out's dtype; grad (B,)."""
    return _ops["hsm_loss_bwd"](grad, out, u, coef, eps_v, seed)


def mixed_score(out, u, coef):
    """score = c0 v + c1 out (B, D) in u's dtype; u (B, 2, D), coef (B, 2) = (-1/s_vv, -1/l22)."""
    return _ops["mixed_score"](out, u, coef)


def half_step_(u, table, step, eps=None, seed=None):
    """One analytic half step (row ``step`` of a (S, 7) table) with noise (z0, z1), in place."""
    _ops["half_step"](u, table, step, eps, seed)
    return u


def sscs_step_(u, y, table, step, eps=None, seed=None):
    """Fused SSCS update with row ``step`` of a (S, 16) table, in place."""
    _ops["sscs_step"](u, y, table, step, eps, seed)
    return u


def affine_step(u, y, table, step, out, eps=None, seed=None):
    """out = (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z) with row ``step`` of a (S, 6) table."""
    _ops["affine_step"](u, y, table, step, out, eps, seed)
    return out
