"""The ``torch`` backend: plain PyTorch, any device, float32 or float64; the readable reference.

Every backend module implements these functions with the same signatures (the backend contract).
Shapes: B samples, D = elements of one sample's x; ``u`` is the (B, 2, D) view of the state
(x = u[:, 0], v = u[:, 1]); coefficient tables come from ``cld_fast.sde`` (see its column layouts);
``seed`` and ``step`` are (1,) int64 tensors on the data's device; noise is drawn by the contract of
``cld_fast.philox`` when ``seed`` is given, taken from ``eps`` when that is given, and absent when
both are None. Functions ending in ``_`` update ``u`` in place and return it.
"""
from __future__ import annotations

import torch

from .. import philox

NAME = "torch"
# hsm_loss_bwd reads grad through its strides (the stride-0 gradient of a sum needs no copy).
STRIDED_LOSS_GRAD = True


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _normals(shape_bd, seed, step, tag, count, dtype):
    """(count, B, D) normals of the philox contract, cast to ``dtype``."""
    b, d = shape_bd
    z = philox.philox_normals(b * d, seed, step, tag, device=seed.device)
    return z[:count].view(count, b, d).to(dtype)


def _col(table, j):
    return table[:, j : j + 1]


def _row(table, step):
    """Row ``step`` of a per-step table as a (1, K) tensor, read on the device (no host sync)."""
    return table.index_select(0, step.reshape(1))


def perturb(x0, coef, out, eps=None, seed=None, v0=None):
    """u = A @ (x0, v0) + L @ eps written into ``out`` (B, 2, D); x0 (B, D), coef (B, 7)."""
    dtype = out.dtype
    if eps is None:
        ex, ev = _normals(x0.shape, seed, torch.zeros_like(seed), philox.TAG_PERTURB, 2, dtype)
    else:
        ex, ev = eps[:, 0].to(dtype), eps[:, 1].to(dtype)
    c = coef.to(dtype)
    x0 = x0.to(dtype)
    mx = _col(c, 0) * x0
    mv = _col(c, 2) * x0
    if v0 is not None:
        v0 = v0.to(dtype)
        mx = mx + _col(c, 1) * v0
        mv = mv + _col(c, 3) * v0
    out[:, 0] = mx + _col(c, 4) * ex
    out[:, 1] = mv + _col(c, 5) * ex + _col(c, 6) * ev
    return out


def _eps_v(v, eps_v, seed):
    """eps_v as passed, or regenerated from the perturb call's seed (z1 of the contract)."""
    if eps_v is not None:
        return eps_v
    return _normals(v.shape, seed, torch.zeros_like(seed), philox.TAG_PERTURB, 2, v.dtype)[1]


def _loss_residual(out, u, coef, eps_v, seed):
    v = u[:, 1]
    acc = torch.float64 if (out.dtype == torch.float64 or v.dtype == torch.float64) else torch.float32
    c = coef.to(acc)
    e = _eps_v(v, eps_v, seed).to(acc)
    return out.to(acc) + _col(c, 0) * v.to(acc) - e, c


def hsm_loss_fwd(out, u, coef, eps_v=None, seed=None):
    """Per-sample w * sum_d (out + c v - eps_v)^2 -> (B,) in float32 (float64 for float64 inputs).

    out (B, D) network output (fp32/bf16/fp16/fp64), u (B, 2, D) state, coef (B, 2) = (c, w).
    """
    r, c = _loss_residual(out, u, coef, eps_v, seed)
    return c[:, 1] * (r * r).sum(dim=1)


def hsm_loss_bwd(grad, out, u, coef, eps_v=None, seed=None):
    """d loss / d out = 2 w grad_b (out + c v - eps_v) -> (B, D) in out's dtype; grad (B,)."""
    r, c = _loss_residual(out, u, coef, eps_v, seed)
    return (2.0 * (c[:, 1] * grad.to(r.dtype)).unsqueeze(1) * r).to(out.dtype)


def mixed_score(out, u, coef):
    """score = c0 v + c1 out (B, D) in u's dtype; u (B, 2, D), coef (B, 2) = (-1/s_vv, -1/l22)."""
    v = u[:, 1]
    c = coef.to(v.dtype)
    return _col(c, 0) * v + _col(c, 1) * out.to(v.dtype)


def _linear(x, v, r, ex, ev):
    """Apply one analytic half step with row r = (a_xx a_xv a_vx a_vv l11 l21 l22)."""
    nx = r[:, 0:1] * x + r[:, 1:2] * v
    nv = r[:, 2:3] * x + r[:, 3:4] * v
    if ex is not None:
        nx = nx + r[:, 4:5] * ex
        nv = nv + r[:, 5:6] * ex + r[:, 6:7] * ev
    return nx, nv


def half_step_(u, table, step, eps=None, seed=None):
    """One analytic half step (row ``step`` of a (S, 7) table) with noise (z0, z1), in place."""
    r = _row(table, step).to(u.dtype)
    if eps is not None:
        ex, ev = eps[:, 0].to(u.dtype), eps[:, 1].to(u.dtype)
    elif seed is not None:
        ex, ev = _normals(u[:, 0].shape, seed, step, philox.TAG_HALF_STEP, 2, u.dtype)
    else:
        ex = ev = None
    nx, nv = _linear(u[:, 0], u[:, 1], r, ex, ev)
    u[:, 0] = nx
    u[:, 1] = nv
    return u


def sscs_step_(u, y, table, step, eps=None, seed=None):
    """Fused SSCS update with row ``step`` of a (S, 16) table, in place.

    v <- alpha v + kappa y; then half step 1 with noise (z0, z1); then half step 2 with (z2, z3).
    """
    r = _row(table, step).to(u.dtype)
    if eps is not None:
        z = [eps[:, j].to(u.dtype) for j in range(4)]
    elif seed is not None:
        z = list(_normals(u[:, 0].shape, seed, step, philox.TAG_SSCS, 4, u.dtype))
    else:
        z = [None] * 4
    x = u[:, 0]
    v = r[:, 0:1] * u[:, 1] + r[:, 1:2] * y.to(u.dtype)
    x, v = _linear(x, v, r[:, 2:9], z[0], z[1])
    x, v = _linear(x, v, r[:, 9:16], z[2], z[3])
    u[:, 0] = x
    u[:, 1] = v
    return u


def affine_step(u, y, table, step, out, eps=None, seed=None):
    """out = (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z) with row ``step`` of a (S, 6) table.

    ``out`` may be ``u`` itself (an in-place EM step) or a new (B, 2, D) tensor (an ODE drift).
    """
    r = _row(table, step).to(out.dtype)
    x, v = u[:, 0].to(out.dtype), u[:, 1].to(out.dtype)
    nx = r[:, 0:1] * x + r[:, 1:2] * v
    nv = r[:, 2:3] * x + r[:, 3:4] * v + r[:, 4:5] * y.to(out.dtype)
    if eps is not None:
        nv = nv + r[:, 5:6] * eps.to(out.dtype)
    elif seed is not None:
        nv = nv + r[:, 5:6] * _normals(x.shape, seed, step, philox.TAG_AFFINE, 1, out.dtype)[0]
    out[:, 0] = nx
    out[:, 1] = nv
    return out
