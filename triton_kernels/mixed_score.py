"""Score from a network output: score = c0(t) v + c1(t) out (opdefs "mixed_score").

(c0, c1) of ``CLD.score_coefficients(t, objective, output)`` are computed per row in-kernel
(``coefficients.score_coefficients``); the default codes give the mixed score -v / s_vv - out / l22.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_sde, check_shape, check_state, check_times, device_guard, elementwise_config, launch,
                      load_rows, store, tile_coords, tile_grid, to_compute)
from .coefficients import OBJECTIVE_CODES, OUTPUT_CODES, load_sde, score_coefficients


@triton.jit
def _mixed_score_kernel(
    out_ptr, u_ptr, t_ptr, sde_ptr, score_ptr,
    B, D, n_col_tiles,
    s_ob, s_od, s_ub, s_us, s_ud, s_t, s_sde, s_sb, s_sd,
    OBJECTIVE: tl.constexpr, OUTPUT: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    t = load_rows(t_ptr, rows, s_t, rows < B, 1.0)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    c0, c1 = score_coefficients(t, beta0, beta1, m_inv, gamma, neps, OBJECTIVE, OUTPUT)
    v = to_compute(tl.load(u_ptr + rows * s_ub + s_us + cols * s_ud, mask=mask, other=0.0), F64)
    o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
    s = to_compute(c0, F64) * v + to_compute(c1, F64) * o
    store(score_ptr + rows * s_sb + cols * s_sd, s, mask)


def mixed_score(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: torch.Tensor, objective: int = 0,
                output: int = 0, block_b=None, block_d=None) -> torch.Tensor:
    """score (B, D) in u's dtype, one launch.

    Args:
        out: (B, D) network output (float32/float64/bf16/fp16); u: (B, 2, D) state, float32/float64.
        t: (B,) times (float32/float64, any stride); sde: (5,) float64 parameters.
        objective, output: codes of ``cld_fast.sde.OBJECTIVE_CODES`` / ``OUTPUT_CODES``.
    """
    B, D = check_state(u, "u")
    check_shape(out, (B, D), "out")
    check_times(t, B)
    check_sde(sde)
    for name, code, codes in (("objective", objective, OBJECTIVE_CODES), ("output", output, OUTPUT_CODES)):
        if code not in codes.values():
            raise ValueError(f"triton backend: {name} must be one of {codes}, got {code}")
    score = torch.empty(B, D, dtype=u.dtype, device=u.device)
    if B * D == 0:
        return score
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d)
    n_col, grid = tile_grid(B, D, bb, bd)
    with device_guard(u.device):
        launch(_mixed_score_kernel, grid,
               out, u, t, sde, score,
               B, D, n_col,
               out.stride(0), out.stride(1), u.stride(0), u.stride(1), u.stride(2), t.stride(0), sde.stride(0),
               score.stride(0), score.stride(1),
               OBJECTIVE=int(objective), OUTPUT=int(output), F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
               num_warps=warps)
    return score


def aot_variants(B: int, D: int, empty):
    """(label, thunk) for every compiled variant of ``mixed_score`` at (B, D) (bench/aot_compile.py);
    the objective / output modes beyond the default only with the float32 state."""
    sde, t = empty(5, dtype=torch.float64), empty(B)
    for sd in (torch.float32, torch.float64):
        u = empty(B, 2, D, dtype=sd)
        for out_dtype in (sd, torch.bfloat16):
            out = empty(B, D, dtype=out_dtype)
            modes = [(obj, outp) for obj in (0, 1) for outp in (0, 1, 2)] if sd == torch.float32 else [(0, 0)]
            for obj, outp in modes:
                label = f"mixed_score {str(sd)[6:]} out={str(out_dtype)[6:]} obj={obj} output={outp}"
                yield label, lambda o=out, u=u, ob=obj, op=outp: mixed_score(o, u, t, sde, ob, op)
