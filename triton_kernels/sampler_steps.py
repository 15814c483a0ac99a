"""Sampler steps: analytic half step, fused SSCS step, affine (EM / denoise / ODE drift) step.

Each is one elementwise launch. The per-step coefficients are row ``step`` of a small table
(``cld_fast.sde`` layouts: HALF_COLS = 7, SSCS_COLS = 16, AFFINE_COLS = 6; any float dtype, cast
in-kernel), where ``step`` is a (1,) int64 device tensor read inside the kernel: a sampler loop
advances ``step`` on the device (``step += 1``) and never synchronises with the host, so the loop
can be captured in a CUDA graph. With a seed, the noise is the Philox contract with counter word
c2 = step and the op's tag (half step 1, SSCS 2, affine 3); ``eps`` tensors replace it when given.

    half_step_   (x, v) <- A (x, v) + L (z0, z1)                      table (S, 7), eps (B, 2, D)
    sscs_step_   v <- alpha v + kappa y; half step 1 with (z0, z1); half step 2 with (z2, z3)
                                                                      table (S, 16), eps (B, 4, D)
    affine_step  out = (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z0)
                                                                      table (S, 6), eps (B, D)

``half_step_`` and ``sscs_step_`` update u in place; ``affine_step`` writes ``out``, which may be u.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (as_bd, as_bkd, check_float_state, elementwise_config, launcher, tile_coords,
                      tile_grid, to_compute)
from .philox import TAG_AFFINE, TAG_HALF_STEP, TAG_SSCS, load_key, normal_z0, normals2, normals4

NOISE_NONE = 0
NOISE_EPS = 1
NOISE_SEED = 2


@triton.jit
def _row_value(rp, k, s_tc, F64: tl.constexpr):
    return to_compute(tl.load(rp + k * s_tc), F64)


@triton.jit
def _half(x, v, rp, s_tc, K0: tl.constexpr, ex, ev, HAS_NOISE: tl.constexpr, F64: tl.constexpr):
    """One analytic half step with table columns K0 .. K0 + 6 = a_xx a_xv a_vx a_vv l11 l21 l22."""
    a_xx = _row_value(rp, K0 + 0, s_tc, F64)
    a_xv = _row_value(rp, K0 + 1, s_tc, F64)
    a_vx = _row_value(rp, K0 + 2, s_tc, F64)
    a_vv = _row_value(rp, K0 + 3, s_tc, F64)
    nx = a_xx * x + a_xv * v
    nv = a_vx * x + a_vv * v
    if HAS_NOISE:
        l11 = _row_value(rp, K0 + 4, s_tc, F64)
        l21 = _row_value(rp, K0 + 5, s_tc, F64)
        l22 = _row_value(rp, K0 + 6, s_tc, F64)
        nx = nx + l11 * ex
        nv = nv + l21 * ex + l22 * ev
    return nx, nv


@triton.jit
def _half_step_kernel(
    u_ptr, table_ptr, step_ptr, eps_ptr, seed_ptr,
    B, D, n_col_tiles,
    s_ub, s_us, s_ud, s_tr, s_tc, s_eb, s_es, s_ed,
    NOISE: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step = tl.load(step_ptr).to(tl.int64)
    rp = table_ptr + step * s_tr
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    if NOISE == 1:
        ep = eps_ptr + rows * s_eb + cols * s_ed
        ex = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
        ev = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
        x, v = _half(x, v, rp, s_tc, 0, ex, ev, True, F64)
    elif NOISE == 2:
        k0, k1 = load_key(seed_ptr)
        z0, z1 = normals2(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_HALF_STEP)
        x, v = _half(x, v, rp, s_tc, 0, to_compute(z0, F64), to_compute(z1, F64), True, F64)
    else:
        x, v = _half(x, v, rp, s_tc, 0, x, v, False, F64)
    tl.store(up, x.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(up + s_us, v.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sscs_step_kernel(
    u_ptr, y_ptr, table_ptr, step_ptr, eps_ptr, seed_ptr,
    B, D, n_col_tiles,
    s_ub, s_us, s_ud, s_yb, s_yd, s_tr, s_tc, s_eb, s_es, s_ed,
    NOISE: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step = tl.load(step_ptr).to(tl.int64)
    rp = table_ptr + step * s_tr
    alpha = _row_value(rp, 0, s_tc, F64)
    kappa = _row_value(rp, 1, s_tc, F64)
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    y = to_compute(tl.load(y_ptr + rows * s_yb + cols * s_yd, mask=mask, other=0.0), F64)
    v = alpha * v + kappa * y
    if NOISE == 1:
        ep = eps_ptr + rows * s_eb + cols * s_ed
        z0 = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
        z1 = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
        z2 = to_compute(tl.load(ep + 2 * s_es, mask=mask, other=0.0), F64)
        z3 = to_compute(tl.load(ep + 3 * s_es, mask=mask, other=0.0), F64)
        x, v = _half(x, v, rp, s_tc, 2, z0, z1, True, F64)
        x, v = _half(x, v, rp, s_tc, 9, z2, z3, True, F64)
    elif NOISE == 2:
        k0, k1 = load_key(seed_ptr)
        z0, z1, z2, z3 = normals4(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_SSCS)
        x, v = _half(x, v, rp, s_tc, 2, to_compute(z0, F64), to_compute(z1, F64), True, F64)
        x, v = _half(x, v, rp, s_tc, 9, to_compute(z2, F64), to_compute(z3, F64), True, F64)
    else:
        x, v = _half(x, v, rp, s_tc, 2, x, v, False, F64)
        x, v = _half(x, v, rp, s_tc, 9, x, v, False, F64)
    tl.store(up, x.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(up + s_us, v.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_step_kernel(
    u_ptr, y_ptr, table_ptr, step_ptr, eps_ptr, seed_ptr, out_ptr,
    B, D, n_col_tiles,
    s_ub, s_us, s_ud, s_yb, s_yd, s_tr, s_tc, s_eb, s_ed, s_ob, s_os, s_od,
    NOISE: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step = tl.load(step_ptr).to(tl.int64)
    rp = table_ptr + step * s_tr
    c_xx = _row_value(rp, 0, s_tc, F64)
    c_xv = _row_value(rp, 1, s_tc, F64)
    c_vx = _row_value(rp, 2, s_tc, F64)
    c_vv = _row_value(rp, 3, s_tc, F64)
    c_vy = _row_value(rp, 4, s_tc, F64)
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    y = to_compute(tl.load(y_ptr + rows * s_yb + cols * s_yd, mask=mask, other=0.0), F64)
    nx = c_xx * x + c_xv * v
    nv = c_vx * x + c_vv * v + c_vy * y
    if NOISE == 1:
        sigma = _row_value(rp, 5, s_tc, F64)
        z = to_compute(tl.load(eps_ptr + rows * s_eb + cols * s_ed, mask=mask, other=0.0), F64)
        nv = nv + sigma * z
    elif NOISE == 2:
        sigma = _row_value(rp, 5, s_tc, F64)
        k0, k1 = load_key(seed_ptr)
        z = to_compute(normal_z0(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_AFFINE), F64)
        nv = nv + sigma * z
    op = out_ptr + rows * s_ob + cols * s_od
    tl.store(op, nx.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + s_os, nv.to(out_ptr.dtype.element_ty), mask=mask)


def _check_u(u, name="u"):
    check_float_state(u, name)
    if u.dim() != 3 or u.shape[1] != 2:
        raise ValueError(f"triton backend: {name} must be (B, 2, D), got {tuple(u.shape)}")
    return u.shape[0], u.shape[2]


def _check_table(table, cols, name):
    if table.dim() != 2 or table.shape[1] != cols:
        raise ValueError(f"triton backend: {name} table must be (S, {cols}), got {tuple(table.shape)}")


def _noise_mode(eps, seed):
    if eps is not None:
        return NOISE_EPS
    return NOISE_SEED if seed is not None else NOISE_NONE


def half_step_(u, table, step, eps=None, seed=None, block_b=None, block_d=None):
    """One analytic half step in place on u (B, 2, D) with row ``step`` of a (S, 7) table."""
    B, D = _check_u(u)
    _check_table(table, 7, "half-step")
    if B * D == 0:
        return u
    if eps is not None:
        eps = as_bkd(eps, B, 2, D, "eps")
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=eps is None and seed is not None)
    n_col, grid = tile_grid(B, D, bb, bd)
    # Placeholders for absent tensors are read-only inputs (never ``u``: see perturb.py).
    eps_ = eps if eps is not None else step
    es = eps.stride() if eps is not None else (0, 0, 0)
    launcher(_half_step_kernel)[grid](
        u, table, step, eps_, seed if seed is not None else step,
        B, D, n_col,
        u.stride(0), u.stride(1), u.stride(2), table.stride(0), table.stride(1),
        es[0], es[1], es[2],
        NOISE=_noise_mode(eps, seed), F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
        num_warps=warps,
    )
    return u


def sscs_step_(u, y, table, step, eps=None, seed=None, block_b=None, block_d=None):
    """Fused SSCS update in place on u (B, 2, D) with row ``step`` of a (S, 16) table."""
    B, D = _check_u(u)
    _check_table(table, 16, "SSCS")
    if B * D == 0:
        return u
    y = as_bd(y, B, D, "y")
    if eps is not None:
        eps = as_bkd(eps, B, 4, D, "eps")
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=eps is None and seed is not None)
    n_col, grid = tile_grid(B, D, bb, bd)
    eps_ = eps if eps is not None else step
    es = eps.stride() if eps is not None else (0, 0, 0)
    launcher(_sscs_step_kernel)[grid](
        u, y, table, step, eps_, seed if seed is not None else step,
        B, D, n_col,
        u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), table.stride(0), table.stride(1),
        es[0], es[1], es[2],
        NOISE=_noise_mode(eps, seed), F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
        num_warps=warps,
    )
    return u


def affine_step(u, y, table, step, out, eps=None, seed=None, block_b=None, block_d=None):
    """out = affine step of u with row ``step`` of a (S, 6) table; ``out`` may be ``u``."""
    B, D = _check_u(u)
    _check_u(out, "out")
    if tuple(out.shape) != tuple(u.shape):
        raise ValueError(f"triton backend: out {tuple(out.shape)} and u {tuple(u.shape)} differ")
    _check_table(table, 6, "affine")
    if B * D == 0:
        return out
    y = as_bd(y, B, D, "y")
    if eps is not None:
        eps = as_bd(eps, B, D, "eps")
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=eps is None and seed is not None)
    n_col, grid = tile_grid(B, D, bb, bd)
    eps_ = eps if eps is not None else step
    es = eps.stride() if eps is not None else (0, 0)
    launcher(_affine_step_kernel)[grid](
        u, y, table, step, eps_, seed if seed is not None else step, out,
        B, D, n_col,
        u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), table.stride(0), table.stride(1),
        es[0], es[1], out.stride(0), out.stride(1), out.stride(2),
        NOISE=_noise_mode(eps, seed), F64=out.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
        num_warps=warps,
    )
    return out
