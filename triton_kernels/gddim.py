"""The exponential-integrator multistep (gDDIM) step: one elementwise launch per network evaluation.

Row r = table[step] of ``cld_fast.sde.cld_fast.samplers.gddim.gddim_table`` (float64, computed once per sampling call),
``step`` a (1,) int64 device tensor read in-kernel (no host synchronisation):

    cur = E (x, v, y)                       2 numbers per element (eps_R, or (x0_hat, 0)); float64 arithmetic
    u   <- Lin u + C_0 cur + sum_{j=1..K} C_j hist[(step - j) mod K]
    hist[step mod K] <- cur                 (the first H of its 2 numbers; K = order - 1)

A step outside the table reads row 0 instead and writes NaN (the same guard as the other step
kernels). Schema: ``cld_fast.opdefs`` "gddim_step_".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_index, check_shape, check_state, device_guard, elementwise_config, launch, store,
                      tile_coords, tile_grid, to_compute)

GDDIM_COLS = 22  # cld_fast.sde.GDDIM_COLS (tests/test_coefficients.py checks they agree)


@triton.jit
def _coef(row_ptr, s_tc, c: tl.constexpr, bad, F64: tl.constexpr):
    """Column c of the step's row as a compute-dtype scalar (NaN when the step is out of range)."""
    value = tl.load(row_ptr + c * s_tc).to(tl.float64)
    keep = tl.where(bad, 0.0, 1.0).to(tl.float64)  # x / 0 * 0 is NaN: no NaN constant (NaN != NaN breaks
    return to_compute(value / keep * keep, F64)     # Triton's check that nested kernels see the same globals)


@triton.jit
def _history(h_ptr, slot, rows, cols, s_hk, s_hb, s_hc, s_hd, mask, F64: tl.constexpr, CHANNELS: tl.constexpr):
    """(hx, hv) of ring slot ``slot``; hv is 0 when the ring keeps one channel."""
    hp = h_ptr + slot * s_hk + rows * s_hb + cols * s_hd
    hx = to_compute(tl.load(hp, mask=mask, other=0.0), F64)
    if CHANNELS == 2:
        hv = to_compute(tl.load(hp + s_hc, mask=mask, other=0.0), F64)
    else:
        hv = hx * 0.0
    return hx, hv


@triton.jit
def _gddim_step_kernel(
    u_ptr, h_ptr, y_ptr, table_ptr, step_ptr,
    B, D, n_col_tiles, n_rows,
    s_ub, s_us, s_ud, s_hk, s_hb, s_hc, s_hd, s_yb, s_yd, s_tr, s_tc,
    K: tl.constexpr, CHANNELS: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step = tl.load(step_ptr).to(tl.int64)
    bad = (step < 0) | (step >= n_rows)
    row_ptr = table_ptr + tl.where(bad, 0, step) * s_tr
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    y = to_compute(tl.load(y_ptr + rows * s_yb + cols * s_yd, mask=mask, other=0.0), F64)
    cx = _coef(row_ptr, s_tc, 0, bad, F64) * x + _coef(row_ptr, s_tc, 1, bad, F64) * v \
        + _coef(row_ptr, s_tc, 2, bad, F64) * y
    cv = _coef(row_ptr, s_tc, 3, bad, F64) * x + _coef(row_ptr, s_tc, 4, bad, F64) * v \
        + _coef(row_ptr, s_tc, 5, bad, F64) * y
    nx = _coef(row_ptr, s_tc, 6, bad, F64) * x + _coef(row_ptr, s_tc, 7, bad, F64) * v \
        + _coef(row_ptr, s_tc, 10, bad, F64) * cx + _coef(row_ptr, s_tc, 11, bad, F64) * cv
    nv = _coef(row_ptr, s_tc, 8, bad, F64) * x + _coef(row_ptr, s_tc, 9, bad, F64) * v \
        + _coef(row_ptr, s_tc, 12, bad, F64) * cx + _coef(row_ptr, s_tc, 13, bad, F64) * cv
    if K >= 1:
        slot = (step - 1) % K
        slot = tl.where(slot < 0, slot + K, slot)
        hx, hv = _history(h_ptr, slot, rows, cols, s_hk, s_hb, s_hc, s_hd, mask, F64, CHANNELS)
        nx = nx + _coef(row_ptr, s_tc, 14, bad, F64) * hx + _coef(row_ptr, s_tc, 15, bad, F64) * hv
        nv = nv + _coef(row_ptr, s_tc, 16, bad, F64) * hx + _coef(row_ptr, s_tc, 17, bad, F64) * hv
    if K >= 2:
        slot2 = (step - 2) % K
        slot2 = tl.where(slot2 < 0, slot2 + K, slot2)
        hx2, hv2 = _history(h_ptr, slot2, rows, cols, s_hk, s_hb, s_hc, s_hd, mask, F64, CHANNELS)
        nx = nx + _coef(row_ptr, s_tc, 18, bad, F64) * hx2 + _coef(row_ptr, s_tc, 19, bad, F64) * hv2
        nv = nv + _coef(row_ptr, s_tc, 20, bad, F64) * hx2 + _coef(row_ptr, s_tc, 21, bad, F64) * hv2
    if K >= 1:
        own = step % K
        own = tl.where(own < 0, own + K, own)
        hp = h_ptr + own * s_hk + rows * s_hb + cols * s_hd
        store(hp, cx, mask)
        if CHANNELS == 2:
            store(hp + s_hc, cv, mask)
    store(up, nx, mask)
    store(up + s_us, nv, mask)


def gddim_step_(u: torch.Tensor, hist: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                block_b=None, block_d=None) -> None:
    """In place: one exponential-integrator multistep step (opdefs "gddim_step_").

    u (B, 2, D) float32/float64; hist (K, B, H, D) in u's dtype, K in {0, 1, 2}, H in {1, 2};
    y (B, D) float32/64, bf16, fp16; table (S, 22) float32/float64; step (1,) int64.
    """
    B, D = check_state(u, "u")
    check_shape(y, (B, D), "y")
    if hist.dim() != 4 or hist.shape[0] > 2 or hist.shape[1] != B or hist.shape[2] not in (1, 2) \
            or hist.shape[3] != D or hist.dtype != u.dtype:
        raise ValueError(f"triton backend: hist must be (K <= 2, {B}, 1 or 2, {D}) of u's dtype, "
                         f"got {tuple(hist.shape)} {hist.dtype}")
    if table.dim() != 2 or table.shape[1] != GDDIM_COLS or table.shape[0] < 1 \
            or table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"triton backend: table must be (S >= 1, {GDDIM_COLS}) float32/float64, "
                         f"got {tuple(table.shape)} {table.dtype}")
    check_index(step, "step")
    if B * D == 0:
        return
    k = hist.shape[0]
    # The arithmetic is float64 for every state dtype (F64=True): the first rows' Lin u and C_0 cur
    # cancel (terms ~1e6 where a(t) is tiny), which float32 arithmetic turns into O(0.1) errors.
    # Float64 values need twice the registers: any history takes the smaller tile (no spills on sm_90,
    # bench/aot_compile.py).
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=k >= 1)
    n_col, grid = tile_grid(B, D, bb, bd)
    hs = hist.stride() if k else (0, 0, 0, 0)
    with device_guard(u.device):
        launch(_gddim_step_kernel, grid,
               u, hist if k else u, y, table, step,
               B, D, n_col, table.shape[0],
               u.stride(0), u.stride(1), u.stride(2), hs[0], hs[1], hs[2], hs[3], y.stride(0), y.stride(1),
               table.stride(0), table.stride(1),
               K=k, CHANNELS=hist.shape[2], F64=True, BLOCK_B=bb, BLOCK_D=bd,
               num_warps=warps)


def aot_variants(B: int, D: int, empty):
    """(label, thunk) for every compiled variant of ``gddim_step_`` at (B, D) (bench/aot_compile.py)."""
    table, step = empty(20, GDDIM_COLS, dtype=torch.float64), empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        u = empty(B, 2, D, dtype=sd)
        for y_dtype in (sd, torch.bfloat16):
            y = empty(B, D, dtype=y_dtype)
            for k in (0, 1, 2):
                for channels in (1, 2):
                    hist = empty(k, B, channels, D, dtype=sd)
                    label = f"gddim_step_ {str(sd)[6:]} y={str(y_dtype)[6:]} K={k} H={channels}"
                    yield label, lambda u=u, h=hist, y=y: gddim_step_(u, h, y, table, step)
