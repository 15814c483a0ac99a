"""The inpainting replacement that the step kernels apply to their result (opdefs ``obs``).

An observed element (mask != 0) of the step's output becomes A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v),
the HSM perturbation of x_obs at the forward time t_r the step leaves the state at; the noise comes
from obs's channels 2, 3 (``OBS_EPS``), from Philox tag INPAINT at the step (``OBS_SEED``; normals
z0, z1, or z2, z3 with ``PAIR = 1``) or is absent (``OBS_MEAN``). ``exact_obs``: the denoising rule,
x = x_obs. ``obs`` is (B, 2 or 4, D) in the state dtype: x_obs, mask[, z_x, z_v].
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_shape, to_compute
from .coefficients import HSM, perturbation_kernel
from .philox import TAG_INPAINT, load_key, normals2, normals4

OBS_NONE = tl.constexpr(0)
OBS_MEAN = tl.constexpr(1)
OBS_EPS = tl.constexpr(2)
OBS_SEED = tl.constexpr(3)
OBS_EXACT = tl.constexpr(4)


def obs_mode(obs, seed, exact: bool = False) -> int:
    """The OBS constexpr of a call: none, the exact rule, explicit noise (4 channels), seed, or the mean."""
    if obs is None:
        return OBS_NONE.value
    if exact:
        return OBS_EXACT.value
    if obs.shape[1] == 4:
        return OBS_EPS.value
    return OBS_SEED.value if seed is not None else OBS_MEAN.value


def check_obs(obs, B: int, D: int) -> None:
    if obs is not None:
        check_shape(obs, (B, obs.shape[1] if obs.dim() == 3 and obs.shape[1] in (2, 4) else 2, D), "obs")


@triton.jit
def load_obs(obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, F64: tl.constexpr):
    """(x_obs, observed) of the tile: x_obs in the compute dtype, observed a bool tile."""
    op = obs_ptr + rows * s_ob + cols * s_od
    xo = to_compute(tl.load(op, mask=mask, other=0.0), F64)
    m = tl.load(op + s_oc, mask=mask, other=0.0)
    return xo, m != 0


@triton.jit
def replace_obs(x, v, obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, t_r, beta0, beta1, m_inv, gamma, neps,
                seed_ptr, step, D, OBS: tl.constexpr, PAIR: tl.constexpr, F64: tl.constexpr):
    """(x, v) with the observed elements replaced (``OBS``: the mode; t_r a float64 scalar)."""
    if OBS == OBS_EXACT:
        xo, keep = load_obs(obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, F64)
        x = tl.where(keep, xo, x)
    elif OBS != OBS_NONE:
        xo, keep = load_obs(obs_ptr, rows, cols, mask, s_ob, s_oc, s_od, F64)
        a_xx, _, a_vx, _, _, _, _, l11, l21, l22 = perturbation_kernel(t_r, beta0, beta1, m_inv, gamma, neps, HSM)
        rx = to_compute(a_xx, F64) * xo
        rv = to_compute(a_vx, F64) * xo
        if OBS == OBS_EPS:
            op = obs_ptr + rows * s_ob + cols * s_od
            zx = to_compute(tl.load(op + 2 * s_oc, mask=mask, other=0.0), F64)
            zv = to_compute(tl.load(op + 3 * s_oc, mask=mask, other=0.0), F64)
            rx = rx + to_compute(l11, F64) * zx
            rv = rv + to_compute(l21, F64) * zx + to_compute(l22, F64) * zv
        elif OBS == OBS_SEED:
            k0, k1 = load_key(seed_ptr)
            if PAIR == 0:
                n0, n1 = normals2(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_INPAINT)
                zx = to_compute(n0, F64)
                zv = to_compute(n1, F64)
            else:
                _, _, n2, n3 = normals4(rows * D + cols, k0, k1, step.to(tl.uint32), TAG_INPAINT)
                zx = to_compute(n2, F64)
                zv = to_compute(n3, F64)
            rx = rx + to_compute(l11, F64) * zx
            rv = rv + to_compute(l21, F64) * zx + to_compute(l22, F64) * zv
        x = tl.where(keep, rx, x)
        v = tl.where(keep, rv, v)
    return x, v
