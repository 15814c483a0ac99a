"""Mixed score: score = c0 v + c1 out, with coef (B, 2) = (-1/s_vv, -1/l22) (MIXED_COLS)."""
from __future__ import annotations

import torch
import triton.language as tl
import triton

from ._common import as_bd, elementwise_config, launcher, tile_coords, tile_grid, to_compute


@triton.jit
def _mixed_score_kernel(
    out_ptr, u_ptr, coef_ptr, score_ptr,
    B, D, n_col_tiles,
    s_ob, s_od, s_ub, s_us, s_ud, s_cb, s_ck, s_sb, s_sd,
    F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    rmask = rows < B
    c0 = to_compute(tl.load(coef_ptr + rows * s_cb, mask=rmask, other=0.0), F64)
    c1 = to_compute(tl.load(coef_ptr + rows * s_cb + s_ck, mask=rmask, other=0.0), F64)
    v = to_compute(tl.load(u_ptr + rows * s_ub + s_us + cols * s_ud, mask=mask, other=0.0), F64)
    o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
    s = c0 * v + c1 * o
    tl.store(score_ptr + rows * s_sb + cols * s_sd, s.to(score_ptr.dtype.element_ty), mask=mask)


def mixed_score(out, u, coef, block_b=None, block_d=None):
    """score (B, D) in u's dtype, one launch."""
    if u.dim() != 3 or u.shape[1] != 2:
        raise ValueError(f"triton backend: u must be (B, 2, D), got {tuple(u.shape)}")
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton backend: u must be float32 or float64, got {u.dtype}")
    B, _, D = u.shape
    score = torch.empty(B, D, dtype=u.dtype, device=u.device)
    if B * D == 0:
        return score
    out = as_bd(out, B, D, "out")
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d)
    n_col, grid = tile_grid(B, D, bb, bd)
    launcher(_mixed_score_kernel)[grid](
        out, u, coef, score,
        B, D, n_col,
        out.stride(0), out.stride(1), u.stride(0), u.stride(1), u.stride(2),
        coef.stride(0), coef.stride(1), score.stride(0), score.stride(1),
        F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return score
