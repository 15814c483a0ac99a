"""The ``cuda`` backend: the hand-written CUDA kernels of ``cld_fast._C`` (csrc/cuda), float32 state.

The ops are the same ``torch.ops.cld_fast.<name>`` as the ``cpu`` backend's (the dispatcher picks
the CUDA kernels for CUDA tensors); only availability and the supported device / dtype differ.
Network outputs (``out``, ``y``) may be float32, bfloat16 or float16; ``t``, ``ts``, ``step``,
``sde`` and ``seed`` are read by the kernels on the device (no host synchronisation), and an
out-of-range ``step`` gives NaN outputs instead of an error.
"""
from __future__ import annotations

import torch

from .. import build_info
from .._extension import compiled_parts, load_extension
from .cpu_backend import compiled_op

NAME = "cuda"


def is_available() -> bool:
    return torch.cuda.is_available() and "cuda" in compiled_parts()


def why_unavailable() -> str:
    """'' when the backend can run; else why not, quoting the build report when the CUDA build failed."""
    ext, why = load_extension()
    failed = build_info.cuda_failure_message()  # '' unless cld_fast/_build_info.json records a failed CUDA build
    if ext is None:
        return f"the compiled extension cld_fast._C is not importable ({why})" + (f"; {failed}" if failed else "")
    if "cuda" not in compiled_parts():
        if failed:
            return f"cld_fast._C was built without the CUDA kernels: {failed}"
        return "cld_fast._C was built without the CUDA kernels (no CUDA toolkit or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False" + (f"; {failed}" if failed else "")
    return ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cuda" and dtype == torch.float32


def op(name: str):
    """The kernel of op ``name``, taking the ``cld_fast.opdefs`` schema arguments positionally."""
    return compiled_op(name, NAME, why_unavailable())
