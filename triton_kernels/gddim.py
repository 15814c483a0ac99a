"""The exponential-integrator multistep (gDDIM) step: one elementwise launch per network evaluation.

Row r = table[step] of ``cld_fast.sde.cld_fast.samplers.gddim.gddim_table`` (float64, computed once per sampling call),
``step`` a (1,) int64 device tensor read in-kernel (no host synchronisation):

    cur = E (x, v, y)                       2 numbers per element (eps_R, or (x0_hat, 0)); float64 arithmetic
    u   <- Lin u + C_0 cur + sum_{j=1..K} C_j hist[(step - j) mod K]
    hist[step mod K] <- cur                 (the first H of its 2 numbers; K = order - 1)

A step outside the table reads row 0 instead and writes NaN (the same guard as the other step
kernels). With ``obs`` (an inpainting condition, ``inpaint.py``; needs the run's ``ts`` and ``sde``)
the observed elements are replaced by a perturbation of x_obs at ts[step + 1], or set to x_obs
after the denoising row (step + 1 = len(ts)). With ``y_uncond`` (classifier-free guidance, constexpr
GUIDED) y is y + w (y - y_uncond), combined in the state dtype. Schema: ``cld_fast.opdefs`` "gddim_step_".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_index, check_sde, check_shape, check_state, device_guard, elementwise_config,
                      guide_args, launch, load_net, store, tile_coords, tile_grid, to_compute)
from .coefficients import load_sde
from .inpaint import OBS_NONE, check_obs, load_obs, obs_mode, replace_obs

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
    u_ptr, h_ptr, y_ptr, table_ptr, step_ptr, ts_ptr, sde_ptr, seed_ptr, obs_ptr, yu_ptr,
    B, D, n_col_tiles, n_rows, n_ts,
    s_ub, s_us, s_ud, s_hk, s_hb, s_hc, s_hd, s_yb, s_yd, s_tr, s_tc, s_ts, s_sde, s_ob, s_oc, s_od, s_gb, s_gd,
    w_hi, w_lo,
    K: tl.constexpr, CHANNELS: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, OBS: tl.constexpr, GUIDED: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step = tl.load(step_ptr).to(tl.int64)
    bad = (step < 0) | (step >= n_rows)
    row_ptr = table_ptr + tl.where(bad, 0, step) * s_tr
    up = u_ptr + rows * s_ub + cols * s_ud
    # float64 arithmetic for every state dtype (F64 is the state's: the replacement's compute dtype)
    x = to_compute(tl.load(up, mask=mask, other=0.0), True)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), True)
    if GUIDED:  # the combination in the state dtype, like the unguided y's cast
        y = to_compute(load_net(y_ptr, yu_ptr, rows, cols, mask, s_yb, s_yd, s_gb, s_gd, w_hi, w_lo, True, F64), True)
    else:
        y = to_compute(tl.load(y_ptr + rows * s_yb + cols * s_yd, mask=mask, other=0.0), True)
    cx = _coef(row_ptr, s_tc, 0, bad, True) * x + _coef(row_ptr, s_tc, 1, bad, True) * v \
        + _coef(row_ptr, s_tc, 2, bad, True) * y
    cv = _coef(row_ptr, s_tc, 3, bad, True) * x + _coef(row_ptr, s_tc, 4, bad, True) * v \
        + _coef(row_ptr, s_tc, 5, bad, True) * y
    nx = _coef(row_ptr, s_tc, 6, bad, True) * x + _coef(row_ptr, s_tc, 7, bad, True) * v \
        + _coef(row_ptr, s_tc, 10, bad, True) * cx + _coef(row_ptr, s_tc, 11, bad, True) * cv
    nv = _coef(row_ptr, s_tc, 8, bad, True) * x + _coef(row_ptr, s_tc, 9, bad, True) * v \
        + _coef(row_ptr, s_tc, 12, bad, True) * cx + _coef(row_ptr, s_tc, 13, bad, True) * cv
    if K >= 1:
        slot = (step - 1) % K
        slot = tl.where(slot < 0, slot + K, slot)
        hx, hv = _history(h_ptr, slot, rows, cols, s_hk, s_hb, s_hc, s_hd, mask, True, CHANNELS)
        nx = nx + _coef(row_ptr, s_tc, 14, bad, True) * hx + _coef(row_ptr, s_tc, 15, bad, True) * hv
        nv = nv + _coef(row_ptr, s_tc, 16, bad, True) * hx + _coef(row_ptr, s_tc, 17, bad, True) * hv
    if K >= 2:
        slot2 = (step - 2) % K
        slot2 = tl.where(slot2 < 0, slot2 + K, slot2)
        hx2, hv2 = _history(h_ptr, slot2, rows, cols, s_hk, s_hb, s_hc, s_hd, mask, True, CHANNELS)
        nx = nx + _coef(row_ptr, s_tc, 18, bad, True) * hx2 + _coef(row_ptr, s_tc, 19, bad, True) * hv2
        nv = nv + _coef(row_ptr, s_tc, 20, bad, True) * hx2 + _coef(row_ptr, s_tc, 21, bad, True) * hv2
    if K >= 1:
        own = step % K
        own = tl.where(own < 0, own + K, own)
        hp = h_ptr + own * s_hk + rows * s_hb + cols * s_hd
        store(hp, cx, mask)
        if CHANNELS == 2:
            store(hp + s_hc, cv, mask)
    if OBS != OBS_NONE:
        nx, nv = _replace(nx, nv, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, ts_ptr, s_ts, n_ts, sde_ptr, s_sde,
                          seed_ptr, step, D, OBS, F64)
    store(up, nx, mask)
    store(up + s_us, nv, mask)


@triton.jit
def _replace(x, v, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, ts_ptr, s_ts, n_ts, sde_ptr, s_sde, seed_ptr, step, D,
             OBS: tl.constexpr, F64: tl.constexpr):
    """The replacement after step ``step``: at ts[step + 1], or x = x_obs when step + 1 = n_ts (denoising row)."""
    j = tl.minimum(tl.maximum(step + 1, 0), n_ts - 1)
    t_r = tl.load(ts_ptr + j * s_ts).to(tl.float64)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    rx, rv = replace_obs(x, v, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, t_r, beta0, beta1, m_inv, gamma, neps,
                         seed_ptr, step, D, OBS, 0, F64)
    xo, keep = load_obs(obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, F64)
    exact = step + 1 >= n_ts
    return tl.where(exact, tl.where(keep, xo, x), rx), tl.where(exact, v, rv)


def gddim_step_(u: torch.Tensor, hist: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                ts=None, sde=None, seed=None, obs=None, y_uncond=None, guide_weight=0.0, block_b=None,
                block_d=None) -> None:
    """In place: one exponential-integrator multistep step (opdefs "gddim_step_").

    u (B, 2, D) float32/float64; hist (K, B, H, D) in u's dtype, K in {0, 1, 2}, H in {1, 2};
    y (B, D) float32/64, bf16, fp16; table (S, 22) float32/float64; step (1,) int64; with obs
    (B, 2 or 4, D): ts (S' + 1,) the run's grid, sde (5,) float64, seed (1,) int64 or None;
    y_uncond (B, D) in y's dtype: y is y + guide_weight (y - y_uncond).
    """
    B, D = check_state(u, "u")
    check_shape(y, (B, D), "y")
    gp, gs, w_hi, w_lo, guided = guide_args(y_uncond, guide_weight, y, (B, D))
    if hist.dim() != 4 or hist.shape[0] > 2 or hist.shape[1] != B or hist.shape[2] not in (1, 2) \
            or hist.shape[3] != D or hist.dtype != u.dtype:
        raise ValueError(f"triton backend: hist must be (K <= 2, {B}, 1 or 2, {D}) of u's dtype, "
                         f"got {tuple(hist.shape)} {hist.dtype}")
    if table.dim() != 2 or table.shape[1] != GDDIM_COLS or table.shape[0] < 1 \
            or table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"triton backend: table must be (S >= 1, {GDDIM_COLS}) float32/float64, "
                         f"got {tuple(table.shape)} {table.dtype}")
    check_index(step, "step")
    check_obs(obs, B, D)
    if obs is not None:
        if ts is None or sde is None:
            raise ValueError("triton backend: gddim_step_ with obs needs ts and sde")
        check_sde(sde)
    if B * D == 0:
        return
    k = hist.shape[0]
    # The step's arithmetic is float64 for every state dtype: the first rows' Lin u and C_0 cur cancel
    # (terms ~1e6 where a(t) is tiny), which float32 arithmetic turns into O(0.1) errors. Tile size by
    # register pressure, measured on sm_90 (bench/aot_compile.py): any history takes the smaller tile;
    # with a replacement (obs), ptxas fits the seeded draw and the two-slot history with explicit noise
    # only on the larger tile, the other replacements only on the smaller one.
    if obs is None:
        small = k >= 1
    else:
        small = seed is None and not (k == 2 and obs.shape[1] == 4)
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=small)
    n_col, grid = tile_grid(B, D, bb, bd)
    hs = hist.stride() if k else (0, 0, 0, 0)
    # Placeholders for absent tensors are read-only inputs that are never dereferenced.
    ts_, sde_ = (ts, sde) if obs is not None else (table, table)
    os_ = obs.stride() if obs is not None else (0, 0, 0)
    with device_guard(u.device):
        launch(_gddim_step_kernel, grid,
               u, hist if k else u, y, table, step, ts_, sde_, seed if seed is not None else step,
               obs if obs is not None else table, gp,
               B, D, n_col, table.shape[0], ts_.shape[0],
               u.stride(0), u.stride(1), u.stride(2), hs[0], hs[1], hs[2], hs[3], y.stride(0), y.stride(1),
               table.stride(0), table.stride(1), ts_.stride(0), sde_.stride(0), *os_, *gs, w_hi, w_lo,
               K=k, CHANNELS=hist.shape[2], F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
               OBS=obs_mode(obs, seed), GUIDED=guided, num_warps=warps)


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
            # the inpainting variants: every ring, seed / explicit noise / mean replacement
            ts, sde, seed = empty(11), empty(5, dtype=torch.float64), empty(1, dtype=torch.int64)
            for mode, channels, q in (("seed", 2, seed), ("eps", 4, None), ("mean", 2, None)):
                obs = empty(B, channels, D, dtype=sd)
                for k in (0, 1, 2):
                    for channels_h in ((1, 2) if k else (2,)):
                        hist = empty(k, B, channels_h, D, dtype=sd)
                        yield (f"gddim_step_ {str(sd)[6:]} y={str(y_dtype)[6:]} K={k} H={channels_h} obs={mode}",
                               lambda u=u, y=y, h=hist, o=obs, q=q: gddim_step_(u, h, y, table, step, ts, sde, q, o))
            # classifier-free guidance: every ring, without and with a seeded replacement
            yu, obs = empty(B, D, dtype=y_dtype), empty(B, 2, D, dtype=sd)
            for k in (0, 1, 2):
                for channels_h in ((1, 2) if k else (2,)):
                    hist = empty(k, B, channels_h, D, dtype=sd)
                    label = f"gddim_step_ {str(sd)[6:]} y={str(y_dtype)[6:]} K={k} H={channels_h}"
                    yield (f"{label} guided",
                           lambda u=u, y=y, h=hist, g=yu: gddim_step_(u, h, y, table, step, y_uncond=g, guide_weight=2.0))
                    yield (f"{label} obs=seed guided",
                           lambda u=u, y=y, h=hist, g=yu, o=obs: gddim_step_(u, h, y, table, step, ts, sde, seed, o, g, 2.0))
