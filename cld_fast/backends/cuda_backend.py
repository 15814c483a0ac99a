"""The ``cuda`` backend: the hand-written CUDA kernels of ``cld_fast._C`` (csrc/cuda), float32 state.

Same contract as ``torch_backend``. The ops are the same ``torch.ops.cld_fast.*`` as the ``cpu``
backend's (the dispatcher picks the CUDA kernels for CUDA tensors), so the op wrappers are shared
with ``cpu_backend``; only availability and the supported device / dtype differ. Network outputs
(``out`` of the loss and the mixed score, ``y`` of the sampler steps) may be float32, bfloat16 or
float16; seeds and step indices are (1,) int64 CUDA tensors read by the kernels on the device.
"""
from __future__ import annotations

import torch

from .._extension import compiled_parts, load_extension
from .cpu_backend import (  # noqa: F401  (the backend contract)
    affine_step,
    half_step_,
    hsm_loss_bwd,
    hsm_loss_fwd,
    mixed_score,
    perturb,
    sscs_step_,
)

NAME = "cuda"


def is_available() -> bool:
    return torch.cuda.is_available() and "cuda" in compiled_parts()


def why_unavailable() -> str:
    ext, why = load_extension()
    if ext is None:
        return f"the compiled extension cld_fast._C is not importable ({why})"
    if "cuda" not in compiled_parts():
        return "cld_fast._C was built without the CUDA kernels (no CUDA toolkit or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cuda" and dtype == torch.float32
