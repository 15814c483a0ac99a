"""The ``cpu`` backend: the C++ kernels of ``cld_fast._C`` (csrc/cpu), one fused OpenMP pass per op.

Same contract as ``torch_backend``. The kernels are ``torch.ops.cld_fast.*`` (registered by
``csrc/bindings.cpp`` for the CPU and, where built, CUDA dispatch keys), so this module and
``cuda_backend`` differ only in the device they accept. Noise comes in as ``eps`` tensors drawn from a
``torch.Generator``, or in seed mode is drawn in C++ by the same Philox contract as Triton and CUDA.
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
    return "cld_fast._C was built without the CPU kernels"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)


def _c(t):
    return t.contiguous() if t is not None else None


def _ops():
    load_extension()
    return torch.ops.cld_fast


def perturb(x0, coef, out, eps=None, seed=None, v0=None):
    _ops().perturb(_c(x0), _c(v0), _c(coef.to(out.dtype)), _c(eps), seed, out)
    return out


def hsm_loss_fwd(out, u, coef, eps_v=None, seed=None):
    return _ops().hsm_loss_fwd(_c(out), _c(u), _c(coef.to(torch.float32 if u.dtype == torch.float32 else u.dtype)), _c(eps_v), seed)


def hsm_loss_bwd(grad, out, u, coef, eps_v=None, seed=None):
    return _ops().hsm_loss_bwd(_c(grad), _c(out), _c(u), _c(coef.to(torch.float32 if u.dtype == torch.float32 else u.dtype)), _c(eps_v), seed)


def mixed_score(out, u, coef):
    return _ops().mixed_score(_c(out), _c(u), _c(coef.to(u.dtype)))


def half_step_(u, table, step, eps=None, seed=None):
    _ops().half_step_(u, _c(table.to(u.dtype)), step, _c(eps), seed)
    return u


def sscs_step_(u, y, table, step, eps=None, seed=None):
    _ops().sscs_step_(u, _c(y), _c(table.to(u.dtype)), step, _c(eps), seed)
    return u


def affine_step(u, y, table, step, out, eps=None, seed=None):
    _ops().affine_step(_c(u), _c(y), _c(table.to(out.dtype)), step, _c(eps), seed, out)
    return out
