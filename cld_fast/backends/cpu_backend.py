"""The ``cpu`` backend: the C++ kernels of ``cld_fast._C`` (csrc/cpu), one fused OpenMP pass per op.

The ops are ``torch.ops.cld_fast.<name>`` with the schemas of ``cld_fast.opdefs`` (defined from
Python; the extension registers only implementations, for the CPU and, where built, CUDA dispatch
keys). Inputs may have any layout: the kernels make them contiguous and update a non-contiguous
in-place target through a contiguous copy. Noise comes as explicit ``eps`` tensors, or in seed
mode is drawn in C++ by the Philox contract of ``cld_fast.philox``.
"""
from __future__ import annotations

import torch

from .. import opdefs
from .._extension import compiled_parts, load_extension

NAME = "cpu"
# Drawing eps_v (Philox + Box-Muller) costs more than the bytes of a saved gradient: the loss's
# forward also writes d loss / d out (``hsm_loss_fwd_grad``) and its backward only scales it.
LOSS_GRAD_IN_FORWARD = True
# perturb checks x0 and eps for NaN / inf in the pass that reads them (``nonfinite_perturb_inputs``)
# instead of a second pass over the inputs before the call.
PERTURB_CHECKS_FINITE = True


def nonfinite_perturb_inputs() -> int:
    """Bits of the inputs of this thread's last ``perturb`` call that held NaN or inf (1: x0, 2: eps).

    Reading clears them. Set by every call, value checks on or off."""
    ext, why = load_extension()
    if ext is None:
        raise RuntimeError(f"the compiled extension cld_fast._C is not importable ({why})")
    return int(ext._take_nonfinite_inputs())


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


def compiled_op(name: str, backend: str, why: str):
    """``torch.ops.cld_fast.<name>`` with the compiled kernels loaded; raises if they can't run."""
    if name not in opdefs.OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {sorted(opdefs.OPS)}")
    if why:
        raise RuntimeError(f"backend {backend!r} can't run here: {why}")
    opdefs.define_library()
    return getattr(torch.ops.cld_fast, name)


def op(name: str):
    """The kernel of op ``name``, taking the ``cld_fast.opdefs`` schema arguments positionally."""
    return compiled_op(name, NAME, why_unavailable())
