"""The noise contract shared by every backend, written in plain torch as the reference.

Kernels that draw noise in-kernel (``triton``, ``cuda``; ``torch`` in seed mode) all compute, for
element pair i (flat index b * D + d over the (B, D) view of x) of a call with seed s, step k and
op tag T:

    key     = (s & 0xffffffff, (s >> 32) & 0xffffffff)
    counter = (i & 0xffffffff, (i >> 32) & 0xffffffff, k & 0xffffffff, T)
    r0..r3  = Philox4x32-10(counter, key)                (Salmon et al. 2011; as curand and Triton)
    uniform(r) = float32(r as int32, negatives mapped to ~r) * 4.6566127342e-10   (Triton's rule)
    (z0, z1) = BoxMuller(uniform(r0), uniform(r1)),  (z2, z3) = BoxMuller(uniform(r2), uniform(r3))
    BoxMuller(u1, u2) = sqrt(-2 log max(u1, 1e-7)) * (cos 2 pi u2, sin 2 pi u2)

So one Philox call gives the four normals an element needs in any op: perturb uses (z0, z1) as
(eps_x, eps_v) and the HSM loss regenerates z1; a fused SSCS step uses (z0, z1) for its closing half
step and (z2, z3) for the opening one; an EM step uses z0. The inpainting replacement draw of a step op
(``Tensor? obs``, ``cld_fast.conditions``) takes (z0, z1) of tag INPAINT at the op's step, that of
``half_step_`` (the opening of a run) (z2, z3), so the two never share a number. The uniforms are bit-exact across
backends; the normals agree to float32 rounding of log, cos and sin.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

TAG_PERTURB = 0
TAG_HALF_STEP = 1
TAG_SSCS = 2
TAG_AFFINE = 3
TAG_INPAINT = 4

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
SEED_BOUND = 2 ** 62


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and int64 tensors holding uint32."""
    bh = b >> 16
    bl = b & 0xFFFF
    p_lo = a * bl  # < 2^48
    p_hi = a * bh  # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & _MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting); returns four int64 tensors."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) float32 map, bit-exact: int32 view, negatives to ~x, times 2^-31."""
    x = torch.where(r >= 2 ** 31, r - 2 ** 32, r)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Two independent N(0, 1) float32 tensors from two uniform float32 tensors."""
    u1 = torch.clamp(u1, min=1.0e-7)
    th = u2 * torch.tensor(2.0 * math.pi, dtype=torch.float32)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _as_int64(value: Union[int, torch.Tensor], device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64).reshape(())
    return torch.tensor(int(value), dtype=torch.int64, device=device)


def philox_bits(n: int, seed, step=0, tag: int = 0, device=None, start: int = 0):
    """The four uint32 outputs (as int64 tensors of shape (n,)) for element indices start .. start+n-1.

    ``seed`` and ``step`` may be Python ints or 1-element int64 tensors (read on their device, no
    host synchronisation).
    """
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    s = _as_int64(seed, i.device)
    k = _as_int64(step, i.device)
    c0 = i & _MASK32
    c1 = (i >> 32) & _MASK32
    c2 = (k & _MASK32).expand_as(i)
    c3 = torch.full_like(i, int(tag) & _MASK32)
    k0 = (s & _MASK32).expand_as(i)
    k1 = ((s >> 32) & _MASK32).expand_as(i)
    return philox4x32(c0, c1, c2, c3, k0, k1)


def philox_normals(n: int, seed, step=0, tag: int = 0, device=None):
    """(4, n) float32 normals z0..z3 of the contract above for element indices 0 .. n-1."""
    r0, r1, r2, r3 = philox_bits(n, seed, step, tag, device)
    z0, z1 = box_muller(uniform_from_bits(r0), uniform_from_bits(r1))
    z2, z3 = box_muller(uniform_from_bits(r2), uniform_from_bits(r3))
    return torch.stack([z0, z1, z2, z3])


def seed_from_generator(generator: Optional[torch.Generator], device) -> torch.Tensor:
    """A fresh (1,) int64 seed tensor on ``device``, drawn from ``generator`` without a host sync.

    The generator (or the device's default one) advances, so successive calls give new noise and
    re-seeding the generator reproduces a run.
    """
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        seed = torch.randint(0, SEED_BOUND, (1,), generator=generator, device=generator.device)
        return seed.to(device, non_blocking=True)
    return torch.randint(0, SEED_BOUND, (1,), generator=generator, device=device, dtype=torch.int64)
