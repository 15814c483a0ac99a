"""In-kernel noise of the ``cld_fast.philox`` contract, as @triton.jit helpers.

For element pair i (flat index b * D + d of the (B, D) view of x), seed s, step k and op tag T:

    key     = (lo32(s), hi32(s))
    counter = (lo32(i), hi32(i), lo32(k), T)
    r0..r3  = Philox4x32-10(counter, key)
    uniform = float32(int32(r) if >= 0 else ~int32(r)) * 4.6566127342e-10        (Triton's rule)
    (z0, z1) = BoxMuller(uniform(r0), uniform(r1)); (z2, z3) = BoxMuller(uniform(r2), uniform(r3))

Philox is written out here from ``tl.umulhi`` (the same rounds as ``tl.philox``, which the tests
check bit for bit) instead of calling ``tl.randint4x``, whose handling of 64-bit offsets differs
between Triton versions; only APIs present in Triton 3.6 are used. The seed and the step are read
from (1,) int64 device tensors inside the kernel, so no launch needs a host synchronisation.
Box-Muller takes the square root with ``tl.sqrt_rn`` (IEEE round-to-nearest, present in Triton 3.6
and 3.9): ``tl.sqrt`` compiles to ``sqrt.approx.ftz.f32``, an ulp away from the CPU and CUDA draws.

Launchers at the end (``philox_bits``, ``philox_normals``) dump the raw words / normals for element
indices start .. start + n - 1; they exist for tests and for cross-backend bit comparisons.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, launch

PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
TWO_PI = tl.constexpr(6.283185307179586)

# Op tags (counter word c3), as cld_fast.philox.TAG_*; checked by tests/test_coefficients.py.
TAGS = {"perturb": 0, "half_step": 1, "sscs": 2, "affine": 3, "inpaint": 4}
TAG_PERTURB = tl.constexpr(TAGS["perturb"])
TAG_HALF_STEP = tl.constexpr(TAGS["half_step"])
TAG_SSCS = tl.constexpr(TAGS["sscs"])
TAG_AFFINE = tl.constexpr(TAGS["affine"])
TAG_INPAINT = tl.constexpr(TAGS["inpaint"])


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten rounds of Philox4x32 on uint32 blocks (counter c0..c3, key k0, k1); four uint32 blocks."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = PHILOX_ROUND_B * _c2
        c3 = PHILOX_ROUND_A * _c0
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def load_key(seed_ptr):
    """(k0, k1) uint32 scalars: low and high 32-bit words of the int64 seed at ``seed_ptr``."""
    s = tl.load(seed_ptr).to(tl.int64)
    k0 = s.to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    return k0, k1


@triton.jit
def load_word(step_ptr):
    """lo32 of the int64 value at ``step_ptr`` as a uint32 scalar (the counter word c2)."""
    k = tl.load(step_ptr).to(tl.int64)
    return k.to(tl.uint32)


@triton.jit
def philox_words(idx, k0, k1, c2, TAG: tl.constexpr):
    """r0..r3 (uint32) for int64 element indices ``idx`` (any block shape)."""
    idx = idx.to(tl.int64)
    c0 = idx.to(tl.uint32)
    c1 = (idx >> 32).to(tl.uint32)
    zero = c0 * 0
    c2b = zero + c2
    c3b = zero + TAG
    return philox4x32_10(c0, c1, c2b, c3b, zero + k0, zero + k1)


@triton.jit
def uniform(r):
    """Triton's uint32 -> [0, 1) float32 rule, bit-exact."""
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def _radius(u1):
    """sqrt(-2 log max(u1, 1e-7)), correctly rounded square root."""
    return tl.sqrt_rn(-2.0 * tl.log(tl.maximum(1.0e-7, u1)))


@triton.jit
def box_muller(u1, u2):
    """Two N(0, 1) float32 blocks from two uniform float32 blocks (Triton's Box-Muller)."""
    r = _radius(u1)
    th = u2 * TWO_PI
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def normals4(idx, k0, k1, c2, TAG: tl.constexpr):
    """z0, z1, z2, z3 (float32) of the contract for element indices ``idx``."""
    r0, r1, r2, r3 = philox_words(idx, k0, k1, c2, TAG)
    z0, z1 = box_muller(uniform(r0), uniform(r1))
    z2, z3 = box_muller(uniform(r2), uniform(r3))
    return z0, z1, z2, z3


@triton.jit
def normals2(idx, k0, k1, c2, TAG: tl.constexpr):
    """z0, z1 (float32) of the contract (the r2, r3 words are not transformed)."""
    r0, r1, r2, r3 = philox_words(idx, k0, k1, c2, TAG)
    return box_muller(uniform(r0), uniform(r1))


@triton.jit
def normal_z0(idx, k0, k1, c2, TAG: tl.constexpr):
    """z0 alone (the cosine branch of the first pair)."""
    r0, r1, r2, r3 = philox_words(idx, k0, k1, c2, TAG)
    return _radius(uniform(r0)) * tl.cos(uniform(r1) * TWO_PI)


@triton.jit
def normal_z1(idx, k0, k1, c2, TAG: tl.constexpr):
    """z1 alone (the sine branch of the first pair): the eps_v of a perturb draw."""
    r0, r1, r2, r3 = philox_words(idx, k0, k1, c2, TAG)
    return _radius(uniform(r0)) * tl.sin(uniform(r1) * TWO_PI)


# ---- debug / cross-check kernels -------------------------------------------------------------


@triton.jit
def _philox_dump_kernel(seed_ptr, step_ptr, out_ptr, n, start, TAG: tl.constexpr,
                        NORMALS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n
    idx = start + j
    k0, k1 = load_key(seed_ptr)
    c2 = load_word(step_ptr)
    if NORMALS:
        z0, z1, z2, z3 = normals4(idx, k0, k1, c2, TAG)
        tl.store(out_ptr + j, z0, mask=mask)
        tl.store(out_ptr + n + j, z1, mask=mask)
        tl.store(out_ptr + 2 * n + j, z2, mask=mask)
        tl.store(out_ptr + 3 * n + j, z3, mask=mask)
    else:
        r0, r1, r2, r3 = philox_words(idx, k0, k1, c2, TAG)
        tl.store(out_ptr + j, r0.to(tl.int64), mask=mask)
        tl.store(out_ptr + n + j, r1.to(tl.int64), mask=mask)
        tl.store(out_ptr + 2 * n + j, r2.to(tl.int64), mask=mask)
        tl.store(out_ptr + 3 * n + j, r3.to(tl.int64), mask=mask)


def _dump(n, seed, step, tag, start, normals):
    device = seed.device
    if step is None:
        step = torch.zeros(1, dtype=torch.int64, device=device)
    out = torch.empty(4, n, dtype=torch.float32 if normals else torch.int64, device=device)
    if n == 0:
        return out
    block = 1024
    with device_guard(device):
        launch(_philox_dump_kernel, (triton.cdiv(n, block),), seed, step, out, n, int(start), TAG=int(tag),
               NORMALS=bool(normals), BLOCK=block)
    return out


def philox_bits(n: int, seed: torch.Tensor, step: torch.Tensor = None, tag: int = 0, start: int = 0):
    """(4, n) int64 tensor of the uint32 words r0..r3 for element indices start .. start + n - 1."""
    return _dump(n, seed, step, tag, start, normals=False)


def philox_normals(n: int, seed: torch.Tensor, step: torch.Tensor = None, tag: int = 0, start: int = 0):
    """(4, n) float32 normals z0..z3 of the contract for element indices start .. start + n - 1."""
    return _dump(n, seed, step, tag, start, normals=True)
