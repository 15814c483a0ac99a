"""Shared pieces of the Triton kernels: the 64-bit tile index helper and the launch configuration.

Every op is elementwise over the (B, D) view of x (the velocity v and the outputs have the same
shape), with per-sample (or per-step) scalar coefficients. A program handles one 2-D tile of
BLOCK_B samples x BLOCK_D elements, so the coefficients are loaded once per program as a
(BLOCK_B, 1) vector and no integer division happens per element; tiles are numbered on grid axis 0
(limit 2^31 - 1 programs) with the D-tiles of a row block adjacent, so neighbouring programs touch
neighbouring memory. All index arithmetic is int64 (program id, rows, columns, element offsets and
the Philox element index b * D + d), so B * 2 * D above 2^31 is safe; the kernels are bandwidth
bound, so the few extra integer instructions per element cost nothing measurable.

Block sizes are fixed, not autotuned (see ``elementwise_config``): autotuning would re-run
in-place kernels while benchmarking (corrupting ``u`` unless every config restores it), cannot run
inside CUDA-graph capture on its first call, and is slow under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # torch >= 2.6 (``capture_triton`` is its older name)
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.library import capture_triton as _wrap_triton
    except ImportError:
        _wrap_triton = None

# GPU tiles (fixed; register counts from ptxas -v for sm_90 of the Triton 3.9 PTX):
#  * no in-kernel noise: 2048 elements per program, 8 warps = 8 elements per thread (two 16-byte
#    vectors per stream): 64 registers for the affine step, 103 for the SSCS step with eps
#    tensors, so >= 50 % occupancy and tens of KB in flight per SM - enough to saturate HBM;
#  * Philox noise in-kernel: 1024 elements, 8 warps = 4 elements per thread: 93 registers for the
#    seeded SSCS step (4 normals per element), 72 for perturb, no spills. At 16 elements per
#    thread the seeded SSCS kernel hits 255 registers and spills; at 8 it needs 148.
# The per-program scalar work (tile decode, coefficient or table-row loads, the Philox key) is
# amortised over >= 1024 elements. BLOCK_D is capped at 1024 so a D that is a multiple of 1024
# (CIFAR: 3072, 64x64x3: 12288) has no partial column tiles.
GPU_TILE = 2048
GPU_TILE_PHILOX = 1024
GPU_MAX_BLOCK_D = 1024
GPU_NUM_WARPS = 8
# The interpreter runs a program as numpy ops on whole tiles; its cost is per program, so big tiles.
INTERP_TILE = 32768
INTERP_MAX_BLOCK_D = 8192


def interpreting() -> bool:
    """Whether Triton kernels defined now run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernel_is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit object) was created in interpreter mode."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def launcher(kernel):
    """``kernel`` wrapped with ``torch.library.wrap_triton`` where that exists, so a launch inside a
    ``torch.library.triton_op`` body is traceable by torch.compile; the raw kernel otherwise."""
    if _wrap_triton is None or kernel_is_interpreted(kernel):
        return kernel
    return _wrap_triton(kernel)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def elementwise_config(B: int, D: int, device: torch.device, block_b=None, block_d=None, philox=False):
    """(BLOCK_B, BLOCK_D, num_warps) of the 2-D tile; ``block_b``/``block_d`` override (tests).

    ``philox``: the kernel draws its noise in-kernel (smaller tile, see GPU_TILE_PHILOX).
    """
    if device.type == "cuda":
        tile = GPU_TILE_PHILOX if philox else GPU_TILE
        max_bd, warps = GPU_MAX_BLOCK_D, GPU_NUM_WARPS
    else:
        tile, max_bd, warps = INTERP_TILE, INTERP_MAX_BLOCK_D, 1
    bd = block_d or min(next_pow2(D), max_bd)
    bb = block_b or max(1, min(next_pow2(B), tile // bd))
    return int(bb), int(bd), warps


def tile_grid(B: int, D: int, block_b: int, block_d: int):
    """(number of D-tiles per row block, grid) for the flat tile numbering of ``tile_coords``."""
    n_col = triton.cdiv(D, block_d)
    return n_col, (n_col * triton.cdiv(B, block_b),)


@triton.jit
def tile_coords(pid, n_col_tiles, B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows (BLOCK_B, 1), columns (1, BLOCK_D), both int64, and the in-bounds mask of tile ``pid``.

    Tile ``pid`` covers rows (pid // n_col_tiles) * BLOCK_B + [0, BLOCK_B) and columns
    (pid % n_col_tiles) * BLOCK_D + [0, BLOCK_D). Everything is int64 from the program id on.
    """
    pid = pid.to(tl.int64)
    tb = pid // n_col_tiles
    td = pid - tb * n_col_tiles
    rows = tb * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = td * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    rows2 = rows[:, None]
    cols2 = cols[None, :]
    mask = (rows2 < B) & (cols2 < D)
    return rows2, cols2, mask


@triton.jit
def to_compute(x, F64: tl.constexpr):
    """Cast to the compute dtype: float64 when F64 else float32."""
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


def check_float_state(t: torch.Tensor, name: str):
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton backend: {name} must be float32 or float64, got {t.dtype}")


def as_bd(t: torch.Tensor, B: int, D: int, name: str) -> torch.Tensor:
    """``t`` as a (B, D) tensor (a view where possible); raises on a size mismatch."""
    if t.dim() == 2 and t.shape[0] == B and t.shape[1] == D:
        return t
    if t.numel() != B * D or (t.dim() >= 1 and t.shape[0] != B):
        raise ValueError(f"triton backend: {name} has shape {tuple(t.shape)}, expected ({B}, {D})")
    return t.reshape(B, D)


def as_bkd(t: torch.Tensor, B: int, K: int, D: int, name: str) -> torch.Tensor:
    """``t`` as a (B, K, D) tensor (a view where possible); raises on a size mismatch."""
    if t.dim() == 3 and tuple(t.shape) == (B, K, D):
        return t
    if t.numel() != B * K * D or (t.dim() >= 1 and t.shape[0] != B):
        raise ValueError(f"triton backend: {name} has shape {tuple(t.shape)}, expected ({B}, {K}, {D})")
    return t.reshape(B, K, D)
