"""Forward perturbation u = A(t) (x0, v0) + L(t) eps, written straight into the network's input buffer.

One kernel reads x0 (B, D) (and v0 when given), computes the per-sample mean matrix A and the
Cholesky factor L of the covariance from t and the CLD parameters in float64 (``coefficients``), and
writes x and v into ``out`` (B, 2, D), which may be a strided view of the (B, 2C, ...) buffer the
network consumes. Noise: ``eps`` (B, 2, D) if given, else (z0, z1) of the Philox contract with the
seed read in-kernel (step 0, tag PERTURB); neither: the mean. Schema: ``cld_fast.opdefs`` "perturb".
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (check_index, check_sde, check_shape, check_state, check_times, device_guard,
                      elementwise_config, launch, load_rows, store, tile_coords, tile_grid, to_compute)
from .coefficients import load_sde, perturbation_kernel
from .philox import TAG_PERTURB, load_key, normals2

# Where a kernel's noise comes from (constexpr NOISE): nowhere, an ``eps`` tensor, or in-kernel Philox.
NOISE_NONE = tl.constexpr(0)
NOISE_EPS = tl.constexpr(1)
NOISE_SEED = tl.constexpr(2)


def noise_mode(eps, seed) -> int:
    """The NOISE code of a call: an ``eps`` tensor wins over a seed."""
    if eps is not None:
        return NOISE_EPS.value
    return NOISE_SEED.value if seed is not None else NOISE_NONE.value


@triton.jit
def _perturb_kernel(
    x0_ptr, v0_ptr, t_ptr, sde_ptr, eps_ptr, seed_ptr, out_ptr,
    B, D, n_col_tiles,
    s_x0b, s_x0d, s_v0b, s_v0d, s_t, s_sde,
    s_eb, s_es, s_ed, s_ob, s_os, s_od,
    OBJECTIVE: tl.constexpr, HAS_V0: tl.constexpr, NOISE: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    t = load_rows(t_ptr, rows, s_t, rows < B, 1.0)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    a_xx, a_xv, a_vx, a_vv, _, _, _, l11, l21, l22 = perturbation_kernel(t, beta0, beta1, m_inv, gamma, neps,
                                                                          OBJECTIVE)
    x0 = to_compute(tl.load(x0_ptr + rows * s_x0b + cols * s_x0d, mask=mask, other=0.0), F64)
    mx = to_compute(a_xx, F64) * x0
    mv = to_compute(a_vx, F64) * x0
    if HAS_V0:
        v0 = to_compute(tl.load(v0_ptr + rows * s_v0b + cols * s_v0d, mask=mask, other=0.0), F64)
        mx = mx + to_compute(a_xv, F64) * v0
        mv = mv + to_compute(a_vv, F64) * v0
    if NOISE != NOISE_NONE:
        if NOISE == NOISE_EPS:
            ep = eps_ptr + rows * s_eb + cols * s_ed
            ex = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
            ev = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
        else:
            k0, k1 = load_key(seed_ptr)
            z0, z1 = normals2(rows * D + cols, k0, k1, 0, TAG_PERTURB)
            ex = to_compute(z0, F64)
            ev = to_compute(z1, F64)
        mx = mx + to_compute(l11, F64) * ex
        mv = mv + to_compute(l21, F64) * ex + to_compute(l22, F64) * ev
    op = out_ptr + rows * s_ob + cols * s_od
    store(op, mx, mask)
    store(op + s_os, mv, mask)


def perturb(x0: torch.Tensor, v0: Optional[torch.Tensor], t: torch.Tensor, sde: torch.Tensor, objective: int,
            eps: Optional[torch.Tensor], seed: Optional[torch.Tensor], out: torch.Tensor,
            block_b: Optional[int] = None, block_d: Optional[int] = None) -> None:
    """Write u = A(t) (x0, v0) + L(t) eps into ``out`` in one launch (opdefs "perturb").

    Args:
        x0, v0: (B, D) data and initial velocity (v0 may be None), any strides.
        t: (B,) float32/float64 times, any stride; sde: (5,) float64 parameters.
        objective: 0 hsm (v0 marginalised in the covariance), 1 dsm.
        eps: (B, 2, D) noise or None; seed: (1,) int64 Philox seed or None.
        out: (B, 2, D) float32/float64 destination (any strides), written in its dtype.
        block_b, block_d: tile override (tests).
    """
    B, D = check_state(out, "out")
    check_shape(x0, (B, D), "x0")
    if v0 is not None:
        check_shape(v0, (B, D), "v0")
    check_times(t, B)
    check_sde(sde)
    if objective not in (0, 1):
        raise ValueError(f"triton backend: objective must be 0 (hsm) or 1 (dsm), got {objective}")
    if eps is not None:
        check_shape(eps, (B, 2, D), "eps")
    if seed is not None:
        check_index(seed, "seed")
    if B * D == 0:
        return
    noise = noise_mode(eps, seed)
    bb, bd, warps = elementwise_config(B, D, out.device, block_b, block_d, philox=noise == NOISE_SEED.value)
    n_col, grid = tile_grid(B, D, bb, bd)
    # Absent optional tensors are replaced by a read-only placeholder that is never dereferenced
    # (never ``out``: torch.compile's mutation analysis must see exactly one written tensor).
    v0_ = v0 if v0 is not None else x0
    es = eps.stride() if eps is not None else (0, 0, 0)
    with device_guard(out.device):
        launch(_perturb_kernel, grid,
               x0, v0_, t, sde, eps if eps is not None else x0, seed if seed is not None else sde, out,
               B, D, n_col,
               x0.stride(0), x0.stride(1), v0_.stride(0), v0_.stride(1), t.stride(0), sde.stride(0),
               es[0], es[1], es[2], out.stride(0), out.stride(1), out.stride(2),
               OBJECTIVE=int(objective), HAS_V0=v0 is not None, NOISE=noise, F64=out.dtype == torch.float64,
               BLOCK_B=bb, BLOCK_D=bd, num_warps=warps)


def aot_variants(B: int, D: int, empty):
    """(label, thunk) for every compiled variant a ``perturb`` call can reach at (B, D); ``empty(*shape,
    dtype=...)`` makes the (meta) tensors. bench/aot_compile.py compiles them for a GPU target."""
    sde, t, seed = empty(5, dtype=torch.float64), empty(B), empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u, x0 = empty(B, 2, D, dtype=sd), empty(B, D, dtype=sd)
        for noise in ("none", "eps", "seed"):
            eps = empty(B, 2, D, dtype=sd) if noise == "eps" else None
            for objective in (0, 1):
                for has_v0 in (False, True):
                    yield (f"perturb {s} obj={objective} v0={has_v0} {noise}",
                           lambda o=objective, v=has_v0, e=eps, n=noise: perturb(
                               x0, x0 if v else None, t, sde, o, e, seed if n == "seed" else None, u))
