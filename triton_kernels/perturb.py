"""Forward perturbation u = A @ (x0, v0) + L @ eps, written straight into the network's input buffer.

One kernel reads x0 (B, D) (and v0 for DSM) and writes x and v into ``out`` (B, 2, D), which may be
a strided view of the (B, 2C, ...) buffer the network consumes. The per-sample coefficient row
(a_xx a_xv a_vx a_vv l11 l21 l22, ``cld_fast.sde`` PERTURB_COLS, any float dtype, cast in-kernel)
is loaded once per program as a (BLOCK_B, 1) vector. Noise: ``eps`` (B, 2, D) if given, else
(z0, z1) of the Philox contract with the seed read in-kernel, step 0, tag 0; neither: the mean.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (as_bd, as_bkd, check_float_state, elementwise_config, launcher, tile_coords,
                      tile_grid, to_compute)
from .philox import TAG_PERTURB, load_key, normals2

NOISE_NONE = 0
NOISE_EPS = 1
NOISE_SEED = 2


@triton.jit
def _perturb_kernel(
    x0_ptr, v0_ptr, coef_ptr, eps_ptr, seed_ptr, out_ptr,
    B, D, n_col_tiles,
    s_x0b, s_x0d, s_v0b, s_v0d, s_cb, s_ck,
    s_eb, s_es, s_ed, s_ob, s_os, s_od,
    HAS_V0: tl.constexpr, NOISE: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    rmask = rows < B
    cp = coef_ptr + rows * s_cb
    a_xx = to_compute(tl.load(cp, mask=rmask, other=0.0), F64)
    a_vx = to_compute(tl.load(cp + 2 * s_ck, mask=rmask, other=0.0), F64)
    l11 = to_compute(tl.load(cp + 4 * s_ck, mask=rmask, other=0.0), F64)
    l21 = to_compute(tl.load(cp + 5 * s_ck, mask=rmask, other=0.0), F64)
    l22 = to_compute(tl.load(cp + 6 * s_ck, mask=rmask, other=0.0), F64)

    x0 = to_compute(tl.load(x0_ptr + rows * s_x0b + cols * s_x0d, mask=mask, other=0.0), F64)
    mx = a_xx * x0
    mv = a_vx * x0
    if HAS_V0:
        a_xv = to_compute(tl.load(cp + 1 * s_ck, mask=rmask, other=0.0), F64)
        a_vv = to_compute(tl.load(cp + 3 * s_ck, mask=rmask, other=0.0), F64)
        v0 = to_compute(tl.load(v0_ptr + rows * s_v0b + cols * s_v0d, mask=mask, other=0.0), F64)
        mx = mx + a_xv * v0
        mv = mv + a_vv * v0
    if NOISE == 1:
        ep = eps_ptr + rows * s_eb + cols * s_ed
        ex = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
        ev = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
        mx = mx + l11 * ex
        mv = mv + l21 * ex + l22 * ev
    elif NOISE == 2:
        k0, k1 = load_key(seed_ptr)
        z0, z1 = normals2(rows * D + cols, k0, k1, 0, TAG_PERTURB)
        ex = to_compute(z0, F64)
        ev = to_compute(z1, F64)
        mx = mx + l11 * ex
        mv = mv + l21 * ex + l22 * ev
    op = out_ptr + rows * s_ob + cols * s_od
    tl.store(op, mx.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + s_os, mv.to(out_ptr.dtype.element_ty), mask=mask)


def perturb(x0, coef, out, eps=None, seed=None, v0=None, block_b=None, block_d=None):
    """Write u = A @ (x0, v0) + L @ eps into ``out`` (B, 2, D) in one launch; returns ``out``."""
    check_float_state(out, "out")
    if out.dim() != 3 or out.shape[1] != 2:
        raise ValueError(f"triton backend: out must be (B, 2, D), got {tuple(out.shape)}")
    B, _, D = out.shape
    if B * D == 0:
        return out
    x0 = as_bd(x0, B, D, "x0")
    if v0 is not None:
        v0 = as_bd(v0, B, D, "v0")
    if eps is not None:
        eps = as_bkd(eps, B, 2, D, "eps")
        noise = NOISE_EPS
    elif seed is not None:
        noise = NOISE_SEED
    else:
        noise = NOISE_NONE
    bb, bd, warps = elementwise_config(B, D, out.device, block_b, block_d, philox=noise == NOISE_SEED)
    n_col, grid = tile_grid(B, D, bb, bd)
    # Absent optional tensors are replaced by a read-only placeholder (never dereferenced): never
    # by ``out``, so torch.compile's mutation analysis sees exactly one written tensor.
    v0_ = v0 if v0 is not None else x0
    eps_ = eps if eps is not None else x0
    es = eps.stride() if eps is not None else (0, 0, 0)
    launcher(_perturb_kernel)[grid](
        x0, v0_, coef, eps_, seed if seed is not None else x0, out,
        B, D, n_col,
        x0.stride(0), x0.stride(1), v0_.stride(0), v0_.stride(1), coef.stride(0), coef.stride(1),
        es[0], es[1], es[2], out.stride(0), out.stride(1), out.stride(2),
        HAS_V0=v0 is not None, NOISE=noise, F64=out.dtype == torch.float64,
        BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return out
