"""What is specific to the Triton backend: registration, tiling, the deterministic loss split, Philox,
the out-of-range step guard, mixed dtypes, torch.compile tracing and 64-bit indexing.

Every op against the torch reference, for every dtype and layout, is tests/test_ops_contract.py; the
in-kernel coefficients against cld_fast/sde.py are tests/test_coefficients.py. Without CUDA the
kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before Triton is imported) on
CPU tensors, so sizes are kept small. With CUDA they run compiled on the GPU.
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

from cld_fast import opdefs, philox  # noqa: E402
from cld_fast.backends import triton_backend as T  # noqa: E402
from cld_fast.sde import CLD, kernel_params  # noqa: E402

# Triton decides interpreter vs compiled when a kernel is defined. If an earlier test module imported
# the backend before TRITON_INTERPRET was set (CPU only), this process cannot run the kernels: then
# the whole file is re-run in a fresh process (test_rerun_in_fresh_process) and the rest skip here.
_RERUN = (not T.is_available() and not T._IMPORT_ERROR and not torch.cuda.is_available()
          and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CLD_FAST_TRITON_RERUN") != "1")
if not T.is_available() and not _RERUN:
    pytest.skip(f"triton backend unavailable: {T.why_unavailable()}", allow_module_level=True)

from cld_fast.triton_kernels import _common, hsm_loss as tk_loss, mixed_score as tk_mixed  # noqa: E402
from cld_fast.triton_kernels import perturb as tk_perturb, philox as tk_philox  # noqa: E402
from cld_fast.triton_kernels import sampler_steps as tk_steps  # noqa: E402
import cld_fast as cf  # noqa: E402
from cld_fast.samplers.gddim import gddim_table  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.cld_fast_triton if T.is_available() else None


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


SDE = CLD(beta1=6.0, m_inv=9.0, gamma=0.1, numerical_eps=1e-6)  # every parameter away from its default


def _params():
    return kernel_params(SDE, DEV)


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float32).to(device=DEV, dtype=dtype)


def _times(B, seed=0, dtype=torch.float32):
    return (0.05 + 0.9 * torch.rand(B, generator=_gen(seed + 100), dtype=torch.float64)).to(DEV, dtype)


def _grid(n=5, dtype=torch.float64):
    return torch.linspace(1.0, 1e-3, n + 1, dtype=dtype, device=DEV)


def _seed(value=0x1234_5678_9ABC):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def _step(i):
    return torch.tensor([i], dtype=torch.int64, device=DEV)


def _close(actual, expected, rtol):
    """|a - e| <= rtol * (|e| + max|e| / 10): relative, with a floor for entries near zero."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    floor = 0.1 * float(e.abs().max()) + 1e-30
    err = (a - e).abs()
    assert bool((err <= rtol * (e.abs() + floor)).all()), f"max rel err {float((err / (e.abs() + floor)).max()):.3e}"


# ---- registration --------------------------------------------------------------------------


def test_backend_interface():
    assert T.NAME == "triton"
    assert T.is_available() and T.why_unavailable() == ""
    assert T.supports(DEV, torch.float32) and T.supports(DEV, torch.float64)
    assert not T.supports(DEV, torch.float16)
    assert T.REGISTRATION == ("triton_op" if torch.cuda.is_available() else "custom_op")
    for name, d in opdefs.OPS.items():
        packet = getattr(torch.ops.cld_fast_triton, name)
        assert T.op(name) is packet
        assert str(packet.default._schema).startswith(f"{opdefs.TRITON_NAMESPACE}::{d.name}(")
        assert T._same_schema(str(packet.default._schema), d.qualified_schema())
    with pytest.raises(ValueError, match="unknown op"):
        T.op("nope")
    from cld_fast import backends

    assert backends.select(DEV, torch.float32, backend="triton") is T


def test_device_guard():
    """The guard makes the tensors' CUDA device current (Triton launches on the current device)."""
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _common.device_guard(torch.device("cpu")):
        pass


def test_every_launch_runs_under_the_tensors_device_guard(monkeypatch):
    """Every kernel launch of every op happens inside ``device_guard(<the tensors' device>)``.

    A fake second device stands in for ``cuda:1``: the guard is recorded instead of entered, so the
    check runs on a machine with no (or one) GPU.
    """
    import contextlib
    import cld_fast as cf
    from cld_fast import triton_kernels as tk

    fake = torch.device("cuda", 1)
    active, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    real_launch = _common.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        launches.append((getattr(kernel, "__name__", str(kernel)), list(active)))
        real_launch(kernel, grid, *args, **kwargs)

    for mod in (tk_perturb, tk_loss, tk_mixed, tk_steps, tk_philox, tk.coefficients):
        if hasattr(mod, "device_guard"):
            monkeypatch.setattr(mod, "device_guard", lambda d: recording_guard(fake if torch.device(d) == DEV else d))
        monkeypatch.setattr(mod, "launch", recording_launch)
    sde = CLD()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 5, generator=g).to(DEV)
    t = (torch.rand(3, generator=g) * 0.9 + 0.1).to(DEV)
    out = torch.randn(3, 2, 5, generator=g).to(DEV).requires_grad_(True)
    ts = torch.linspace(1.0, 0.1, 4, dtype=torch.float64, device=DEV)
    u, noise = cf.perturb(x0, t, sde, backend="triton")
    torch.autograd.grad(cf.hsm_loss(out, u, t, sde, noise, backend="triton"), out)
    cf.mixed_score(out.detach(), u, t, sde, backend="triton")
    cf.half_step_(u.clone(), ts, sde, step=1, seed=3, backend="triton")
    cf.sscs_step_(u.clone(), x0, ts, sde, step=1, mixed=True, seed=3, backend="triton")
    cf.em_step_(u.clone(), x0, ts, sde, step=1, seed=3, backend="triton")
    cf.pf_drift(u, x0, 0.5, sde, backend="triton")
    tk_philox.philox_bits(8, torch.tensor([1], device=DEV))
    names = {n for n, _ in launches}
    assert len(names) >= 7, names  # perturb, loss fwd (+ finish), loss bwd, mixed, half, sscs, affine, philox
    for name, guards in launches:
        assert guards and guards[-1] == fake, f"{name} launched outside the tensors' device guard: {guards}"


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
    seed, step = _seed(s), _step(k)
    bits = tk_philox.philox_bits(n, seed, step, tag=tag, start=start)
    ref = torch.stack(philox.philox_bits(n, seed, step, tag, start=start))
    assert torch.equal(bits.cpu(), ref.cpu())
    out = torch.empty(4, n, dtype=torch.int64, device=DEV)
    _tl_philox_kernel[(triton.cdiv(n, 128),)](s, k, out, n, start, TAG=tag, BLOCK=128)
    assert torch.equal(bits.cpu(), out.cpu())


def test_philox_normals_close_to_reference():
    """Bits are equal; the normals differ at most by float32 rounding of log / cos / sin."""
    seed, step = _seed(77), _step(3)
    z = tk_philox.philox_normals(4000, seed, step, tag=1)
    zr = philox.philox_normals(4000, seed, step, 1)
    assert float((z.cpu() - zr.cpu()).abs().max()) < 4e-6 * max(1.0, float(zr.abs().max()))


def _seed_vs_eps_cases(B, D):
    """Per op with noise: (run(eps, seed) -> output, which normals it draws, Philox tag, step,
    opdefs reference, reference arguments for a seed, index of the reference's written argument)."""
    t, ts, p = _times(B), _grid(), _params()
    x0, v0, u, y = _randn(B, D, seed=1), _randn(B, D, seed=2), _randn(B, 2, D, seed=3), _randn(B, D, seed=4)
    k = 2

    def perturb(eps, seed):
        out = torch.empty(B, 2, D, device=DEV)
        tk_perturb.perturb(x0, v0, t, p, 1, eps, seed, out)
        return out

    def half(eps, seed):
        w = u.clone()
        tk_steps.half_step_(w, ts, _step(k), p, eps, seed)
        return w

    def sscs(eps, seed):
        w = u.clone()
        tk_steps.sscs_step_(w, y, ts, _step(k), p, True, eps, seed)
        return w

    def affine(eps, seed):
        out = torch.empty_like(u)
        tk_steps.affine_step(u, y, ts, _step(k), p, 0, True, eps, seed, out)
        return out

    def loss_bwd(eps, seed):
        return tk_loss.hsm_loss_bwd(torch.ones((), device=DEV), y, u, t, p, 1, 0.5, eps, seed)

    return [
        (perturb, [0, 1], philox.TAG_PERTURB, 0, opdefs.perturb_ref,
         lambda s: (x0, v0, t, p, 1, None, s, torch.empty(B, 2, D, device=DEV)), 7),
        (half, [0, 1], philox.TAG_HALF_STEP, k, opdefs.half_step_ref,
         lambda s: (u.clone(), ts, _step(k), p, None, s), 0),
        (sscs, [0, 1, 2, 3], philox.TAG_SSCS, k, opdefs.sscs_step_ref,
         lambda s: (u.clone(), y, ts, _step(k), p, True, None, s), 0),
        (affine, [0], philox.TAG_AFFINE, k, opdefs.affine_step_ref,
         lambda s: (u, y, ts, _step(k), p, 0, True, None, s, torch.empty_like(u)), 9),
        (loss_bwd, [1], philox.TAG_PERTURB, 0, opdefs.hsm_loss_bwd_ref,
         lambda s: (torch.ones((), device=DEV), y, u, t, p, 1, 0.5, None, s), None),
    ]


@pytest.mark.parametrize("case", range(5))
def test_seed_mode_draws_the_contract_normals(case):
    """Seed mode equals eps mode fed with the contract's normals for the same seed, tag, step and
    element index (bit for bit), and the opdefs reference's own seed mode to float rounding (the
    interpreter's float32 log/cos come from numpy, an ulp away from torch's)."""
    B, D = 3, 37
    fn, which, tag, k, ref, ref_args, out_index = _seed_vs_eps_cases(B, D)[case]
    seed = _seed(4242)
    z = tk_philox.philox_normals(B * D, seed, _step(k), tag=tag)[which].view(len(which), B, D)
    eps = z[0] if len(which) == 1 else z.transpose(0, 1)  # (B, D) or (B, K, D), a strided view
    got = fn(None, seed)
    assert torch.equal(got, fn(eps, None))
    assert torch.equal(got, fn(None, seed))  # reproducible
    assert not torch.equal(got, fn(None, _seed(4243)))
    args = ref_args(seed)
    expected = ref(*args)
    if expected is None:
        expected = args[out_index] if out_index is not None else args[0]
    _close(got, expected, rtol=1e-5)


def test_seed_mode_loss_regenerates_perturb_draw():
    B, D = 3, 37
    t, p, seed = _times(B), _params(), _seed(31337)
    out, u = _randn(B, D, seed=5), _randn(B, 2, D, seed=6)
    z1 = tk_philox.philox_normals(B * D, seed, _step(0), tag=philox.TAG_PERTURB)[1].view(B, D)
    a = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 1.0, 0, None, seed)
    assert torch.equal(a, tk_loss.hsm_loss_fwd(out, u, t, p, 1, 1.0, 0, z1, None))


# ---- tiling --------------------------------------------------------------------------------

TILES = [dict(block_b=2, block_d=8), dict(block_b=1, block_d=16), dict(block_b=4, block_d=64)]


@pytest.mark.parametrize("tile", TILES)
def test_elementwise_ops_do_not_depend_on_the_tile(tile):
    """Partial row and column tiles, many programs: bit-identical to the default (one-program) tiling."""
    B, D = 5, 37
    t, ts, p, seed = _times(B, dtype=torch.float64), _grid(), _params(), _seed(5)
    x0, u, y = _randn(B, D, seed=1), _randn(B, 2, D, seed=2), _randn(B, D, seed=3)

    def run(**kw):
        res = []
        out = torch.empty(B, 2, D, device=DEV)
        tk_perturb.perturb(x0, None, t, p, 0, None, seed, out, **kw)
        res.append(out)
        res.append(tk_mixed.mixed_score(y, u, t, p, **kw))
        res.append(tk_loss.hsm_loss_bwd(_randn(B, seed=4), y, u, t, p, 1, 1.0, None, seed, **kw))
        w = u.clone()
        tk_steps.half_step_(w, ts, _step(1), p, None, seed, **kw)
        tk_steps.sscs_step_(w, y, ts, _step(2), p, True, None, seed, **kw)
        res.append(w)
        out = torch.empty_like(u)
        tk_steps.affine_step(u, y, ts, _step(3), p, 0, False, None, seed, out, **kw)
        res.append(out)
        return res

    for a, b in zip(run(**tile), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_split_equals_single_chunk_and_is_deterministic(dtype):
    """The (B, chunks) partials + finish path equals one chunk to float rounding, and repeats bit for bit."""
    B, D = 5, 257
    t, p = _times(B), _params()
    out, u, eps_v = _randn(B, D, seed=1, dtype=dtype), _randn(B, 2, D, seed=2, dtype=dtype), _randn(B, D, seed=3)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for reduction in (0, 1):
        for noise in ((eps_v, None), (None, _seed(9))):
            one = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 0.25, reduction, *noise, block_b=2, block_d=32, chunks=1)
            many = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 0.25, reduction, *noise, block_b=2, block_d=32, chunks=3)
            assert many.shape == one.shape == ((B,) if reduction == 0 else ())
            assert many.dtype == dtype
            _close(many, one, rtol=tol)
            again = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 0.25, reduction, *noise, block_b=2, block_d=32, chunks=3)
            assert torch.equal(many, again)
            default = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 0.25, reduction, *noise)
            _close(default, one, rtol=tol)
    assert tk_loss.loss_config(B, D, DEV, 2, 32, 3)[3] == 3


def test_loss_split_depends_on_the_shape_only(monkeypatch):
    """The GPU chunk count is a function of (B, D): no device query (same sums on every GPU model)."""

    def no_query(*args, **kwargs):
        raise AssertionError("loss_config must not query the device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_query)
    meta = torch.device("meta")
    for (B, D), chunks in {(128, 3072): 3, (8, 196608): 192, (4096, 2): 1, (1, 1): 1}.items():
        bb, bd, iters, nch, _ = tk_loss.loss_config(B, D, meta)
        assert nch == chunks and (nch - 1) * iters < triton.cdiv(D, bd) <= nch * iters, (B, D)
        assert tk_loss.loss_config(B, D, meta) == tk_loss.loss_config(B, D, torch.device("cuda", 3))


def test_loss_scale_is_exact_in_float64():
    """Python floats reach Triton as float32; the loss scale travels as float64 bits instead."""
    B, D = 3, 33
    t, p = _times(B), _params()
    out, u, eps_v = (_randn(B, D, seed=1, dtype=torch.float64), _randn(B, 2, D, seed=2, dtype=torch.float64),
                     _randn(B, D, seed=3, dtype=torch.float64))
    scale = 1.0 / 3.0
    got = tk_loss.hsm_loss_fwd(out, u, t, p, 0, scale, 0, eps_v, None)
    want = opdefs.hsm_loss_fwd_ref(out, u, t, p, 0, scale, 0, eps_v, None)
    _close(got, want, rtol=1e-13)
    g = tk_loss.hsm_loss_bwd(torch.ones(B, dtype=torch.float64, device=DEV), out, u, t, p, 0, scale, eps_v, None)
    _close(g, opdefs.hsm_loss_bwd_ref(torch.ones(B, dtype=torch.float64, device=DEV), out, u, t, p, 0, scale,
                                      eps_v, None), rtol=1e-13)
    assert tk_loss.scale_bits(1.0) == 0x3FF0000000000000 and tk_loss.scale_bits(-0.0) == -(2 ** 63)


# ---- out-of-range steps --------------------------------------------------------------------


def _all_step_ops(u, y, ts, step, p, seed):
    """Every sampler op variant at ``step``; a list of its outputs."""
    res = []
    for noise in ((None, None), (None, seed)):
        w = u.clone()
        tk_steps.half_step_(w, ts, step, p, *noise)
        res.append(w)
        for mixed in (False, True):
            w = u.clone()
            tk_steps.sscs_step_(w, y, ts, step, p, mixed, *noise)
            res.append(w)
        for kind in (0, 1):
            out = torch.empty_like(u)
            tk_steps.affine_step(u, y, ts, step, p, kind, True, *noise, out)
            res.append(out)
    return res


@pytest.mark.parametrize("step", [-1, 5, 6, 2**40, -(2**40)])
def test_out_of_range_step_poisons_the_output(step):
    """ts has 6 points (5 steps): a step outside [0, 4] reads no memory outside ts and writes NaN."""
    B, D = 3, 9
    ts, p = _grid(5, dtype=torch.float32), _params()
    u, y = _randn(B, 2, D, seed=1), _randn(B, D, seed=2)
    for out in _all_step_ops(u, y, ts, _step(step), p, _seed(3)):
        assert bool(out.isnan().all())
    drift = torch.empty_like(u)
    tk_steps.affine_step(u, y, ts, _step(step), p, 2, False, None, None, drift)
    assert bool(drift.isnan().all()) == (step != 5)  # pf_drift may evaluate at the last grid point


def test_in_range_steps_are_finite_and_short_grids_are_rejected():
    B, D = 3, 9
    ts, p = _grid(5), _params()
    u, y = _randn(B, 2, D, seed=1), _randn(B, D, seed=2)
    for step in range(5):
        for out in _all_step_ops(u, y, ts, _step(step), p, _seed(3)):
            assert bool(out.isfinite().all())
    with pytest.raises(ValueError, match="ts holds 1 time points"):
        tk_steps.sscs_step_(u.clone(), y, ts[:1], _step(0), p, True, None, None)
    with pytest.raises(ValueError, match="ts holds 0 time points"):
        tk_steps.affine_step(u, y, ts[:0], _step(0), p, 2, False, None, None, torch.empty_like(u))


# ---- mixed dtypes --------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_float64_state_with_half_precision_output_gradient(out_dtype):
    """A float64 state with a bf16/fp16 network output: the gradient goes float64 -> float32 -> 16 bit."""
    B, D = 3, 33
    t, p = _times(B), _params()
    u = _randn(B, 2, D, seed=1, dtype=torch.float64)
    out = _randn(B, D, seed=2, dtype=out_dtype)
    eps_v = _randn(B, D, seed=3, dtype=torch.float64)
    for grad in (torch.ones((), dtype=torch.float64, device=DEV), _randn(B, seed=4, dtype=torch.float64)):
        got = tk_loss.hsm_loss_bwd(grad, out, u, t, p, 1, 0.5, eps_v, None)
        assert got.dtype == out_dtype and got.shape == (B, D)
        want = opdefs.hsm_loss_bwd_ref(grad, out.double(), u, t, p, 1, 0.5, eps_v, None)
        assert bool(got.isfinite().all()) and bool((got != 0).all())
        _close(got, want, rtol=1e-2)
    loss = tk_loss.hsm_loss_fwd(out, u, t, p, 1, 0.5, 0, eps_v, None)
    assert loss.dtype == torch.float64
    _close(loss, opdefs.hsm_loss_fwd_ref(out.double(), u, t, p, 1, 0.5, 0, eps_v, None), rtol=1e-12)


# ---- torch.compile -------------------------------------------------------------------------


def _train_step(x0, out_net, buf, t, p, seed):
    B, D = x0.shape
    u = buf.view(B, 2, D)
    OPS.perturb(x0, None, t, p, 0, None, seed, u)
    loss = OPS.hsm_loss_fwd(out_net, u, t, p, 1, 1.0 / B, 1, None, seed, 0, 0)
    grad = OPS.hsm_loss_bwd(torch.ones_like(loss), out_net, u, t, p, 1, 1.0 / B, None, seed, 0, 0)
    return loss, grad, buf


def _sampler_steps(u, y, ts, step, p, seed):
    OPS.sscs_step_(u, y, ts, step, p, True, None, seed, False)
    step.add_(1)
    drift = torch.empty_like(u)
    OPS.affine_step(u, y, ts, step, p, 2, True, None, None, drift)
    OPS.affine_step(u, y, ts, step, p, 0, True, None, seed, u)
    score = OPS.mixed_score(y, u, ts[:1].expand(u.shape[0]), p, 0, 0)
    OPS.half_step_(u, ts, step, p, None, seed)
    return u, drift, score


@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if torch.cuda.is_available() else []))
def test_torch_compile_fullgraph(backend):
    """Training ops and sampler steps trace into one graph each (fullgraph=True) and match eager."""
    import torch._dynamo.testing as dynamo_testing

    torch._dynamo.reset()
    B, D = 3, 33
    t, ts, p, seed = _times(B), _grid(), _params(), _seed(8)
    x0, out_net, y = _randn(B, D, seed=1), _randn(B, D, seed=2), _randn(B, D, seed=3)
    counter = dynamo_testing.CompileCounterWithBackend(backend)
    train = torch.compile(_train_step, backend=counter, fullgraph=True)
    got = train(x0, out_net, torch.zeros(B, 2 * D, device=DEV), t, p, seed)
    ref = _train_step(x0, out_net, torch.zeros(B, 2 * D, device=DEV), t, p, seed)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    sample = torch.compile(_sampler_steps, backend=counter, fullgraph=True)
    u0 = _randn(B, 2, D, seed=4)
    step_c, step_e = _step(1), _step(1)
    got = sample(u0.clone(), y, ts, step_c, p, seed)
    ref = _sampler_steps(u0.clone(), y, ts, step_e, p, seed)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert torch.equal(step_c, step_e) and int(step_c) == 2
    assert counter.frame_count == 2


_TRACE_SCRIPT = textwrap.dedent(
    """
    import os, torch
    os.environ.pop("TRITON_INTERPRET", None)
    from torch._dynamo.backends.common import aot_autograd
    from cld_fast.backends import triton_backend as T
    from cld_fast.samplers.gddim import gddim_table
    from cld_fast.sde import CLD, kernel_params
    assert T.REGISTRATION == "triton_op", T.REGISTRATION
    ops = torch.ops.cld_fast_triton
    B, D = 2, 9
    p = kernel_params(CLD(), "cpu")
    t = torch.tensor([0.3, 0.7])
    ts = torch.linspace(1, 1e-3, 4, dtype=torch.float64)
    seed = torch.tensor([5])
    table = gddim_table(CLD(), ts, 3, "eps")
    hist = torch.zeros(2, B, 2, D)
    def f(x0, out, y, buf, step):
        u = buf.view(B, 2, D)
        ops.perturb(x0, None, t, p, 0, None, seed, u)
        loss = ops.hsm_loss_fwd(out, u, t, p, 0, 0.5, 1, None, seed, 0, 0)
        g = ops.hsm_loss_bwd(torch.ones_like(loss), out, u, t, p, 0, 0.5, None, seed, 0, 0)
        ops.sscs_step_(u, y, ts, step, p, True, None, seed, False)
        ops.affine_step(u, y, ts, step, p, 0, True, None, seed, u)
        ops.gddim_step_(u, hist, y, table, step)
        return loss, g, ops.mixed_score(y, u, t, p, 0, 0)
    graphs = []
    def fw(gm, example_inputs):  # record the graph; never launch (no GPU here)
        graphs.append(gm)
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        return lambda *a: [None if o is None else torch.zeros(o.meta["val"].shape, dtype=o.meta["val"].dtype)
                           for o in outs]
    g = torch.Generator().manual_seed(0)
    torch.compile(f, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(
        torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g),
        torch.zeros(B, 2 * D), torch.tensor([1]))
    code = graphs[0].code
    print("KERNELS", code.count("triton_kernel_wrapper_functional("), "CUSTOM", code.count("cld_fast_triton"))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run of test_torch_compile_fullgraph covers it")
@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_triton_op_registration_traces_without_gpu():
    """The GPU registration (triton_op + wrap_triton, not interpreted) traces with fullgraph=True into
    a graph of the Triton kernels themselves (what Inductor compiles), checked here without a GPU:
    perturb, loss forward (one program: no finish kernel), loss backward, SSCS,
    affine, gDDIM (two mutated arguments) and mixed score."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("KERNELS")][0]
    _, kernels, _, custom = line.split()
    assert int(custom) == 0 and int(kernels) == 7, line


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


# ---- the loss gradient for a float64 state and a bf16 network output ---------------------------------


@pytest.mark.skipif("triton" not in cf.backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood"])
def test_triton_loss_gradient_float64_state_bf16_output(weighting, sde):
    """Public API, triton against torch: the gradient reaches the bf16 output through float32."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(5, 2, 18, generator=g, dtype=torch.float64)
    u, noise = cf.perturb(x0, t, sde, eps=eps, backend="torch")
    base = torch.randn(5, 2, 3, 3, generator=g).to(torch.bfloat16)
    grads = {}
    for backend in ("torch", "triton"):
        out = base.clone().requires_grad_(True)
        cf.hsm_loss(out, u, t, sde, noise, weighting=weighting, backend=backend).backward()
        grads[backend] = out.grad
    assert grads["triton"].dtype == torch.bfloat16
    got, want = grads["triton"].double(), grads["torch"].double()
    assert bool(torch.isfinite(got).all()) and float(got.abs().min()) > 0
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())), (got - want).abs().max()
