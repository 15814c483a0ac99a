"""HSM loss, forward (deterministic reduction) and backward (d loss / d out), eps_v regenerated in-kernel.

Per sample b: loss_b = scale * w_b * sum_d (a_b out + c_b v - eps_v)^2, with (c, w, a) computed per
row from t, the CLD parameters and the weighting / objective / output codes
(``coefficients.loss_coefficients``; a = 1 unless the network outputs the score itself). eps_v is the ``eps_v`` tensor
when given, else z1 of the perturb call's draw (same seed, step 0, tag PERTURB, same element index
b * D + d), recomputed from the seed read in-kernel: it is never stored. Arithmetic in the state
dtype (u's); ``out`` may be bf16/fp16. Schemas: ``cld_fast.opdefs`` "hsm_loss_fwd", "hsm_loss_bwd".

Forward reduction: deterministic, no atomics. A program owns a tile of BLOCK_B samples and one
contiguous chunk of D (``iters`` column blocks of BLOCK_D), accumulates the squares elementwise in
a (BLOCK_B, BLOCK_D) register tile in a fixed order, reduces it with ``tl.sum`` (a fixed tree) and
writes scale * w_b * partial. The chunk count depends only on (B, D) and the tile (never on the GPU
model), so every GPU computes the same sums in the same order: enough programs for a large GPU
(TARGET_PROGRAMS) but never more than one per column block. With one program per row block and
``reduction`` 0 the kernel writes the (B,) loss itself; with a single program in all and
``reduction`` 1 it writes the 0-d sum itself; otherwise a second small launch (``_finish_kernel``)
adds the (B, chunks) partials in a fixed order. A one-program-per-sample loop would leave most SMs
idle for the small batches of large images (B = 8 at 256x256x3); atomics would not be reproducible.

Backward: one elementwise pass, d out = 2 (scale w_b grad_b a_b) (a_b out + c_b v - eps_v), in out's dtype;
grad is 0-d (stride 0) or (B,) and read through its stride.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (check_index, check_sde, check_shape, check_state, check_times, device_guard, elementwise_config,
                      gpu_tiles, launch, load_rows, store, tile_coords, tile_grid, to_compute)
from .coefficients import OBJECTIVE_CODES, OUT_MIXED, OUT_SCORE, OUTPUT_CODES, WEIGHTING_CODES, load_sde, loss_coefficients
from .philox import TAG_PERTURB, load_key, normal_z1

# Programs the forward aims for when a row block's D can be split: 4 per SM of the largest GPUs
# (132 SMs on H100/H200) and then some. A constant, so the summation order is GPU-independent.
TARGET_PROGRAMS = 1024
FINISH_BLOCK_B = 32
FINISH_BLOCK_C = 32


def scale_bits(scale: float) -> int:
    """The IEEE-754 bits of ``scale`` as a signed int64: Triton passes Python floats as float32, so
    the exact double goes in as an integer and is bit-cast back in-kernel (``_scale``)."""
    return struct.unpack("<q", struct.pack("<d", float(scale)))[0]


@triton.jit
def _scale(bits, F64: tl.constexpr):
    """The loss scale in the compute dtype from its float64 bits (see ``scale_bits``)."""
    s = (bits + tl.zeros([], tl.int64)).to(tl.float64, bitcast=True)
    if F64:
        return s
    else:
        return s.to(tl.float32)


@triton.jit
def _eps_v(eps_ptr, rows, cols, s_eb, s_ed, mask, D, k0, k1, HAS_EPS: tl.constexpr, F64: tl.constexpr):
    """eps_v of the tile: from the tensor, or z1 of the perturb draw (Philox, step 0)."""
    if HAS_EPS:
        return to_compute(tl.load(eps_ptr + rows * s_eb + cols * s_ed, mask=mask, other=0.0), F64)
    else:
        return to_compute(normal_z1(rows * D + cols, k0, k1, 0, TAG_PERTURB), F64)


@triton.jit
def _residual(o, e, c, a, u_ptr, rows, cols, s_ub, s_us, s_ud, mask, OUTPUT: tl.constexpr, F64: tl.constexpr):
    """a out + c v - eps_v. Only the mixed output has c != 0 (so only it reads v) and only the score
    output a != 1."""
    if OUTPUT == OUT_MIXED:
        v = to_compute(tl.load(u_ptr + rows * s_ub + s_us + cols * s_ud, mask=mask, other=0.0), F64)
        return o + c * v - e
    elif OUTPUT == OUT_SCORE:
        return a * o - e
    else:
        return o - e


@triton.jit(do_not_specialize=["bits"])
def _loss_fwd_kernel(
    out_ptr, u_ptr, t_ptr, sde_ptr, eps_ptr, seed_ptr, part_ptr,
    B, D, iters, chunks, bits,
    s_ob, s_od, s_ub, s_us, s_ud, s_t, s_sde, s_eb, s_ed, s_pb, s_pc,
    WEIGHTING: tl.constexpr, HAS_EPS: tl.constexpr, SUM_ROWS: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, OBJECTIVE: tl.constexpr, OUTPUT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tb = pid // chunks
    chunk = pid - tb * chunks
    rows = (tb * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
    rmask = rows < B
    t = load_rows(t_ptr, rows, s_t, rmask, 1.0)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    c64, w64, a64 = loss_coefficients(t, beta0, beta1, m_inv, gamma, neps, WEIGHTING, OBJECTIVE, OUTPUT)
    c = to_compute(c64, F64)
    w = to_compute(w64, F64) * _scale(bits, F64)
    a = to_compute(a64, F64)
    k0 = 0
    k1 = 0
    if not HAS_EPS:
        k0, k1 = load_key(seed_ptr)
    if F64:
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    col0 = chunk * iters * BLOCK_D
    for it in range(0, iters):
        cols = (col0 + it * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64))[None, :]
        mask = rmask & (cols < D)
        o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
        e = _eps_v(eps_ptr, rows, cols, s_eb, s_ed, mask, D, k0, k1, HAS_EPS, F64)
        r = _residual(o, e, c, a, u_ptr, rows, cols, s_ub, s_us, s_ud, mask, OUTPUT, F64)
        acc += tl.where(mask, r * r, 0.0)
    per_row = w * tl.sum(acc, axis=1)[:, None]
    if SUM_ROWS:  # the only program: write the 0-d sum over samples
        tl.store(part_ptr, tl.sum(tl.sum(tl.where(rmask, per_row, 0.0), axis=1), axis=0))
    else:
        tl.store(part_ptr + rows * s_pb + chunk * s_pc, per_row, mask=rmask)


@triton.jit
def _finish_kernel(part_ptr, loss_ptr, B, chunks, s_pb, s_pc, s_l,
                   SUM_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum (B, chunks) partials over chunks per row (grid over row blocks), or over everything
    (SUM_ROWS, one program), always in the same order."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=part_ptr.dtype.element_ty)
    n_row_blocks = 1
    if SUM_ROWS:
        n_row_blocks = tl.cdiv(B, BLOCK_B)
    for rb in range(0, n_row_blocks):
        rows = ((pid + rb) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))[:, None]
        for c0 in range(0, chunks, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C).to(tl.int64))[None, :]
            mask = (rows < B) & (cols < chunks)
            acc += tl.load(part_ptr + rows * s_pb + cols * s_pc, mask=mask, other=0.0)
    if SUM_ROWS:
        tl.store(loss_ptr, tl.sum(tl.sum(acc, axis=1), axis=0))
    else:
        rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64))
        tl.store(loss_ptr + rows * s_l, tl.sum(acc, axis=1), mask=rows < B)


@triton.jit(do_not_specialize=["bits"])
def _loss_bwd_kernel(
    grad_ptr, out_ptr, u_ptr, t_ptr, sde_ptr, eps_ptr, seed_ptr, dout_ptr,
    B, D, n_col_tiles, bits,
    s_g, s_ob, s_od, s_ub, s_us, s_ud, s_t, s_sde, s_eb, s_ed, s_db, s_dd,
    WEIGHTING: tl.constexpr, HAS_EPS: tl.constexpr, F64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, OBJECTIVE: tl.constexpr, OUTPUT: tl.constexpr,
):
    rows, _, _ = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    rmask = rows < B
    t = load_rows(t_ptr, rows, s_t, rmask, 1.0)
    beta0, beta1, m_inv, gamma, neps = load_sde(sde_ptr, s_sde)
    c64, w64, a64 = loss_coefficients(t, beta0, beta1, m_inv, gamma, neps, WEIGHTING, OBJECTIVE, OUTPUT)
    c = to_compute(c64, F64)
    w = to_compute(w64, F64) * _scale(bits, F64)
    a = to_compute(a64, F64)
    # the columns after the float64 coefficient math, so they are not live across its calls
    rows, cols, mask = tile_coords(tl.program_id(0), n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    g = to_compute(tl.load(grad_ptr + rows * s_g, mask=rmask, other=0.0), F64)
    k0 = 0
    k1 = 0
    if not HAS_EPS:
        k0, k1 = load_key(seed_ptr)
    o = to_compute(tl.load(out_ptr + rows * s_ob + cols * s_od, mask=mask, other=0.0), F64)
    e = _eps_v(eps_ptr, rows, cols, s_eb, s_ed, mask, D, k0, k1, HAS_EPS, F64)
    r = _residual(o, e, c, a, u_ptr, rows, cols, s_ub, s_us, s_ud, mask, OUTPUT, F64)
    factor = 2.0 * (w * g)
    if OUTPUT == OUT_SCORE:
        factor = factor * a
    store(dout_ptr + rows * s_db + cols * s_dd, factor * r, mask)


def _check(out, u, t, sde, weighting, eps_v, seed, objective, output):
    B, D = check_state(u, "u")
    check_shape(out, (B, D), "out")
    check_times(t, B)
    check_sde(sde)
    for name, code, codes in (("weighting", weighting, WEIGHTING_CODES), ("objective", objective, OBJECTIVE_CODES),
                              ("output", output, OUTPUT_CODES)):
        if code not in codes.values():
            raise ValueError(f"triton backend: {name} must be one of {codes}, got {code}")
    if eps_v is not None:
        check_shape(eps_v, (B, D), "eps_v")
    elif seed is None:
        raise ValueError("triton backend: hsm_loss needs eps_v or seed")
    else:
        check_index(seed, "seed")
    return B, D


def loss_config(B: int, D: int, device: torch.device, block_b=None, block_d=None, chunks=None, philox=False):
    """(BLOCK_B, BLOCK_D, iters, chunks, num_warps) of the forward reduction; depends on (B, D) and
    the tile only (``block_b``, ``block_d``, ``chunks`` override for tests)."""
    bb, bd, warps = elementwise_config(B, D, device, block_b, block_d, philox)
    n_col = triton.cdiv(D, bd)
    row_tiles = triton.cdiv(B, bb)
    if chunks is None:
        chunks = triton.cdiv(TARGET_PROGRAMS, row_tiles) if gpu_tiles(device) else 1
    chunks = max(1, min(int(chunks), n_col))
    iters = triton.cdiv(n_col, chunks)
    chunks = triton.cdiv(n_col, iters)
    return int(bb), int(bd), int(iters), int(chunks), warps


def hsm_loss_fwd(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: torch.Tensor, weighting: int,
                 scale: float, reduction: int, eps_v: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                 objective: int = 0, output: int = 0, block_b: Optional[int] = None, block_d: Optional[int] = None,
                 chunks: Optional[int] = None) -> torch.Tensor:
    """scale * w(t) * sum_d (a(t) out + c(t) v - eps_v)^2 (opdefs "hsm_loss_fwd").

    Args:
        out: (B, D) network output; u: (B, 2, D) state (float32/float64, the result's dtype).
        t: (B,) times; sde: (5,) float64 parameters; weighting: 0 reweightedv2, 1 likelihood, 2 reweightedv1.
        scale: multiplies every sample's loss; reduction: 0 -> (B,), 1 -> 0-d sum over samples.
        eps_v: (B, D) target noise, or None with ``seed`` (1,) int64: z1 of the perturb draw.
        objective, output: codes of ``cld_fast.sde.OBJECTIVE_CODES`` / ``OUTPUT_CODES``.
        block_b, block_d, chunks: tile and split override (tests).
    """
    B, D = _check(out, u, t, sde, weighting, eps_v, seed, objective, output)
    if reduction not in (0, 1):
        raise ValueError(f"triton backend: reduction must be 0 (per sample) or 1 (sum), got {reduction}")
    shape = () if reduction == 1 else (B,)
    if B * D == 0:
        return torch.zeros(shape, dtype=u.dtype, device=u.device)
    bb, bd, iters, nch, warps = loss_config(B, D, u.device, block_b, block_d, chunks, philox=eps_v is None)
    row_tiles = triton.cdiv(B, bb)
    one_program = row_tiles * nch == 1
    loss = torch.empty(shape, dtype=u.dtype, device=u.device)
    if reduction == 0 and nch == 1:
        part, sp = loss, (loss.stride(0), 0)
    elif reduction == 1 and one_program:
        part, sp = loss, (0, 0)
    else:
        part = torch.empty(B, nch, dtype=u.dtype, device=u.device)
        sp = part.stride()
    es = eps_v.stride() if eps_v is not None else (0, 0)
    with device_guard(u.device):
        launch(_loss_fwd_kernel, (row_tiles * nch,),
               out, u, t, sde, eps_v if eps_v is not None else out, seed if seed is not None else sde, part,
               B, D, iters, nch, scale_bits(scale),
               out.stride(0), out.stride(1), u.stride(0), u.stride(1), u.stride(2), t.stride(0), sde.stride(0),
               es[0], es[1], sp[0], sp[1],
               WEIGHTING=int(weighting), HAS_EPS=eps_v is not None, SUM_ROWS=reduction == 1 and one_program,
               F64=u.dtype == torch.float64, BLOCK_B=bb, BLOCK_D=bd, OBJECTIVE=int(objective), OUTPUT=int(output),
               num_warps=warps)
        if part is not loss:
            sum_rows = reduction == 1
            grid = (1,) if sum_rows else (triton.cdiv(B, FINISH_BLOCK_B),)
            launch(_finish_kernel, grid, part, loss, B, nch, part.stride(0), part.stride(1),
                   loss.stride(0) if loss.dim() else 0,
                   SUM_ROWS=sum_rows, BLOCK_B=FINISH_BLOCK_B, BLOCK_C=FINISH_BLOCK_C,
                   num_warps=4 if gpu_tiles(u.device) else 1)
    return loss


def hsm_loss_bwd(grad: torch.Tensor, out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: torch.Tensor,
                 weighting: int, scale: float, eps_v: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                 objective: int = 0, output: int = 0, block_b: Optional[int] = None,
                 block_d: Optional[int] = None) -> torch.Tensor:
    """d loss / d out = 2 scale w grad a (a out + c v - eps_v): (B, D) in out's dtype (opdefs "hsm_loss_bwd").

    ``grad`` is the 0-d gradient of a summed loss or the (B,) gradient of per-sample losses, any
    float dtype, read through its stride (0 for 0-d). Other arguments as ``hsm_loss_fwd``.
    """
    B, D = _check(out, u, t, sde, weighting, eps_v, seed, objective, output)
    if grad.dim() > 1 or (grad.dim() == 1 and grad.shape[0] != B):
        raise ValueError(f"triton backend: grad must be 0-d or ({B},), got {tuple(grad.shape)}")
    dout = torch.empty(B, D, dtype=out.dtype, device=out.device)
    if B * D == 0:
        return dout
    bb, bd, warps = elementwise_config(B, D, u.device, block_b, block_d, philox=eps_v is None)
    n_col, grid = tile_grid(B, D, bb, bd)
    es = eps_v.stride() if eps_v is not None else (0, 0)
    with device_guard(u.device):
        launch(_loss_bwd_kernel, grid,
               grad, out, u, t, sde, eps_v if eps_v is not None else out, seed if seed is not None else sde, dout,
               B, D, n_col, scale_bits(scale),
               grad.stride(0) if grad.dim() else 0, out.stride(0), out.stride(1), u.stride(0), u.stride(1),
               u.stride(2), t.stride(0), sde.stride(0), es[0], es[1], dout.stride(0), dout.stride(1),
               WEIGHTING=int(weighting), HAS_EPS=eps_v is not None, F64=u.dtype == torch.float64,
               BLOCK_B=bb, BLOCK_D=bd, OBJECTIVE=int(objective), OUTPUT=int(output), num_warps=warps)
    return dout


def hsm_loss_fwd_grad(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: torch.Tensor, weighting: int,
                      scale: float, reduction: int, eps_v: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      objective: int, output: int, grad_out: torch.Tensor) -> torch.Tensor:
    """The loss of ``hsm_loss_fwd`` and, into ``grad_out`` (B, D), ``hsm_loss_bwd`` for grad = 1
    (opdefs "hsm_loss_fwd_grad"): the two kernels. On a GPU regenerating eps_v costs no memory
    traffic, so ``cld_fast.hsm_loss`` keeps the forward/backward split there (docs/kernels.md)."""
    loss = hsm_loss_fwd(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output)
    one = torch.ones((), dtype=u.dtype, device=u.device)
    grad_out.copy_(hsm_loss_bwd(one, out, u, t, sde, weighting, scale, eps_v, seed, objective, output))
    return loss


def aot_variants(B: int, D: int, empty):
    """(label, thunk) for every compiled variant of ``hsm_loss_fwd`` / ``hsm_loss_bwd`` at (B, D)
    (bench/aot_compile.py). The objective / output modes other than (hsm, mixed) only change the
    per-row float64 coefficients: they are compiled with the likelihood weighting (the most
    coefficient math) and the float32 state."""
    sde, t, seed = empty(5, dtype=torch.float64), empty(B), empty(1, dtype=torch.int64)
    modes = [(w, 0, 0) for w in (0, 1, 2)]
    extra = [(1, obj, outp) for obj in (0, 1) for outp in (0, 1, 2) if (obj, outp) != (0, 0)]
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u = empty(B, 2, D, dtype=sd)
        for out_dtype in (sd, torch.bfloat16):
            out, on = empty(B, D, dtype=out_dtype), str(out_dtype).replace("torch.", "")
            for noise, eps_v, q in (("eps", empty(B, D, dtype=sd), None), ("seed", None, seed)):
                for weighting, obj, outp in modes + (extra if sd == torch.float32 else []):
                    m = f"w={weighting} obj={obj} output={outp}"
                    for reduction in (0, 1):
                        yield (f"hsm_loss_fwd {s} out={on} {m} red={reduction} {noise}",
                               lambda o=out, w=weighting, r=reduction, e=eps_v, q=q, u=u, ob=obj, op=outp:
                               hsm_loss_fwd(o, u, t, sde, w, 0.5, r, e, q, ob, op))
                    yield (f"hsm_loss_bwd {s} out={on} {m} {noise}",
                           lambda o=out, w=weighting, e=eps_v, q=q, u=u, sd=sd, ob=obj, op=outp: hsm_loss_bwd(
                               empty((), dtype=sd), o, u, t, sde, w, 0.5, e, q, ob, op))

    # hsm_loss_fwd_grad launches the two kernels above; one call checks that the composition traces
    u32 = empty(B, 2, D, dtype=torch.float32)
    yield ("hsm_loss_fwd_grad float32 out=float32 w=0 seed (the hsm_loss_fwd and hsm_loss_bwd kernels)",
           lambda: hsm_loss_fwd_grad(empty(B, D), u32, t, sde, 0, 0.5, 1, None, seed, 0, 0, empty(B, D)))
