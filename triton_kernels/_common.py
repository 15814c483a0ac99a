"""Shared pieces of the Triton kernels: tile indexing, dtype helpers, launch configuration, launching.

Every op is elementwise over the (B, D) view of x (the velocity v and the outputs have the same
shape), with per-sample (or per-step) scalar coefficients. A program handles one 2-D tile of
BLOCK_B samples x BLOCK_D elements, so the coefficients are computed once per program as a
(BLOCK_B, 1) vector and no integer division happens per element; tiles are numbered on grid axis 0
(limit 2^31 - 1 programs) with the D-tiles of a row block adjacent, so neighbouring programs touch
neighbouring memory. All index arithmetic is int64 (program id, rows, columns, element offsets and
the Philox element index b * D + d), so B * 2 * D above 2^31 is safe; the kernels are bandwidth
bound, so the few extra integer instructions per element cost nothing measurable.

Every tensor is read through its strides (views of the network's (B, 2C, ...) buffer, expanded or
sliced tensors: no copies). Block sizes are fixed, not autotuned: autotuning would re-run in-place
kernels while benchmarking (corrupting ``u`` unless every config restores it), cannot run inside
CUDA-graph capture on its first call, and is slow under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
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

# GPU tiles (fixed; registers and spills of every variant: bench/aot_compile.py). A tile of 2048
# elements on 8 warps is 8 elements per thread (two 16-byte vectors per float32 stream), enough
# bytes in flight per SM to saturate HBM; kernels that draw Philox noise use 1024 (4 per thread) to
# stay clear of spills. The per-program work (tile decode, the float64 coefficients, the Philox key)
# is amortised over >= 1024 elements. BLOCK_D is capped at 1024 so a D that is a multiple of 1024
# (CIFAR: 3072, 64x64x3: 12288) has no partial column tiles.
# Small D (2-D toy data) would put many rows in one tile; each thread then evaluates the float64
# coefficients of every row it holds, which took 150-175 registers at 1024 x 2 (loss kernels), so
# BLOCK_B is capped at one row per thread (GPU_MAX_BLOCK_B = 32 * GPU_NUM_WARPS).
GPU_TILE = 2048
GPU_TILE_PHILOX = 1024
GPU_MAX_BLOCK_D = 1024
GPU_NUM_WARPS = 8
GPU_MAX_BLOCK_B = 32 * GPU_NUM_WARPS
# The interpreter runs a program as numpy ops on whole tiles; its cost is per program, so big tiles.
INTERP_TILE = 32768
INTERP_MAX_BLOCK_D = 8192

NAN = tl.constexpr(float("nan"))


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


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` on ``grid`` (the one launch site of every op; bench/aot_compile.py hooks it)."""
    launcher(kernel)[grid](*args, **kwargs)


def device_guard(device: torch.device):
    """A context that makes ``device`` current for the launch when it is a CUDA device (Triton launches
    on the current device, not the tensors'); a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def gpu_tiles(device: torch.device) -> bool:
    """GPU tile sizes for anything but CPU tensors (CUDA, and meta tensors of the AOT compile check)."""
    return torch.device(device).type != "cpu"


def elementwise_config(B: int, D: int, device: torch.device, block_b=None, block_d=None, philox=False):
    """(BLOCK_B, BLOCK_D, num_warps) of the 2-D tile; ``block_b``/``block_d`` override (tests).

    ``philox``: the kernel draws its noise in-kernel (smaller tile, see GPU_TILE_PHILOX).
    """
    tile, max_bb, max_bd, warps = tile_limits(device, philox)
    bd = block_d or min(next_pow2(D), max_bd)
    bb = block_b or max(1, min(next_pow2(B), tile // bd, max_bb))
    return int(bb), int(bd), warps


def tile_limits(device: torch.device, philox: bool):
    """(elements per tile, max BLOCK_B, max BLOCK_D, num_warps) for ``device`` (GPU or interpreter)."""
    if gpu_tiles(device):
        return (GPU_TILE_PHILOX if philox else GPU_TILE), GPU_MAX_BLOCK_B, GPU_MAX_BLOCK_D, GPU_NUM_WARPS
    return INTERP_TILE, INTERP_TILE, INTERP_MAX_BLOCK_D, 1


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
    """Cast to the compute dtype: float64 when F64 else float32 (16-bit floats go through float32)."""
    if x.dtype.primitive_bitwidth == 16:
        x = x.to(tl.float32)
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def load_net(y_ptr, yu_ptr, rows, cols, mask, s_yb, s_yd, s_gb, s_gd, w_hi, w_lo, GUIDED: tl.constexpr,
             F64: tl.constexpr):
    """The network output a step reads, in the compute dtype: y, or when GUIDED the classifier-free
    combination y + w (y - y_uncond) (``cld_fast.opdefs.guided_output``). The weight arrives as two
    float32 scalars (Triton passes a Python float as float32): w = w_hi in float32, w_hi + w_lo in float64."""
    y = to_compute(tl.load(y_ptr + rows * s_yb + cols * s_yd, mask=mask, other=0.0), F64)
    if GUIDED:
        yu = to_compute(tl.load(yu_ptr + rows * s_gb + cols * s_gd, mask=mask, other=0.0), F64)
        if F64:
            w = tl.zeros_like(y) + w_hi  # float64 from here on (a float32 scalar promotes exactly)
            w = w + w_lo
            y = y + w * (y - yu)
        else:
            y = y + w_hi * (y - yu)
    return y


def guide_args(y_uncond, guide_weight, y, shape):
    """(pointer, strides, w_hi, w_lo, GUIDED) of a step launcher's guidance pair; y stands in for an absent
    y_uncond (never read). y_uncond must have y's shape ``shape`` and dtype."""
    if y_uncond is None:
        return y, (0, 0), 0.0, 0.0, False
    check_shape(y_uncond, shape, "y_uncond")
    if y_uncond.dtype != y.dtype:
        raise ValueError(f"triton backend: y_uncond must have y's dtype {y.dtype}, got {y_uncond.dtype}")
    w_hi = float(torch.tensor(guide_weight, dtype=torch.float32))
    w_lo = float(torch.tensor(guide_weight - w_hi, dtype=torch.float32))
    return y_uncond, y_uncond.stride(), w_hi, w_lo, True


@triton.jit
def store(ptr, x, mask):
    """Store ``x`` cast to ``ptr``'s element type; a float64 value bound for a 16-bit float goes
    through float32 first (a direct f64 -> bf16 cast is wrong under the interpreter)."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        x = x.to(tl.float32)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rows(ptr, rows, stride, rmask, other):
    """A per-row value (e.g. t) as a float64 (BLOCK_B, 1) vector; masked rows read ``other``."""
    return tl.load(ptr + rows * stride, mask=rmask, other=other).to(tl.float64)


# ---- host-side checks (shapes and dtypes only: no host synchronisation) ---------------------------

STATE_DTYPES = (torch.float32, torch.float64)
NET_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_state(u: torch.Tensor, name: str):
    """(B, D) of a (B, 2, D) float32/float64 state tensor."""
    if u.dtype not in STATE_DTYPES:
        raise TypeError(f"triton backend: {name} must be float32 or float64, got {u.dtype}")
    if u.dim() != 3 or u.shape[1] != 2:
        raise ValueError(f"triton backend: {name} must be (B, 2, D), got {tuple(u.shape)}")
    return u.shape[0], u.shape[2]


def check_shape(x: torch.Tensor, shape, name: str, dtypes=NET_DTYPES):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"triton backend: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"triton backend: {name} has unsupported dtype {x.dtype}")


def check_sde(sde: torch.Tensor):
    if sde.dtype != torch.float64 or tuple(sde.shape) != (5,):
        raise ValueError(f"triton backend: sde must be a (5,) float64 tensor, got {tuple(sde.shape)} {sde.dtype}")


def check_times(t: torch.Tensor, n: int, name: str = "t"):
    if t.dtype not in STATE_DTYPES or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"triton backend: {name} must be a ({n},) float32/float64 tensor, "
                         f"got {tuple(t.shape)} {t.dtype}")


def check_index(x: torch.Tensor, name: str):
    if x.dtype != torch.int64 or x.numel() != 1:
        raise ValueError(f"triton backend: {name} must be a one-element int64 tensor, got {tuple(x.shape)} {x.dtype}")
