"""Sampler steps: analytic half step, fused SSCS step, affine (EM / denoise / ODE drift) step.

Each is one elementwise launch. The step's coefficients are computed in-kernel (float64, once per
program) from the forward-time grid ``ts`` (S + 1,) and ``step``, a (1,) int64 device tensor read
inside the kernel: a sampler loop advances ``step`` on the device (``step += 1``) and never
synchronises with the host, so the loop can be captured in a CUDA graph. With a seed, the noise is
the Philox contract with counter word c2 = step and the op's tag; ``eps`` tensors replace it.
With ``obs`` (an inpainting condition, ``inpaint.py``) the observed elements of the result are
replaced by a perturbation of x_obs at the time the step leaves the state at, in the same launch.
With ``y_uncond`` (classifier-free guidance, constexpr GUIDED) the SSCS and affine steps read
y + w (y - y_uncond) in place of y, in the same launch.

    half_step_   (x, v) <- A (x, v) + L (z0, z1): ts[step] -> ts[step + 1]           eps (B, 2, D)
    sscs_step_   v <- alpha v + kappa y; closing half step with (z0, z1); opening half step of the
                 next step with (z2, z3) (identity after the last step)             eps (B, 4, D)
    affine_step  out = (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z0)         eps (B, D)

A step outside the grid (step < 0 or step + 1 > S; pf_drift: step > S) cannot be rejected without a
host synchronisation, so the kernels clamp every ``ts`` index into range (no out-of-bounds read) and
make the step's time NaN, which turns every output element into NaN (the same under the
interpreter). An empty grid is rejected on the host (its length is a shape). Schemas:
``cld_fast.opdefs`` "half_step_", "sscs_step_", "affine_step".
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (NAN, check_index, check_sde, check_shape, check_state, device_guard, elementwise_config,
                      guide_args, launch, load_net, store, tile_coords, tile_grid, to_compute)
from .coefficients import (PF_DRIFT, EM, affine_coefficients, half_step_coefficients, load_sde,
                           sscs_coefficients)
from .perturb import NOISE_EPS, NOISE_NONE, NOISE_SEED, noise_mode
from .inpaint import check_obs, obs_mode, replace_obs
from .philox import TAG_AFFINE, TAG_HALF_STEP, TAG_SSCS, load_key, normal_z0, normals2, normals4


@triton.jit
def _grid_time(ts_ptr, s_ts, i, last):
    """ts[clamp(i, 0, last)] as float64 (an index outside the grid reads its nearest end)."""
    j = tl.minimum(tl.maximum(i, 0), last)
    return tl.load(ts_ptr + j * s_ts).to(tl.float64)


@triton.jit
def _step_times(step_ptr, ts_ptr, s_ts, n_ts, NEEDS_T1: tl.constexpr):
    """(step, t0, t1): step int64; t0 = ts[step], NaN unless 0 <= step and (step + 1 <= S when
    NEEDS_T1, else step <= S); t1 = ts[step + 1] (clamped)."""
    step = tl.load(step_ptr).to(tl.int64)
    last = n_ts - 1
    if NEEDS_T1:
        valid = (step >= 0) & (step < last)
    else:
        valid = (step >= 0) & (step <= last)
    t0 = tl.where(valid, _grid_time(ts_ptr, s_ts, step, last), NAN)
    t1 = _grid_time(ts_ptr, s_ts, step + 1, last)
    return step, t0, t1


@triton.jit
def _apply_half(x, v, a_xx, a_xv, a_vx, a_vv, l11, l21, l22, ex, ev, HAS_NOISE: tl.constexpr, F64: tl.constexpr):
    """(x, v) <- A (x, v) [+ L (ex, ev)] with float64 scalar coefficients cast to the compute dtype."""
    nx = to_compute(a_xx, F64) * x + to_compute(a_xv, F64) * v
    nv = to_compute(a_vx, F64) * x + to_compute(a_vv, F64) * v
    if HAS_NOISE:
        nx = nx + to_compute(l11, F64) * ex
        nv = nv + to_compute(l21, F64) * ex + to_compute(l22, F64) * ev
    return nx, nv


@triton.jit
def _half_step_kernel(
    u_ptr, ts_ptr, step_ptr, sde_ptr, eps_ptr, seed_ptr, obs_ptr,
    B, D, n_col_tiles, n_ts,
    s_ub, s_us, s_ud, s_ts, s_sde, s_eb, s_es, s_ed, s_ob, s_oc, s_od,
    NOISE: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, OBS: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step, t0, t1 = _step_times(step_ptr, ts_ptr, s_ts, n_ts, True)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    a_xx, a_xv, a_vx, a_vv, l11, l21, l22 = half_step_coefficients(t0, t0 - t1, beta0, beta1, m_inv)
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    if NOISE == NOISE_EPS:
        ep = eps_ptr + rows * s_eb + cols * s_ed
        ex = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
        ev = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
    elif NOISE == NOISE_SEED:
        k0, k1 = load_key(seed_ptr)
        z0, z1 = normals2(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_HALF_STEP)
        ex = to_compute(z0, F64)
        ev = to_compute(z1, F64)
    else:
        ex = x
        ev = v
    x, v = _apply_half(x, v, a_xx, a_xv, a_vx, a_vv, l11, l21, l22, ex, ev, NOISE != NOISE_NONE, F64)
    x, v = replace_obs(x, v, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, t1, beta0, beta1, m_inv, gamma, neps,
                       seed_ptr, step, D, OBS, 1, F64)
    store(up, x, mask)
    store(up + s_us, v, mask)


@triton.jit
def _sscs_step_kernel(
    u_ptr, y_ptr, ts_ptr, step_ptr, sde_ptr, eps_ptr, seed_ptr, obs_ptr, yu_ptr,
    B, D, n_col_tiles, n_ts,
    s_ub, s_us, s_ud, s_yb, s_yd, s_ts, s_sde, s_eb, s_es, s_ed, s_ob, s_oc, s_od, s_gb, s_gd, w_hi, w_lo,
    MIXED: tl.constexpr, NOISE: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    OFFICIAL: tl.constexpr, OBS: tl.constexpr, GUIDED: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step, t0, t1 = _step_times(step_ptr, ts_ptr, s_ts, n_ts, True)
    t2 = _grid_time(ts_ptr, s_ts, step + 2, n_ts - 1)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    (alpha, kappa, c_xx, c_xv, c_vx, c_vv, c11, c21, c22,
     o_xx, o_xv, o_vx, o_vv, o11, o21, o22) = sscs_coefficients(t0, t1, t2, step + 2 <= n_ts - 1,
                                                                beta0, beta1, m_inv, gamma, neps, MIXED, OFFICIAL)
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    y = load_net(y_ptr, yu_ptr, rows, cols, mask, s_yb, s_yd, s_gb, s_gd, w_hi, w_lo, GUIDED, F64)
    v = to_compute(alpha, F64) * v + to_compute(kappa, F64) * y
    if NOISE == NOISE_EPS:
        ep = eps_ptr + rows * s_eb + cols * s_ed
        z0 = to_compute(tl.load(ep, mask=mask, other=0.0), F64)
        z1 = to_compute(tl.load(ep + s_es, mask=mask, other=0.0), F64)
        z2 = to_compute(tl.load(ep + 2 * s_es, mask=mask, other=0.0), F64)
        z3 = to_compute(tl.load(ep + 3 * s_es, mask=mask, other=0.0), F64)
    elif NOISE == NOISE_SEED:
        k0, k1 = load_key(seed_ptr)
        n0, n1, n2, n3 = normals4(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_SSCS)
        z0 = to_compute(n0, F64)
        z1 = to_compute(n1, F64)
        z2 = to_compute(n2, F64)
        z3 = to_compute(n3, F64)
    else:
        z0 = x
        z1 = x
        z2 = x
        z3 = x
    noisy = NOISE != NOISE_NONE
    x, v = _apply_half(x, v, c_xx, c_xv, c_vx, c_vv, c11, c21, c22, z0, z1, noisy, F64)
    x, v = _apply_half(x, v, o_xx, o_xv, o_vx, o_vv, o11, o21, o22, z2, z3, noisy, F64)
    x, v = replace_obs(x, v, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, t1 - 0.5 * (t1 - t2), beta0, beta1,
                       m_inv, gamma, neps, seed_ptr, step, D, OBS, 0, F64)
    store(up, x, mask)
    store(up + s_us, v, mask)


@triton.jit
def _affine_step_kernel(
    u_ptr, y_ptr, ts_ptr, step_ptr, sde_ptr, eps_ptr, seed_ptr, out_ptr, obs_ptr, yu_ptr,
    B, D, n_col_tiles, n_ts,
    s_ub, s_us, s_ud, s_yb, s_yd, s_ts, s_sde, s_eb, s_ed, s_ob, s_os, s_od, s_pb, s_pc, s_pd, s_gb, s_gd,
    w_hi, w_lo,
    KIND: tl.constexpr, MIXED: tl.constexpr, NOISE: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, OBS: tl.constexpr, GUIDED: tl.constexpr,
):
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    step, t0, t1 = _step_times(step_ptr, ts_ptr, s_ts, n_ts, KIND != PF_DRIFT)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    if KIND == PF_DRIFT:
        h = t0 * 0.0
    else:
        h = t0 - t1
    c_xx, c_xv, c_vx, c_vv, c_vy, sigma = affine_coefficients(t0, h, beta0, beta1, m_inv, gamma, neps, KIND, MIXED)
    up = u_ptr + rows * s_ub + cols * s_ud
    x = to_compute(tl.load(up, mask=mask, other=0.0), F64)
    v = to_compute(tl.load(up + s_us, mask=mask, other=0.0), F64)
    y = load_net(y_ptr, yu_ptr, rows, cols, mask, s_yb, s_yd, s_gb, s_gd, w_hi, w_lo, GUIDED, F64)
    nx = to_compute(c_xx, F64) * x + to_compute(c_xv, F64) * v
    nv = to_compute(c_vx, F64) * x + to_compute(c_vv, F64) * v + to_compute(c_vy, F64) * y
    if KIND == EM:
        if NOISE == NOISE_EPS:
            z = to_compute(tl.load(eps_ptr + rows * s_eb + cols * s_ed, mask=mask, other=0.0), F64)
            nv = nv + to_compute(sigma, F64) * z
        elif NOISE == NOISE_SEED:
            k0, k1 = load_key(seed_ptr)
            z = to_compute(normal_z0(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_AFFINE), F64)
            nv = nv + to_compute(sigma, F64) * z
    nx, nv = replace_obs(nx, nv, obs_ptr, rows, cols, mask, s_pb, s_pc, s_pd, t1, beta0, beta1, m_inv, gamma, neps,
                         seed_ptr, step, D, OBS, 0, F64)
    op = out_ptr + rows * s_ob + cols * s_od
    store(op, nx, mask)
    store(op + s_os, nv, mask)


# ---- host launchers ------------------------------------------------------------------------


def _check_grid(ts: torch.Tensor, step: torch.Tensor, sde: torch.Tensor, min_len: int):
    if ts.dim() != 1 or ts.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"triton backend: ts must be a 1-D float32/float64 tensor, got {tuple(ts.shape)} {ts.dtype}")
    if ts.shape[0] < min_len:
        raise ValueError(f"triton backend: ts holds {ts.shape[0]} time points; step needs at least {min_len}")
    check_index(step, "step")
    check_sde(sde)


def _check_noise(eps, seed, shape):
    if eps is not None:
        check_shape(eps, shape, "eps")
    if seed is not None:
        check_index(seed, "seed")


def _obs_args(obs, fallback):
    """(pointer, strides) of obs, or a never-read placeholder."""
    return (obs, obs.stride()) if obs is not None else (fallback, (0, 0, 0))


def half_step_(u: torch.Tensor, ts: torch.Tensor, step: torch.Tensor, sde: torch.Tensor,
               eps: Optional[torch.Tensor], seed: Optional[torch.Tensor], obs: Optional[torch.Tensor] = None,
               block_b: Optional[int] = None, block_d: Optional[int] = None) -> None:
    """Reverse linear half step ts[step] -> ts[step + 1] in place on u (B, 2, D) (opdefs "half_step_").

    ts: (S + 1,) grid, step: (1,) int64 (read in-kernel), sde: (5,) float64; eps (B, 2, D) or seed (1,) int64;
    obs (B, 2 or 4, D): the replacement at ts[step + 1] (Philox normals z2, z3).
    """
    B, D = check_state(u, "u")
    _check_grid(ts, step, sde, 2)
    _check_noise(eps, seed, (B, 2, D))
    check_obs(obs, B, D)
    if B * D == 0:
        return
    noise = noise_mode(eps, seed)
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=noise == NOISE_SEED.value)
    n_col, grid = tile_grid(B, D, bb, bd)
    # Placeholders for absent tensors are read-only inputs that are never dereferenced (never ``u``).
    es = eps.stride() if eps is not None else (0, 0, 0)
    op, os_ = _obs_args(obs, ts)
    with device_guard(u.device):
        launch(_half_step_kernel, grid,
               u, ts, step, sde, eps if eps is not None else ts, seed if seed is not None else step, op,
               B, D, n_col, ts.shape[0],
               u.stride(0), u.stride(1), u.stride(2), ts.stride(0), sde.stride(0), es[0], es[1], es[2], *os_,
               NOISE=noise, F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd, OBS=obs_mode(obs, seed),
               num_warps=warps)


def sscs_step_(u: torch.Tensor, y: torch.Tensor, ts: torch.Tensor, step: torch.Tensor, sde: torch.Tensor,
               mixed: bool, eps: Optional[torch.Tensor], seed: Optional[torch.Tensor], official_half: bool = False,
               obs: Optional[torch.Tensor] = None, y_uncond: Optional[torch.Tensor] = None,
               guide_weight: float = 0.0, block_b: Optional[int] = None, block_d: Optional[int] = None) -> None:
    """Fused SSCS update after a network evaluation at ts[step], in place on u (opdefs "sscs_step_").

    y: (B, D) score, or the network output when ``mixed``; eps (B, 4, D) or seed (1,) int64;
    ``official_half``: the official sampler's closing half step (``CLD.sscs_closing_half_step``);
    obs (B, 2 or 4, D): the replacement at the end of the opening half step; y_uncond (B, D) in y's
    dtype: the step reads y + guide_weight (y - y_uncond).
    """
    B, D = check_state(u, "u")
    check_shape(y, (B, D), "y")
    gp, gs, w_hi, w_lo, guided = guide_args(y_uncond, guide_weight, y, (B, D))
    _check_grid(ts, step, sde, 2)
    _check_noise(eps, seed, (B, 4, D))
    check_obs(obs, B, D)
    if B * D == 0:
        return
    noise = noise_mode(eps, seed)
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=noise == NOISE_SEED.value)
    n_col, grid = tile_grid(B, D, bb, bd)
    es = eps.stride() if eps is not None else (0, 0, 0)
    op, os_ = _obs_args(obs, ts)
    with device_guard(u.device):
        launch(_sscs_step_kernel, grid,
               u, y, ts, step, sde, eps if eps is not None else ts, seed if seed is not None else step, op, gp,
               B, D, n_col, ts.shape[0],
               u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), ts.stride(0), sde.stride(0),
               es[0], es[1], es[2], *os_, *gs, w_hi, w_lo,
               MIXED=bool(mixed), NOISE=noise, F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd,
               OFFICIAL=bool(official_half), OBS=obs_mode(obs, seed), GUIDED=guided, num_warps=warps)


def affine_step(u: torch.Tensor, y: torch.Tensor, ts: torch.Tensor, step: torch.Tensor, sde: torch.Tensor,
                kind: int, mixed: bool, eps: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                out: torch.Tensor, obs: Optional[torch.Tensor] = None, y_uncond: Optional[torch.Tensor] = None,
                guide_weight: float = 0.0, block_b: Optional[int] = None, block_d: Optional[int] = None) -> None:
    """out = affine step of u for ts[step] -> ts[step + 1] (opdefs "affine_step"); ``out`` may be ``u``.

    kind: 0 em (noise z0 from eps (B, D) or the seed), 1 denoise, 2 pf_drift (the forward-time ODE
    drift at ts[step]); computed in out's dtype. obs (B, 2 or 4, D): em replaces at ts[step + 1],
    denoise sets x = x_obs; pf_drift takes none. y_uncond (B, D) in y's dtype (em, denoise): the step
    reads y + guide_weight (y - y_uncond).
    """
    B, D = check_state(u, "u")
    check_state(out, "out")
    check_shape(out, (B, 2, D), "out", (torch.float32, torch.float64))
    check_shape(y, (B, D), "y")
    if kind not in (0, 1, 2):
        raise ValueError(f"triton backend: kind must be 0 (em), 1 (denoise) or 2 (pf_drift), got {kind}")
    _check_grid(ts, step, sde, 1 if kind == PF_DRIFT.value else 2)
    _check_noise(eps, seed, (B, D))
    check_obs(obs, B, D)
    if obs is not None and kind == PF_DRIFT.value:
        raise ValueError("triton backend: obs (an inpainting condition) is not taken by the pf_drift kind")
    if y_uncond is not None and kind == PF_DRIFT.value:
        raise ValueError("triton backend: y_uncond (classifier-free guidance) is not taken by the pf_drift kind")
    gp, gs, w_hi, w_lo, guided = guide_args(y_uncond, guide_weight, y, (B, D))
    if B * D == 0:
        return
    noise = noise_mode(eps, seed) if kind == EM.value else NOISE_NONE.value
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=noise == NOISE_SEED.value)
    n_col, grid = tile_grid(B, D, bb, bd)
    es = eps.stride() if eps is not None else (0, 0)
    op, os_ = _obs_args(obs, ts)
    with device_guard(u.device):
        launch(_affine_step_kernel, grid,
               u, y, ts, step, sde, eps if eps is not None else ts, seed if seed is not None else step, out, op, gp,
               B, D, n_col, ts.shape[0],
               u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), ts.stride(0), sde.stride(0),
               es[0], es[1], out.stride(0), out.stride(1), out.stride(2), *os_, *gs, w_hi, w_lo,
               KIND=int(kind), MIXED=bool(mixed), NOISE=noise, F64=out.dtype == torch.float64,
               BLOCK_B=bb, BLOCK_D=bd, OBS=obs_mode(obs, seed, exact=kind == 1), GUIDED=guided, num_warps=warps)


def aot_variants(B: int, D: int, empty):
    """(label, thunk) for every compiled variant of ``half_step_``, ``sscs_step_`` and ``affine_step``
    at (B, D); ``empty(*shape, dtype=...)`` makes the (meta) tensors (bench/aot_compile.py)."""
    yield from _plain_variants(B, D, empty)
    yield from _obs_variants(B, D, empty)
    yield from _guided_variants(B, D, empty)


def _guided_variants(B: int, D: int, empty):
    """The classifier-free guidance variants a sampler run reaches: mixed-score network outputs in the state
    dtype or bf16, float32 and float64 states, seeded noise (and none for the denoising kind), with and
    without a seeded inpainting condition."""
    sde, ts = empty(5, dtype=torch.float64), empty(11)
    step, seed = empty(1, dtype=torch.int64), empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u = empty(B, 2, D, dtype=sd)
        for obs in (None, empty(B, 2, D, dtype=sd)):
            on = "none" if obs is None else "seed"
            for y_dtype in (sd, torch.bfloat16):
                y, yu, yn = empty(B, D, dtype=y_dtype), empty(B, D, dtype=y_dtype), str(y_dtype).replace("torch.", "")
                yield (f"sscs_step_ {s} y={yn} mixed=True seed obs={on} guided",
                       lambda y=y, g=yu, o=obs: sscs_step_(u, y, ts, step, sde, True, None, seed, False, o, g, 2.0))
                yield (f"affine_step {s} y={yn} kind=0 mixed=True seed obs={on} guided",
                       lambda y=y, g=yu, o=obs: affine_step(u, y, ts, step, sde, 0, True, None, seed, u, o, g, 2.0))
                yield (f"affine_step {s} y={yn} kind=1 mixed=True obs={on} guided",
                       lambda y=y, g=yu, o=obs: affine_step(u, y, ts, step, sde, 1, True, None, None, u, o, g, 2.0))


def _obs_variants(B: int, D: int, empty):
    """The inpainting variants: every obs mode a sampler run reaches (seed: the runs' mode; explicit noise;
    the mean), float32 and float64 states, mixed-score network outputs in the state dtype or bf16."""
    sde, ts = empty(5, dtype=torch.float64), empty(11)
    step, seed = empty(1, dtype=torch.int64), empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u = empty(B, 2, D, dtype=sd)
        for mode, channels, q in (("seed", 2, seed), ("eps", 4, None), ("mean", 2, None)):
            obs = empty(B, channels, D, dtype=sd)
            yield f"half_step_ {s} obs={mode}", lambda o=obs, q=q: half_step_(u, ts, step, sde, None, q, o)
            for y_dtype in (sd, torch.bfloat16):
                y, yn = empty(B, D, dtype=y_dtype), str(y_dtype).replace("torch.", "")
                noise = "seed" if q is not None else "none"
                yield (f"sscs_step_ {s} y={yn} mixed=True {noise} obs={mode}",
                       lambda y=y, o=obs, q=q: sscs_step_(u, y, ts, step, sde, True, None, q, False, o))
                yield (f"affine_step {s} y={yn} kind=0 mixed=True {noise} obs={mode}",
                       lambda y=y, o=obs, q=q: affine_step(u, y, ts, step, sde, 0, True, None, q, u, o))
                yield (f"affine_step {s} y={yn} kind=1 mixed=True obs=exact",
                       lambda y=y, o=obs: affine_step(u, y, ts, step, sde, 1, True, None, None, u, o))


def _plain_variants(B: int, D: int, empty):
    sde, ts = empty(5, dtype=torch.float64), empty(11)
    step, seed = empty(1, dtype=torch.int64), empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u = empty(B, 2, D, dtype=sd)
        for noise in ("none", "eps", "seed"):
            explicit = noise == "eps"
            eps2, eps4 = (empty(B, k, D, dtype=sd) if explicit else None for k in (2, 4))
            eps1 = empty(B, D, dtype=sd) if explicit else None
            q = seed if noise == "seed" else None
            yield f"half_step_ {s} {noise}", lambda e=eps2, q=q: half_step_(u, ts, step, sde, e, q)
            for y_dtype in (sd, torch.bfloat16):
                y, yn = empty(B, D, dtype=y_dtype), str(y_dtype).replace("torch.", "")
                for mixed in (False, True):
                    # the official closing half step only moves two times: compiled for float32 states
                    for official in ((False, True) if sd == torch.float32 else (False,)):
                        yield (f"sscs_step_ {s} y={yn} mixed={mixed} official={official} {noise}",
                               lambda y=y, m=mixed, e=eps4, q=q, o=official: sscs_step_(u, y, ts, step, sde, m, e, q, o))
                    for kind in ((0, 1, 2) if noise == "none" else (0,)):
                        yield (f"affine_step {s} y={yn} kind={kind} mixed={mixed} {noise}",
                               lambda y=y, m=mixed, k=kind, e=eps1, q=q: affine_step(u, y, ts, step, sde, k, m, e, q, u))
