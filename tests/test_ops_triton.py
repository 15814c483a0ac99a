"""Triton backend vs the torch reference backend.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before Triton
is imported) on CPU tensors, so sizes are kept small. With CUDA they run compiled on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from cld_fast import philox  # noqa: E402
from cld_fast.backends import torch_backend as R  # noqa: E402
from cld_fast.backends import triton_backend as T  # noqa: E402
from cld_fast.sde import CLD  # noqa: E402

# Triton decides interpreter vs compiled when a kernel is defined. If an earlier test module imported
# the backend before TRITON_INTERPRET was set (CPU only), this process cannot run the kernels: then
# the whole file is re-run in a fresh process (test_rerun_in_fresh_process) and the rest skip here.
_RERUN = (not T.is_available() and not T._IMPORT_ERROR and not torch.cuda.is_available()
          and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CLD_FAST_TRITON_RERUN") != "1")
if not T.is_available() and not _RERUN:
    pytest.skip(f"triton backend unavailable: {T.why_unavailable()}", allow_module_level=True)

from cld_fast.triton_kernels import _common, hsm_loss as tk_loss, perturb as tk_perturb  # noqa: E402
from cld_fast.triton_kernels import philox as tk_philox, sampler_steps as tk_steps  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _only_rerun_when_kernels_are_compiled_for_no_device(request):
    if _RERUN and request.node.originalname != "test_rerun_in_fresh_process":
        pytest.skip("kernels were defined before TRITON_INTERPRET=1; covered by test_rerun_in_fresh_process")


@pytest.mark.skipif(not _RERUN, reason="only when this process cannot run the kernels")
def test_rerun_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CLD_FAST_TRITON_RERUN="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


SDE = CLD()
SHAPES = [(1, 1), (3, 7), (1, 33), (3, 257)]
RTOL = 1e-6


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float32).to(device=DEV, dtype=dtype)


def _times(B, seed=0):
    return (0.05 + 0.9 * torch.rand(B, generator=_gen(seed + 100), dtype=torch.float64)).to(DEV)


def _seed(value=0x1234_5678_9ABC):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def _close(actual, expected, rtol=RTOL, atol_scale=None):
    """|a - e| <= rtol * (|e| + max|e|·1e-1): relative, with a floor for entries near zero."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    floor = (atol_scale if atol_scale is not None else 0.1 * float(e.abs().max()) + 1e-30)
    err = (a - e).abs()
    bound = rtol * (e.abs() + floor)
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3e}, max rel {float((err / (e.abs() + floor)).max()):.3e}"


def _tables(steps=5):
    ts = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64, device=DEV)
    sscs = SDE.sscs_table(ts, mixed=True)
    half = SDE.half_step_coefficients(ts[:-1], 0.5 * (ts[:-1] - ts[1:]))
    mix = SDE.mixed_score_coefficients(ts[:-1])
    affine = SDE.reverse_affine_coefficients(ts[:-1], ts[:-1] - ts[1:], "em", mixed=mix)
    return sscs, half, affine


# ---- backend plumbing ----------------------------------------------------------------------


def test_backend_contract():
    assert T.NAME == "triton"
    assert T.is_available() and T.why_unavailable() == ""
    assert T.supports(DEV, torch.float32)
    assert not T.supports(DEV, torch.float16)
    assert T.REGISTRATION in ("triton_op", "custom_op")
    for name in ("perturb", "hsm_loss_fwd", "hsm_loss_bwd", "mixed_score", "half_step", "sscs_step", "affine_step"):
        assert hasattr(torch.ops.cld_fast_triton, name)
    from cld_fast import backends

    assert backends.select(DEV, torch.float32, backend="triton") is T


# ---- Philox --------------------------------------------------------------------------------


@triton.jit
def _tl_philox_kernel(seed, step, out_ptr, n, start, TAG: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    i = start + j
    c0 = i.to(tl.uint32)
    c1 = (i >> 32).to(tl.uint32)
    c2 = c0 * 0 + step.to(tl.uint32)
    c3 = c0 * 0 + TAG
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    m = j < n
    tl.store(out_ptr + j, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + n + j, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 2 * n + j, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 3 * n + j, r3.to(tl.int64), mask=m)


@pytest.mark.parametrize("start", [0, 2**32 - 100])
def test_philox_bits_match_reference_and_tl_philox(start):
    n, s, k, tag = 300, 0x0123_4567_89AB_CDEF, 11, 2
    seed, step = _seed(s), torch.tensor([k], dtype=torch.int64, device=DEV)
    bits = tk_philox.philox_bits(n, seed, step, tag=tag, start=start)
    ref = torch.stack(philox.philox_bits(n, seed, step, tag, start=start))
    assert torch.equal(bits.cpu(), ref.cpu())
    out = torch.empty(4, n, dtype=torch.int64, device=DEV)
    _tl_philox_kernel[(triton.cdiv(n, 128),)](s, k, out, n, start, TAG=tag, BLOCK=128)
    assert torch.equal(bits.cpu(), out.cpu())


def test_philox_normals_close_to_reference():
    seed, step = _seed(77), torch.tensor([3], dtype=torch.int64, device=DEV)
    z = tk_philox.philox_normals(2000, seed, step, tag=1)
    zr = philox.philox_normals(2000, seed, step, 1)
    assert (z.cpu() - zr.cpu()).abs().max() < 1e-5 * max(1.0, float(zr.abs().max()))


# ---- 64-bit indexing -----------------------------------------------------------------------


@triton.jit
def _index_probe_kernel(pid, n_col_tiles, B, D, stride_b, out_ptr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, mask = _common.tile_coords(pid, n_col_tiles, B, D, BLOCK_B, BLOCK_D)
    flat = rows * D + cols
    off = rows * stride_b + cols
    k = tl.arange(0, BLOCK_B)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    n = BLOCK_B * BLOCK_D
    tl.store(out_ptr + k, flat)
    tl.store(out_ptr + n + k, off)
    tl.store(out_ptr + 2 * n + k, mask.to(tl.int64))
    tl.store(out_ptr + 3 * n + k, (flat >> 32) + rows * 0)


def test_tile_index_is_64_bit():
    """Offsets of a tile far beyond 2^31 programs / 2^32 elements, without allocating them."""
    BB, BD = 2, 16
    B, D = 3 * 2**31 + 5, 3 * 2**20 + 7  # B * 2 * D ~ 4e16
    n_col, grid = _common.tile_grid(B, D, BB, BD)
    assert grid[0] == n_col * math.ceil(B / BB) and grid[0] > 2**31
    pid = grid[0] - 1  # the very last tile: partial in rows and columns
    out = torch.empty(4, BB, BD, dtype=torch.int64, device=DEV)
    _index_probe_kernel[(1,)](pid, n_col, B, D, 2 * D, out, BLOCK_B=BB, BLOCK_D=BD)
    out = out.cpu()
    tb, td = divmod(pid, n_col)
    for r in range(BB):
        for c in range(BD):
            row, col = tb * BB + r, td * BD + c
            assert int(out[0, r, c]) == row * D + col
            assert int(out[1, r, c]) == row * 2 * D + col
            assert int(out[2, r, c]) == int(row < B and col < D)
            assert int(out[3, r, c]) == (row * D + col) >> 32


# ---- perturb -------------------------------------------------------------------------------


@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("dsm", [False, True])
def test_perturb_eps_exact(B, D, dsm):
    t = _times(B, seed=D)
    coef = SDE.perturbation_kernel(t, "dsm" if dsm else "hsm").table()
    x0, eps = _randn(B, D, seed=1), _randn(B, 2, D, seed=2)
    v0 = _randn(B, D, seed=3) if dsm else None
    # ``out`` is the x/v part of a wider (B, 3, D) buffer: strided batch dimension.
    buf = torch.full((B, 3, D), 7.0, device=DEV)
    T.perturb(x0, coef, buf[:, :2], eps=eps, v0=v0)
    ref = R.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), eps=eps, v0=v0)
    _close(buf[:, :2], ref)
    assert bool((buf[:, 2] == 7.0).all())


def test_perturb_partial_tiles_and_network_buffer():
    """D not a multiple of BLOCK_D, several row tiles; out a view of the (B, 2C, H, W) buffer."""
    B, C, H, W = 3, 2, 11, 6  # D = 132
    D = C * H * W
    t = _times(B)
    coef = SDE.perturbation_kernel(t).table()
    x0, eps = _randn(B, C, H, W, seed=4), _randn(B, 2, D, seed=5)
    buf = torch.zeros(B, 2 * C, H, W, device=DEV)
    tk_perturb.perturb(x0.reshape(B, D), coef, buf.view(B, 2, D), eps=eps, block_b=2, block_d=32)
    ref = R.perturb(x0.reshape(B, D), coef, torch.empty(B, 2, D, device=DEV), eps=eps)
    _close(buf.view(B, 2, D), ref)


@pytest.mark.parametrize("B,D", [(3, 257), (1, 7)])
def test_perturb_seed_mode(B, D):
    coef = SDE.perturbation_kernel(_times(B)).table()
    x0 = _randn(B, D, seed=6)
    a = T.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed(99))
    b = T.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed(99))
    c = T.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed(100))
    ref = R.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed(99))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    _close(a, ref, rtol=1e-5)


def test_perturb_noise_moments():
    """In-kernel noise has the analytic covariance of sde.perturbation_kernel (5 standard errors)."""
    B, D = 4, 4096
    t = torch.tensor([0.02, 0.1, 0.4, 1.0], dtype=torch.float64, device=DEV)
    k = SDE.perturbation_kernel(t)
    x0 = _randn(B, D, seed=8)
    u = T.perturb(x0, k.table(), torch.empty(B, 2, D, device=DEV), seed=_seed(2024)).double().cpu()
    x0d = x0.double().cpu()
    rx = u[:, 0] - k.a_xx.cpu()[:, None] * x0d
    rv = u[:, 1] - k.a_vx.cpu()[:, None] * x0d
    sxx, sxv, svv = k.s_xx.cpu(), k.s_xv.cpu(), k.s_vv.cpu()
    for b in range(B):
        assert abs(rx[b].mean()) < 5 * math.sqrt(sxx[b] / D)
        assert abs(rv[b].mean()) < 5 * math.sqrt(svv[b] / D)
        assert abs(rx[b].pow(2).mean() - sxx[b]) < 5 * sxx[b] * math.sqrt(2 / D)
        assert abs(rv[b].pow(2).mean() - svv[b]) < 5 * svv[b] * math.sqrt(2 / D)
        assert abs((rx[b] * rv[b]).mean() - sxv[b]) < 5 * math.sqrt((sxx[b] * svv[b] + sxv[b] ** 2) / D)


def test_perturb_float64_state():
    B, D = 3, 33
    coef = SDE.perturbation_kernel(_times(B)).table()
    x0, eps = _randn(B, D, seed=9, dtype=torch.float64), _randn(B, 2, D, seed=10, dtype=torch.float64)
    a = T.perturb(x0, coef, torch.empty(B, 2, D, device=DEV, dtype=torch.float64), eps=eps)
    b = R.perturb(x0, coef, torch.empty(B, 2, D, device=DEV, dtype=torch.float64), eps=eps)
    _close(a, b, rtol=1e-12)


# ---- HSM loss ------------------------------------------------------------------------------


def _loss_inputs(B, D, weighting="likelihood", dtype=torch.float32, seed=0):
    t = _times(B, seed=seed)
    coef = SDE.loss_coefficients(t, weighting)
    u = _randn(B, 2, D, seed=seed + 1)
    out = _randn(B, D, seed=seed + 2, dtype=dtype)
    eps_v = _randn(B, D, seed=seed + 3)
    return out, u, coef, eps_v


@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood"])
def test_hsm_loss_fwd_bwd_eps_exact(B, D, weighting):
    out, u, coef, eps_v = _loss_inputs(B, D, weighting, seed=D)
    _close(T.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v))
    g = _randn(B, seed=5)
    _close(T.hsm_loss_bwd(g, out, u, coef, eps_v=eps_v), R.hsm_loss_bwd(g, out, u, coef, eps_v=eps_v))


def test_hsm_loss_seed_mode_matches_perturb_draw():
    B, D = 3, 257
    out, u, coef, _ = _loss_inputs(B, D)
    seed = _seed(31337)
    a = T.hsm_loss_fwd(out, u, coef, seed=seed)
    assert torch.equal(a, T.hsm_loss_fwd(out, u, coef, seed=seed))
    _close(a, R.hsm_loss_fwd(out, u, coef, seed=seed), rtol=1e-5)
    # eps_v regenerated in-kernel is z1 of the perturb draw with the same seed.
    z1 = philox.philox_normals(B * D, seed, 0, philox.TAG_PERTURB)[1].view(B, D).to(DEV)
    _close(a, T.hsm_loss_fwd(out, u, coef, eps_v=z1), rtol=1e-5)
    g = _randn(B, seed=6)
    _close(T.hsm_loss_bwd(g, out, u, coef, seed=seed), R.hsm_loss_bwd(g, out, u, coef, seed=seed), rtol=1e-5)


def test_hsm_loss_chunked_reduction_deterministic():
    """The multi-chunk (partials + sum) path equals the one-chunk path and repeats bit for bit."""
    B, D = 3, 257
    out, u, coef, eps_v = _loss_inputs(B, D)
    one = tk_loss.hsm_loss_fwd(out, u, coef, eps_v=eps_v, block_b=2, block_d=32, chunks=1)
    many = tk_loss.hsm_loss_fwd(out, u, coef, eps_v=eps_v, block_b=2, block_d=32, chunks=3)
    assert tk_loss.loss_config(B, D, DEV, 2, 32, 3)[3] == 3
    _close(many, one)
    _close(many, R.hsm_loss_fwd(out, u, coef, eps_v=eps_v))
    assert torch.equal(many, tk_loss.hsm_loss_fwd(out, u, coef, eps_v=eps_v, block_b=2, block_d=32, chunks=3))
    seeded = tk_loss.hsm_loss_fwd(out, u, coef, seed=_seed(5), block_b=2, block_d=32, chunks=4)
    _close(seeded, R.hsm_loss_fwd(out, u, coef, seed=_seed(5)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hsm_loss_half_precision_out(dtype):
    B, D = 3, 33
    out, u, coef, eps_v = _loss_inputs(B, D, dtype=dtype)
    _close(T.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), rtol=1e-2)
    g = _randn(B, seed=7)
    d = T.hsm_loss_bwd(g, out, u, coef, eps_v=eps_v)
    assert d.dtype == dtype and d.shape == (B, D)
    _close(d, R.hsm_loss_bwd(g, out, u, coef, eps_v=eps_v), rtol=1e-2)


@pytest.mark.parametrize("mode", ["eps", "seed"])
def test_hsm_loss_bwd_matches_autograd(mode):
    B, D = 3, 33
    out, u, coef, eps_v = _loss_inputs(B, D)
    kw = dict(eps_v=eps_v) if mode == "eps" else dict(seed=_seed(4))
    leaf = out.clone().requires_grad_(True)
    loss = R.hsm_loss_fwd(leaf, u, coef, **kw)
    g = _randn(B, seed=8)
    (ref,) = torch.autograd.grad(loss, leaf, g)
    _close(T.hsm_loss_bwd(g, out, u, coef, **kw), ref, rtol=1e-5)
    # the gradient of loss.mean(): an expanded (stride-0) grad tensor
    (ref,) = torch.autograd.grad(R.hsm_loss_fwd(leaf, u, coef, **kw).mean(), leaf)
    gm = torch.full((), 1.0 / B, device=DEV).expand(B)
    _close(T.hsm_loss_bwd(gm, out, u, coef, **kw), ref, rtol=1e-5)


# ---- mixed score ---------------------------------------------------------------------------


@pytest.mark.parametrize("B,D", SHAPES)
def test_mixed_score(B, D):
    coef = SDE.mixed_score_coefficients(_times(B))
    u, out = _randn(B, 2, D, seed=1), _randn(B, D, seed=2)
    _close(T.mixed_score(out, u, coef), R.mixed_score(out, u, coef))
    ob = out.to(torch.bfloat16)
    s = T.mixed_score(ob, u, coef)
    assert s.dtype == torch.float32
    _close(s, R.mixed_score(out, u, coef), rtol=1e-2)


# ---- sampler steps -------------------------------------------------------------------------


@pytest.mark.parametrize("B,D", SHAPES)
def test_sampler_steps_eps_exact(B, D):
    sscs, half, affine = _tables()
    step = torch.tensor([3], dtype=torch.int64, device=DEV)
    u, y = _randn(B, 2, D, seed=1), _randn(B, D, seed=2)
    e4 = _randn(B, 4, D, seed=3)
    _close(T.sscs_step_(u.clone(), y, sscs, step, eps=e4), R.sscs_step_(u.clone(), y, sscs, step, eps=e4))
    _close(T.sscs_step_(u.clone(), y, sscs, step), R.sscs_step_(u.clone(), y, sscs, step))
    e2 = e4[:, 1:3]  # a strided (B, 2, D) view
    _close(T.half_step_(u.clone(), half, step, eps=e2), R.half_step_(u.clone(), half, step, eps=e2))
    _close(T.half_step_(u.clone(), half, step), R.half_step_(u.clone(), half, step))
    e1 = e4[:, 2]
    ref = R.affine_step(u.clone(), y, affine, step, torch.empty_like(u), eps=e1)
    _close(T.affine_step(u, y, affine, step, torch.empty_like(u), eps=e1), ref)  # out of place
    u0 = u.clone()
    T.affine_step(u, y, affine, step, torch.empty_like(u))
    assert torch.equal(u, u0)  # u untouched by an out-of-place step
    uu = u.clone()
    assert T.affine_step(uu, y, affine, step, uu, eps=e1) is uu  # in place
    _close(uu, ref)


@pytest.mark.parametrize("B,D", [(3, 257), (1, 33)])
def test_sampler_steps_seed_mode(B, D):
    sscs, half, affine = _tables()
    step = torch.tensor([2], dtype=torch.int64, device=DEV)
    u, y = _randn(B, 2, D, seed=4), _randn(B, D, seed=5)
    for name, args in (("sscs_step_", (y, sscs)), ("half_step_", (half,)), ("affine_step", (y, affine))):
        n_out = 1 if name == "affine_step" else 0  # affine_step's ``out``: a fresh tensor per call

        def call(be, step_):
            return getattr(be, name)(u.clone(), *args, step_, *[torch.empty_like(u)] * n_out, seed=_seed(42))

        a, b, r = call(T, step), call(T, step), call(R, step)
        assert torch.equal(a, b), name
        _close(a, r, rtol=1e-5)
        c = call(T, torch.tensor([1], dtype=torch.int64, device=DEV))  # another row and Philox counter
        assert not torch.equal(a, c), name


def test_step_tensor_is_read_in_kernel():
    """A loop that advances the step tensor on the device walks the table rows (and noise)."""
    B, D = 3, 33
    sscs, _, _ = _tables()
    u, y = _randn(B, 2, D, seed=6), _randn(B, D, seed=7)
    a, b = u.clone(), u.clone()
    step = torch.zeros(1, dtype=torch.int64, device=DEV)
    for i in range(sscs.shape[0]):
        T.sscs_step_(a, y, sscs, step, seed=_seed(1))
        R.sscs_step_(b, y, sscs, torch.tensor([i], device=DEV), seed=_seed(1))
        step += 1
    _close(a, b, rtol=1e-4)


def test_sampler_steps_partial_tiles_and_half_precision_y():
    B, D = 3, 257
    sscs, _, affine = _tables()
    step = torch.tensor([4], dtype=torch.int64, device=DEV)
    u, y, e4 = _randn(B, 2, D, seed=8), _randn(B, D, seed=9), _randn(B, 4, D, seed=10)
    a = tk_steps.sscs_step_(u.clone(), y, sscs, step, eps=e4, block_b=2, block_d=64)
    _close(a, R.sscs_step_(u.clone(), y, sscs, step, eps=e4))
    for dtype in (torch.bfloat16, torch.float16):
        yh = y.to(dtype)
        _close(T.sscs_step_(u.clone(), yh, sscs, step, eps=e4), R.sscs_step_(u.clone(), y, sscs, step, eps=e4), rtol=1e-2)
        _close(T.affine_step(u, yh, affine, step, torch.empty_like(u)),
               R.affine_step(u, y, affine, step, torch.empty_like(u)), rtol=1e-2)


def test_sampler_steps_float64_state():
    B, D = 3, 33
    sscs, _, _ = _tables()
    step = torch.tensor([1], dtype=torch.int64, device=DEV)
    u, y = _randn(B, 2, D, seed=11, dtype=torch.float64), _randn(B, D, seed=12, dtype=torch.float64)
    e4 = _randn(B, 4, D, seed=13, dtype=torch.float64)
    _close(T.sscs_step_(u.clone(), y, sscs, step, eps=e4), R.sscs_step_(u.clone(), y, sscs, step, eps=e4), rtol=1e-12)


# ---- torch.compile -------------------------------------------------------------------------


def _train_and_sample(be, x0, out_net, y, buf, coef, lc, sscs, affine, step, seed):
    B, D = x0.shape
    u = buf.view(B, 2, D)
    be.perturb(x0, coef, u, seed=seed)
    loss = be.hsm_loss_fwd(out_net, u, lc, seed=seed)
    grad = be.hsm_loss_bwd(torch.ones_like(loss), out_net, u, lc, seed=seed)
    s = u.clone()
    for _ in range(2):
        be.sscs_step_(s, y, sscs, step, seed=seed)
        step.add_(1)
    drift = be.affine_step(s, y, affine, step, torch.empty_like(s))
    be.affine_step(s, y, affine, step, s, seed=seed)
    score = be.mixed_score(y, s, lc)
    return loss.sum(), grad, buf, s, drift, score


@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if torch.cuda.is_available() else []))
def test_torch_compile_fullgraph(backend):
    """All ops trace into one graph (fullgraph=True: a graph break would raise) and match eager."""
    import torch._dynamo.testing as dynamo_testing

    torch._dynamo.reset()
    B, D = 3, 33
    t = _times(B)
    coef = SDE.perturbation_kernel(t).table()
    lc = SDE.loss_coefficients(t)
    sscs, _, affine = _tables()
    x0, out_net, y = _randn(B, D, seed=1), _randn(B, D, seed=2), _randn(B, D, seed=3)
    seed = _seed(8)
    counter = dynamo_testing.CompileCounterWithBackend(backend)
    fn = torch.compile(lambda *a: _train_and_sample(T, *a), backend=counter, fullgraph=True)
    args = lambda: (x0, out_net, y, torch.zeros(B, 2 * D, device=DEV), coef, lc, sscs, affine,  # noqa: E731
                    torch.ones(1, dtype=torch.int64, device=DEV), seed)
    got = fn(*args())
    ref = _train_and_sample(R, *args())
    assert counter.frame_count == 1
    for a, b in zip(got, ref):
        _close(a, b, rtol=1e-4)


_TRACE_SCRIPT = textwrap.dedent(
    """
    import os, torch
    os.environ.pop("TRITON_INTERPRET", None)
    from torch._dynamo.backends.common import aot_autograd
    from cld_fast.backends import triton_backend as T
    from cld_fast.sde import CLD
    assert T.REGISTRATION == "triton_op", T.REGISTRATION
    sde = CLD(); B, D = 2, 9
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    coef, lc = sde.perturbation_kernel(t).table(), sde.loss_coefficients(t)
    tab = sde.sscs_table(torch.linspace(1, 1e-3, 4, dtype=torch.float64), mixed=True)
    seed = torch.tensor([5])
    def f(x0, out, y, buf, step):
        u = buf.view(B, 2, D)
        T.perturb(x0, coef, u, seed=seed)
        loss = T.hsm_loss_fwd(out, u, lc, seed=seed)
        g = T.hsm_loss_bwd(torch.ones_like(loss), out, u, lc, seed=seed)
        T.sscs_step_(u, y, tab, step, seed=seed)
        T.affine_step(u, y, tab[:, :6], step, u, seed=seed)
        return loss.sum(), g, T.mixed_score(y, u, lc)
    graphs = []
    def fw(gm, example_inputs):  # record the graph; never launch (no GPU here)
        graphs.append(gm)
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        return lambda *a: [None if o is None else torch.zeros(o.meta["val"].shape, dtype=o.meta["val"].dtype)
                           for o in outs]
    torch.compile(f, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(
        torch.randn(B, D), torch.randn(B, D), torch.randn(B, D), torch.zeros(B, 2 * D), torch.tensor([1]))
    code = graphs[0].code
    print("KERNELS", code.count("triton_kernel_wrapper_functional("), "CUSTOM", code.count("cld_fast_triton"))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run of test_torch_compile_fullgraph covers it")
@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_triton_op_registration_traces_without_gpu():
    """The GPU registration (triton_op + wrap_triton, not interpreted) traces with fullgraph=True into
    a graph of the Triton kernels themselves (what Inductor compiles), checked here without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("KERNELS")][0]
    _, kernels, _, custom = line.split()
    assert int(kernels) == 6 and int(custom) == 0, line
