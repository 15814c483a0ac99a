"""HSM loss, forward (per-sample sums) and backward (d loss / d out), with eps_v regenerated in-kernel.

Per sample b: loss_b = w_b * sum_d (out + c_b v - eps_v)^2 with coef (B, 2) = (c, w) (LOSS_COLS).
eps_v is the ``eps_v`` tensor when given, else z1 of the perturb call's draw (same seed, step 0,
tag 0, same element index b * D + d), recomputed from the seed read in-kernel: it is never stored.

Reduction (forward): deterministic, no atomics. A program owns a tile of BLOCK_B samples and one
contiguous chunk of D (``iters`` column blocks of BLOCK_D), accumulates (out + c v - eps_v)^2
elementwise in a (BLOCK_B, BLOCK_D) fp32 (fp64 for fp64 inputs) register tile in a fixed order,
reduces it with ``tl.sum`` (a fixed tree) and writes w_b * partial into a (B, chunks) buffer.
The chunk count is chosen on the host from (B, D, SM count) only: enough programs to fill the GPU
(about 4 per SM) but never more than one per column block. When one chunk suffices (large B, or
small D, or the interpreter) the kernel writes the final (B,) loss itself: one launch; otherwise a
single ``partials.sum(1)`` over a tiny (B, chunks) buffer follows (two launches). A one-program-
per-sample loop would leave most SMs idle for the small batches of large images (B = 8 at
256x256x3), and a 2-D grid with atomics would not be bit-reproducible; this covers both ends.

Backward: one elementwise pass, d out = 2 w_b grad_b (out + c_b v - eps_v), in out's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (as_bd, elementwise_config, launcher, next_pow2, sm_count, tile_coords,
                      tile_grid, to_compute, GPU_MAX_BLOCK_D, GPU_TILE, GPU_TILE_PHILOX, INTERP_MAX_BLOCK_D,
                      INTERP_TILE, GPU_NUM_WARPS)
from .philox import TAG_PERTURB, load_key, normal_z1

PROGRAMS_PER_SM = 4


@triton.jit
def _hsm_loss_fwd_kernel(
    out_ptr, u_ptr, coef_ptr, eps_ptr, seed_ptr, part_ptr,
    B, D, iters, chunks,
    s_ob, s_od, s_ub, s_us, s_ud, s_cb, s_ck, s_eb, s_ed, s_pb, s_pc,
    HAS_EPS: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tb = pid // chunks
    chunk = pid - tb * chunks
    rows = (tb * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    rmask = rows < B
    c = to_compute(tl.load(coef_ptr + rows * s_cb, mask=rmask, other=0.0), F64)
    if not HAS_EPS:
        k0, k1 = load_key(seed_ptr)
    if F64:
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    col0 = chunk * iters * BLOCK_D
    for it in range(0, iters):
        cols = (col0 + it * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64))[None, :]
        mask = rmask & (cols < D)
        o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
        v = to_compute(tl.load(u_ptr + rows * s_ub + s_us + cols * s_ud, mask=mask, other=0.0), F64)
        if HAS_EPS:
            e = to_compute(tl.load(eps_ptr + rows * s_eb + cols * s_ed, mask=mask, other=0.0), F64)
        else:
            e = to_compute(normal_z1(rows * D + cols, k0, k1, 0, TAG_PERTURB), F64)
        r = o + c * v - e
        acc += tl.where(mask, r * r, 0.0)
    w = to_compute(tl.load(coef_ptr + rows * s_cb + s_ck, mask=rmask, other=0.0), F64)
    total = tl.sum(acc, axis=1)[:, None]
    tl.store(part_ptr + rows * s_pb + chunk * s_pc, w * total, mask=rmask)


@triton.jit
def _hsm_loss_bwd_kernel(
    grad_ptr, out_ptr, u_ptr, coef_ptr, eps_ptr, seed_ptr, dout_ptr,
    B, D, n_col_tiles,
    s_g, s_ob, s_od, s_ub, s_us, s_ud, s_cb, s_ck, s_eb, s_ed, s_db, s_dd,
    HAS_EPS: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    rmask = rows < B
    c = to_compute(tl.load(coef_ptr + rows * s_cb, mask=rmask, other=0.0), F64)
    w = to_compute(tl.load(coef_ptr + rows * s_cb + s_ck, mask=rmask, other=0.0), F64)
    g = to_compute(tl.load(grad_ptr + rows * s_g, mask=rmask, other=0.0), F64)
    o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(u_ptr + rows * s_ub + s_us + cols * s_ud, mask=mask, other=0.0), F64)
    if HAS_EPS:
        e = to_compute(tl.load(eps_ptr + rows * s_eb + cols * s_ed, mask=mask, other=0.0), F64)
    else:
        k0, k1 = load_key(seed_ptr)
        e = to_compute(normal_z1(rows * D + cols, k0, k1, 0, TAG_PERTURB), F64)
    r = o + c * v - e
    d = (2.0 * (w * g)) * r
    tl.store(dout_ptr + rows * s_db + cols * s_dd, d.to(dout_ptr.dtype.element_ty), mask=mask)


def _check(out, u):
    if u.dim() != 3 or u.shape[1] != 2:
        raise ValueError(f"triton backend: u must be (B, 2, D), got {tuple(u.shape)}")
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton backend: u must be float32 or float64, got {u.dtype}")
    if out.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"triton backend: out must be a float tensor, got {out.dtype}")
    B, _, D = u.shape
    return B, D, as_bd(out, B, D, "out")


def acc_dtype(out, u):
    return torch.float64 if (out.dtype == torch.float64 or u.dtype == torch.float64) else torch.float32


def loss_config(B: int, D: int, device: torch.device, block_b=None, block_d=None, chunks=None, philox=False):
    """(BLOCK_B, BLOCK_D, iters, chunks, num_warps) of the forward reduction (see module doc)."""
    if device.type == "cuda":
        tile = GPU_TILE_PHILOX if philox else GPU_TILE
        max_bd, warps = GPU_MAX_BLOCK_D, GPU_NUM_WARPS
    else:
        tile, max_bd, warps = INTERP_TILE, INTERP_MAX_BLOCK_D, 1
    bd = block_d or min(next_pow2(D), max_bd)
    bb = block_b or max(1, min(next_pow2(B), tile // bd))
    n_col = triton.cdiv(D, bd)
    row_tiles = triton.cdiv(B, bb)
    if chunks is None:
        target = PROGRAMS_PER_SM * sm_count(device) if device.type == "cuda" else 1
        chunks = min(n_col, max(1, triton.cdiv(target, row_tiles)))
    chunks = max(1, min(int(chunks), n_col))
    iters = triton.cdiv(n_col, chunks)
    chunks = triton.cdiv(n_col, iters)
    return int(bb), int(bd), int(iters), int(chunks), warps


def hsm_loss_fwd(out, u, coef, eps_v=None, seed=None, block_b=None, block_d=None, chunks=None):
    """Per-sample loss (B,) in float32 (float64 for float64 inputs)."""
    B, D, out = _check(out, u)
    acc = acc_dtype(out, u)
    if B == 0:
        return torch.zeros(0, dtype=acc, device=u.device)
    if D == 0:
        return torch.zeros(B, dtype=acc, device=u.device)
    if eps_v is not None:
        eps_v = as_bd(eps_v, B, D, "eps_v")
    elif seed is None:
        raise ValueError("triton backend: hsm_loss needs eps_v or seed")
    bb, bd, iters, nch, warps = loss_config(B, D, u.device, block_b, block_d, chunks, philox=eps_v is None)
    part = torch.empty(B, nch, dtype=acc, device=u.device)
    eps_ = eps_v if eps_v is not None else out
    es = eps_v.stride() if eps_v is not None else (0, 0)
    grid = (triton.cdiv(B, bb) * nch,)
    launcher(_hsm_loss_fwd_kernel)[grid](
        out, u, coef, eps_, seed if seed is not None else coef, part,
        B, D, iters, nch,
        out.stride(0), out.stride(1), u.stride(0), u.stride(1), u.stride(2), coef.stride(0), coef.stride(1),
        es[0], es[1], part.stride(0), part.stride(1),
        HAS_EPS=eps_v is not None, F64=acc == torch.float64, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    if nch == 1:
        return part.view(B)
    return part.sum(dim=1)


def hsm_loss_bwd(grad, out, u, coef, eps_v=None, seed=None, block_b=None, block_d=None):
    """d loss / d out = 2 w grad (out + c v - eps_v): (B, D) in out's dtype, one launch."""
    B, D, out = _check(out, u)
    dout = torch.empty(B, D, dtype=out.dtype, device=out.device)
    if B * D == 0:
        return dout
    if eps_v is not None:
        eps_v = as_bd(eps_v, B, D, "eps_v")
    elif seed is None:
        raise ValueError("triton backend: hsm_loss needs eps_v or seed")
    grad = grad.reshape(B) if grad.dim() != 1 else grad
    acc = acc_dtype(out, u)
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=eps_v is None)
    n_col, grid = tile_grid(B, D, bb, bd)
    eps_ = eps_v if eps_v is not None else out
    es = eps_v.stride() if eps_v is not None else (0, 0)
    launcher(_hsm_loss_bwd_kernel)[grid](
        grad, out, u, coef, eps_, seed if seed is not None else coef, dout,
        B, D, n_col,
        grad.stride(0), out.stride(0), out.stride(1), u.stride(0), u.stride(1), u.stride(2),
        coef.stride(0), coef.stride(1), es[0], es[1], dout.stride(0), dout.stride(1),
        HAS_EPS=eps_v is not None, F64=acc == torch.float64, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return dout
