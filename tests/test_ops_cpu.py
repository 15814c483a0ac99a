"""What is specific to the ``cpu`` backend (the C++ kernels of cld_fast._C, csrc/cpu).

Op results against the torch references for every op, dtype and layout are in
tests/test_ops_contract.py, and the compiled coefficients against cld_fast/sde.py in
tests/test_coefficients.py. Here: the backend interface, loading the extension before or after the
schemas are defined, the compiled Philox contract (bits exact; seed-mode outputs equal to the
reference's up to float32 rounding of log / cos / sin), results independent of the OpenMP thread
count, in-place targets of any layout, host-side step range errors, argument errors that name the
argument, and tracing under torch.compile.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cld_fast import opdefs, philox
from cld_fast.backends import cpu_backend as C
from cld_fast.sde import CLD, kernel_params

if not C.is_available():
    pytest.skip(f"cpu backend unavailable: {C.why_unavailable()}", allow_module_level=True)

opdefs.define_library()
OPS = torch.ops.cld_fast
ROOT = Path(__file__).resolve().parents[1]
SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
SEED = 2 ** 40 + 12345  # exercises both key words
TS = [1.0, 0.7, 0.45, 0.2, 0.05]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dtype)


def _times(b, dtype=torch.float32, seed=0):
    return (torch.rand(b, generator=_g(seed), dtype=torch.float64) * 0.98 + 0.01).to(dtype)


def _i64(value):
    return torch.tensor([value], dtype=torch.int64)


def _sde():
    return kernel_params(SDE, "cpu")


def _ts(dtype=torch.float64):
    return torch.tensor(TS, dtype=dtype)


# ---- backend interface and registration ---------------------------------------------------------

def test_backend_interface():
    import cld_fast._C as ext

    assert C.NAME == "cpu" and C.why_unavailable() == "" and ext.has_cpu_kernels is True
    assert C.supports(torch.device("cpu"), torch.float32) and C.supports(torch.device("cpu"), torch.float64)
    assert not C.supports(torch.device("cpu"), torch.float16)
    for name in opdefs.OPS:
        assert C.op(name) is getattr(torch.ops.cld_fast, name)
    with pytest.raises(ValueError, match="unknown op"):
        C.op("no_such_op")


_ORDER_SCRIPT = r"""
import importlib.util, sys, types, glob, os
import torch
root, order = sys.argv[1], sys.argv[2]
pkg_dir = os.path.join(root, "cld_fast")
# cld_fast as a bare namespace (its __init__ not run), so nothing but this script loads the extension
pkg = types.ModuleType("cld_fast")
pkg.__path__ = [pkg_dir]
sys.modules["cld_fast"] = pkg
def define():
    spec = importlib.util.spec_from_file_location("cld_fast.opdefs", os.path.join(pkg_dir, "opdefs.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cld_fast.opdefs"] = mod
    spec.loader.exec_module(mod)
    mod.define_library()
def load():
    torch.ops.load_library(glob.glob(os.path.join(pkg_dir, "_C*.so"))[0])
steps = [load, define] if order == "C-first" else [define, load]
for step in steps:
    step()
sde = torch.tensor([4.0, 0.0, 4.0, 0.04, 1e-9], dtype=torch.float64)
out = torch.empty(2, 2, 3)
torch.ops.cld_fast.perturb(torch.ones(2, 3), None, torch.tensor([0.5, 0.5]), sde, 0, None, None, out)
assert torch.isfinite(out).all() and out[0, 0, 0] < 1
print("ok")
"""


@pytest.mark.parametrize("order", ["C-first", "schemas-first"])
def test_extension_registers_before_or_after_the_schemas(order):
    """csrc registers only implementations, so loading it before opdefs.define_library() works too."""
    if not list((ROOT / "cld_fast").glob("_C*.so")):
        pytest.skip("the extension is not built in-tree (cld_fast/_C*.so)")
    proc = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, str(ROOT), order], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# ---- noise contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("start", [0, 2 ** 32 - 100])
@pytest.mark.parametrize("seed,step,tag", [(0, 0, 0), (SEED, 3, philox.TAG_SSCS), (2 ** 62 - 1, 2 ** 32 + 7, 3)])
def test_compiled_philox_bits_and_uniforms_are_exact(start, seed, step, tag):
    """The Philox4x32-10 of csrc/include/cld_philox.h gives the reference's bits and uniforms exactly,
    including element indices past 2^32 (the high counter word)."""
    import cld_fast._C as ext

    bits, unif = ext._philox_probe(seed, start, 200, step, tag)
    ref = torch.stack(philox.philox_bits(200, seed, step, tag, start=start))
    assert torch.equal(bits, ref)
    assert torch.equal(unif, philox.uniform_from_bits(ref))


def _box_muller_float64(u1, u2):
    r = torch.sqrt(-2 * torch.log(u1.double().clamp(min=1e-7)))
    th = 2 * math.pi * u2.double()
    return r * torch.cos(th), r * torch.sin(th)


@pytest.mark.parametrize("seed,start,step,tag", [(SEED, 0, 0, 0), (2 ** 40 + 3, 2 ** 32 - 3000, 3, philox.TAG_SSCS)])
def test_compiled_normals_are_float32_box_muller_of_the_reference_uniforms(seed, start, step, tag):
    """The vector normals (z0..z3) are a float32 Box-Muller of the reference's uniforms: within 5e-7
    (relative above 1, absolute below) of the float64 transform, and within 2.5e-6 of the
    reference's float32 one, whose own rounding of 2 pi u2 to float32 costs up to 1.8e-6."""
    import cld_fast._C as ext

    n = 1 << 16
    got = ext._philox_normals(seed, start, n, step, tag).double()
    u = [philox.uniform_from_bits(w) for w in philox.philox_bits(n, seed, step, tag, start=start)]
    exact = torch.stack([*_box_muller_float64(u[0], u[1]), *_box_muller_float64(u[2], u[3])])
    ref = torch.stack([*philox.box_muller(u[0], u[1]), *philox.box_muller(u[2], u[3])]).double()

    def err(a, b):
        return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()

    assert err(got, exact) < 5e-7
    assert err(got, ref) < 2.5e-6
    assert abs(got.mean().item()) < 5 / (4 * n) ** 0.5 and abs(got.var().item() - 1) < 5 * (2 / (4 * n)) ** 0.5


def _widest_lanes():
    import cld_fast._C as ext

    try:
        ext._philox_normals(SEED, 0, 1, 0, 0, lanes=16)
        return 16
    except RuntimeError:
        try:
            ext._philox_normals(SEED, 0, 1, 0, 0, lanes=8)
            return 8
        except RuntimeError:
            return 0


def test_compiled_normals_are_the_same_bits_on_8_and_16_lanes():
    """The AVX2 path (8 lanes) and the AVX-512 path (16 lanes) run the same operations in the same
    order, so they draw the same normals bit for bit, the tail of an odd count included."""
    import cld_fast._C as ext

    if _widest_lanes() < 16:
        pytest.skip("this CPU has no AVX-512 path to compare with the AVX2 one")
    n = (1 << 14) + 13
    for seed, start in [(SEED, 0), (2 ** 40 + 3, 2 ** 32 - 3000)]:
        wide = ext._philox_normals(seed, start, n, 3, philox.TAG_SSCS, lanes=16)
        narrow = ext._philox_normals(seed, start, n, 3, philox.TAG_SSCS, lanes=8)
        assert torch.equal(wide.view(torch.int32), narrow.view(torch.int32))


def test_scalar_normals_are_the_reference_box_muller():
    """Without AVX2 the scalar code of cld_philox.h runs: the reference's float32 Box-Muller, within
    the float32 rounding of its angle (2.5e-6) of the vector path and of the reference."""
    import cld_fast._C as ext

    n = 4099
    got = ext._philox_normals(SEED, 5, n, 0, 0, lanes=0).double()
    u = [philox.uniform_from_bits(w) for w in philox.philox_bits(n, SEED, 0, 0, start=5)]
    ref = torch.stack([*philox.box_muller(u[0], u[1]), *philox.box_muller(u[2], u[3])]).double()
    assert ((got - ref).abs() / ref.abs().clamp(min=1.0)).max().item() < 2.5e-6
    if _widest_lanes():
        vec = ext._philox_normals(SEED, 5, n, 0, 0).double()
        assert ((got - vec).abs() / vec.abs().clamp(min=1.0)).max().item() < 2.5e-6


def test_normals_probe_rejects_a_width_the_cpu_does_not_run():
    import cld_fast._C as ext

    with pytest.raises(RuntimeError, match="lanes must be"):
        ext._philox_normals(SEED, 0, 4, 0, 0, lanes=4)


def _seed_mode_cases(b, d, dtype):
    """(name, run(impl)) pairs: every op in seed mode, each returning its result tensor."""
    x0, out, y = _randn(b, d, dtype=dtype, seed=1), _randn(b, d, dtype=dtype, seed=2), _randn(b, d, dtype=dtype, seed=3)
    u = _randn(b, 2, d, dtype=dtype, seed=4)
    t, sde, ts, seed = _times(b), _sde(), _ts(), _i64(SEED)
    grad = torch.rand(b, generator=_g(5), dtype=torch.float64).to(dtype) + 0.5

    def perturb(impl):
        res = torch.empty(b, 2, d, dtype=dtype)
        impl["perturb"](x0, None, t, sde, 0, None, seed, res)
        return res

    def loss_fwd(impl):
        return impl["hsm_loss_fwd"](out, u, t, sde, 1, 0.5, 0, None, seed, 0, 0)

    def loss_bwd(impl):
        return impl["hsm_loss_bwd"](grad, out, u, t, sde, 1, 0.5, None, seed, 0, 0)

    def loss_fwd_grad(impl):  # the loss and the gradient written in the same pass, as one tensor
        g = torch.empty(b, d, dtype=dtype)
        loss = impl["hsm_loss_fwd_grad"](out, u, t, sde, 1, 0.5, 0, None, seed, 0, 0, g)
        return torch.cat([loss, g.flatten()])

    def half(impl):
        w = u.clone()
        impl["half_step_"](w, ts, _i64(2), sde, None, seed)
        return w

    def sscs(impl):
        w = u.clone()
        impl["sscs_step_"](w, y, ts, _i64(1), sde, True, None, seed, False)
        return w

    def affine(impl):
        res = torch.empty_like(u)
        impl["affine_step"](u, y, ts, _i64(3), sde, 0, False, None, seed, res)
        return res

    return {"perturb": perturb, "hsm_loss_fwd": loss_fwd, "hsm_loss_bwd": loss_bwd, "hsm_loss_fwd_grad": loss_fwd_grad,
            "half_step_": half,
            "sscs_step_": sscs, "affine_step": affine}


_KERNELS = {name: getattr(torch.ops.cld_fast, name) for name in opdefs.OPS}
_REFS = {name: d.reference for name, d in opdefs.OPS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["perturb", "hsm_loss_fwd", "hsm_loss_bwd", "hsm_loss_fwd_grad", "half_step_",
                                  "sscs_step_", "affine_step"])
def test_seed_mode_draws_the_reference_noise(name, dtype):
    """In-kernel Philox noise equals the reference's (cld_fast.philox) for the same seed: the uniform
    bits are exact, so results differ only by float32 rounding of the normals (log / cos / sin)."""
    run = _seed_mode_cases(3, 1001, dtype)[name]
    got, want = run(_KERNELS), run(_REFS)
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=3e-6)


def test_seed_mode_noise_moments():
    """A half step of the zero state is pure noise L (z0, z1): whitened, it has mean 0 and unit covariance."""
    b, d = 4, 50_000
    ts, step = _ts(), _i64(1)
    u = torch.zeros(b, 2, d, dtype=torch.float64)
    OPS.half_step_(u, ts, step, _sde(), None, _i64(SEED))
    r = SDE.half_step_coefficients(torch.tensor(TS[1], dtype=torch.float64), TS[1] - TS[2])
    l11, l21, l22 = r[4].item(), r[5].item(), r[6].item()
    z0 = u[:, 0].reshape(-1) / l11
    z1 = (u[:, 1].reshape(-1) - l21 * z0) / l22
    n = z0.numel()
    for z in (z0, z1):
        assert abs(z.mean().item()) < 5 / n ** 0.5
        assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((z0 * z1).mean().item()) < 5 / n ** 0.5


# ---- OpenMP ------------------------------------------------------------------------------------

def _threaded_results():
    b, d = 5, 20_000  # rows longer than the loss's 8192-element chunks
    out, u = _randn(b, d, seed=1), _randn(b, 2, d, seed=2)
    t, sde, seed, ts = _times(b), _sde(), _i64(SEED), _ts()
    res = [OPS.hsm_loss_fwd(out, u, t, sde, w, 0.25, r, None, seed, 0, 0) for w in (0, 1) for r in (0, 1)]
    res.append(OPS.hsm_loss_bwd(torch.tensor(1.5), out, u, t, sde, 1, 0.25, None, seed, 0, 0))
    p = torch.empty(b, 2, d)
    OPS.perturb(out, None, t, sde, 0, None, seed, p)
    w = u.clone()
    OPS.sscs_step_(w, out, ts, _i64(0), sde, True, None, seed, False)
    res += [p, w]
    # every other op, with explicit noise too (its grain is larger: 32768 elements per chunk)
    eps2 = _randn(b, 2, d, seed=5)
    p = torch.empty(b, 2, d)
    OPS.perturb(out, None, t, sde, 0, eps2, None, p)
    res.append(p)
    res.append(OPS.hsm_loss_fwd(out, u, t, sde, 1, 0.25, 0, eps2[:, 1], None, 0, 0))
    res.append(OPS.mixed_score(out, u, t, sde, 0, 0))
    for noise in ((None, seed), (eps2, None)):
        w = u.clone()
        OPS.half_step_(w, ts, _i64(1), sde, *noise)
        res.append(w)
    for kind, noise in ((0, (None, seed)), (0, (eps2[:, 0], None)), (1, (None, None)), (2, (None, None))):
        o = torch.empty(b, 2, d)
        OPS.affine_step(u, out, ts, _i64(0), sde, kind, kind != 2, *noise, o)
        res.append(o)
    return res


def test_results_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _threaded_results()
        torch.set_num_threads(2)
        two = _threaded_results()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ---- layouts and edge cases ---------------------------------------------------------------------

def test_non_contiguous_in_place_targets_are_written_back():
    b, d = 3, 7
    sde, ts, step = _sde(), _ts(), _i64(1)
    eps2, eps4, y = _randn(b, 2, d, seed=2), _randn(b, 4, d, seed=3), _randn(b, d, seed=4)
    base = _randn(b, d, 2, seed=1)
    u = base.permute(0, 2, 1)  # (B, 2, D), not contiguous
    ref = u.contiguous()
    OPS.half_step_(u, ts, step, sde, eps2, None)
    opdefs.half_step_ref(ref, ts, step, sde, eps2, None)
    OPS.sscs_step_(u, y, ts, step, sde, True, eps4, None, False)
    opdefs.sscs_step_ref(ref, y, ts, step, sde, True, eps4, None)
    torch.testing.assert_close(u, ref, rtol=1e-6, atol=1e-6)
    # affine_step with out = u itself, non-contiguous: reads u before it is overwritten
    want = torch.empty(b, 2, d)
    opdefs.affine_step_ref(ref, y, ts, step, sde, 0, False, y, None, want)
    OPS.affine_step(u, y, ts, step, sde, 0, False, y, None, u)
    torch.testing.assert_close(u, want, rtol=1e-6, atol=1e-6)
    assert u.data_ptr() == base.data_ptr()
    # perturb into a non-contiguous out
    out = torch.zeros(b, d, 2).permute(0, 2, 1)
    t = _times(b)
    OPS.perturb(y, None, t, sde, 1, eps2, None, out)
    ref_out = torch.empty(b, 2, d)
    opdefs.perturb_ref(y, None, t, sde, 1, eps2, None, ref_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)


def test_empty_batch():
    sde, t = _sde(), torch.zeros(0)
    u, out = torch.zeros(0, 2, 5), torch.zeros(0, 5)
    assert OPS.hsm_loss_fwd(out, u, t, sde, 0, 1.0, 1, out, None, 0, 0).item() == 0.0
    assert OPS.hsm_loss_fwd(out, u, t, sde, 0, 1.0, 0, out, None, 0, 0).shape == (0,)
    assert OPS.hsm_loss_bwd(torch.tensor(1.0), out, u, t, sde, 0, 1.0, out, None, 0, 0).shape == (0, 5)


# ---- step range (checked on the host for CPU tensors) ------------------------------------------

def _step_call(name, step, n_ts=5):
    u, y, ts, sde = torch.zeros(2, 2, 3), torch.zeros(2, 3), _ts()[:n_ts], _sde()
    s = _i64(step)
    if name == "half_step_":
        return OPS.half_step_(u, ts, s, sde, None, None)
    if name == "sscs_step_":
        return OPS.sscs_step_(u, y, ts, s, sde, False, None, None, False)
    kind = 2 if name == "pf_drift" else 0
    return OPS.affine_step(u, y, ts, s, sde, kind, False, None, None, torch.empty_like(u))


@pytest.mark.parametrize("name", ["half_step_", "sscs_step_", "affine_step"])
@pytest.mark.parametrize("step", [-1, 4, 7])
def test_step_out_of_range_names_the_step_and_the_valid_range(name, step):
    op = "affine_step" if name == "affine_step" else name
    msg = rf"cld_fast::{op}: step = {step} is out of range for a time grid ts of 5 points \(valid 0\.\.3\)"
    with pytest.raises(RuntimeError, match=msg):
        _step_call(name, step)


def test_pf_drift_reads_only_ts_at_step():
    _step_call("pf_drift", 4)  # the last grid point: valid for the drift
    with pytest.raises(RuntimeError, match=r"step = 5 is out of range .* \(valid 0\.\.4\)"):
        _step_call("pf_drift", 5)
    _step_call("pf_drift", 0, n_ts=1)
    with pytest.raises(RuntimeError, match="no valid step"):
        _step_call("half_step_", 0, n_ts=1)


# ---- gddim_step_ ----------------------------------------------------------------------------------

GDDIM_ROWS = 5


def _gddim_table(dtype=torch.float64, seed=7):
    """(S, 22) random coefficient rows (every column nonzero), a strided (transposed) view."""
    return (0.5 * _randn(22, GDDIM_ROWS, dtype=torch.float64, seed=seed)).to(dtype).t()


def _gddim_run(op, dtype, k, h, y_dtype, steps):
    """u: a channels_last (B, 2, 96, 128) state viewed as (B, 2, D) (strides (2D, 1, 2)); hist (K, B, H, D)."""
    b = 3
    u = _randn(b, 2, 96, 128, dtype=dtype, seed=1).contiguous(memory_format=torch.channels_last).view(b, 2, -1)
    assert not u.is_contiguous()
    d = u.shape[2]  # B * D > 2 x 32768 elements: two threads split the work
    hist = _randn(k, b, h, d, dtype=dtype, seed=2)
    y = _randn(b, d, dtype=y_dtype, seed=3)
    table = _gddim_table()
    for step in steps:
        op(u, hist, y, table, _i64(step))
    return u, hist


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_gddim_step_matches_the_reference(k, channels, dtype, y_dtype, threads):
    """Consecutive steps 0..S-1 (the ring of K slots wraps), strided in-place u, against opdefs.gddim_step_ref."""
    steps = list(range(GDDIM_ROWS))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        u, hist = _gddim_run(OPS.gddim_step_, dtype, k, channels, y_dtype, steps)
    finally:
        torch.set_num_threads(before)
    u_ref, hist_ref = _gddim_run(opdefs.gddim_step_ref, dtype, k, channels, y_dtype, steps)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in ((u, u_ref), (hist, hist_ref)):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.abs().max().clamp(min=1.0) if want.numel() else 1.0
        torch.testing.assert_close(got / scale, want / scale, rtol=tol, atol=tol)


def test_gddim_step_float32_table_and_non_contiguous_hist():
    """A float32 table (cast to a float64 state exactly) and a ring buffer updated through a copy."""
    b, d, k = 2, 9, 2
    u, y = _randn(b, 2, d, dtype=torch.float64, seed=1), _randn(b, d, dtype=torch.float64, seed=3)
    base = _randn(k, b, d, 2, dtype=torch.float64, seed=2)
    hist = base.permute(0, 1, 3, 2)  # (K, B, H, D), not contiguous
    table = _gddim_table(torch.float32)
    u_ref, hist_ref = u.clone(), hist.clone()
    for step in (0, 1, 2, 3):
        OPS.gddim_step_(u, hist, y, table, _i64(step))
        opdefs.gddim_step_ref(u_ref, hist_ref, y, table, _i64(step))
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hist, hist_ref, rtol=1e-12, atol=1e-12)
    assert hist.data_ptr() == base.data_ptr()


@pytest.mark.parametrize("step", [-1, 5, 7])
def test_gddim_step_out_of_range_names_the_step_and_the_table(step):
    u, hist, y = _randn(2, 2, 3), _randn(1, 2, 2, 3), _randn(2, 3)
    u0, hist0 = u.clone(), hist.clone()
    msg = rf"cld_fast::gddim_step_: step = {step} is out of range for a table of 5 rows \(valid 0\.\.4\)"
    with pytest.raises(RuntimeError, match=msg):
        OPS.gddim_step_(u, hist, y, _gddim_table(), _i64(step))
    assert torch.equal(u, u0) and torch.equal(hist, hist0)  # nothing written


# ---- torch.compile and the op schemas ------------------------------------------------------------

def _opcheck_cases():
    torch.manual_seed(100)  # torch.rand below draws from the global RNG
    b, d = 3, 8
    u, out, y = _randn(b, 2, d, seed=1), _randn(b, d, seed=2), _randn(b, d, seed=3)
    t, sde, ts, seed, step = _times(b), _sde(), _ts(), _i64(SEED), _i64(1)
    return {
        "perturb": (out, None, t, sde, 0, None, seed, torch.empty(b, 2, d)),
        "hsm_loss_fwd": (out, u, t, sde, 1, 0.5, 1, None, seed, 1, 2),
        "hsm_loss_bwd": (torch.rand(b), out, u, t, sde, 2, 1.0, _randn(b, d, seed=4), None, 1, 0),
        "hsm_loss_fwd_grad": (out, u, t, sde, 1, 0.5, 0, None, seed, 1, 2, torch.empty(b, d)),
        "mixed_score": (out, u, t, sde, 1, 1),
        "half_step_": (u.clone(), ts, step, sde, None, seed),
        "sscs_step_": (u.clone(), y, ts, step, sde, True, None, seed, True),
        "affine_step": (u, y, ts, step, sde, 0, True, None, seed, torch.empty(b, 2, d)),
        "gddim_step_": (u.clone(), _randn(2, b, 2, d, seed=5), y, _randn(4, 22, dtype=torch.float64, seed=6), step),
    }


@pytest.mark.parametrize("name", sorted(opdefs.OPS))
def test_opcheck(name):
    """Schema (mutation annotations), fake kernel and AOT-dispatch consistency of the C++ kernels."""
    torch.library.opcheck(getattr(OPS, name).default, _opcheck_cases()[name])


def test_ops_trace_under_torch_compile():
    b, d = 3, 8
    out, u, t, sde, ts = _randn(b, d, seed=1), _randn(b, 2, d, seed=2), _times(b), _sde(), _ts()
    seed, step = _i64(SEED), _i64(1)

    def f(out, u):
        loss = OPS.hsm_loss_fwd(out, u, t, sde, 0, 1.0, 0, None, seed, 0, 0)
        g = OPS.hsm_loss_bwd(loss, out, u, t, sde, 0, 1.0, None, seed, 0, 0)
        s = OPS.mixed_score(out, u, t, sde, 0, 0)
        w = u.clone()
        OPS.sscs_step_(w, out, ts, step, sde, True, None, seed, False)
        o = torch.empty_like(u)
        OPS.affine_step(w, out, ts, step, sde, 0, False, None, seed, o)
        OPS.half_step_(o, ts, step, sde, None, seed)
        p = torch.empty_like(u)
        OPS.perturb(out, None, t, sde, 0, None, seed, p)
        return loss.sum() + g.sum() + s.sum() + o.sum() + p.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(out, u), f(out, u), rtol=1e-5, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------------

def _state(b=2, d=5, dtype=torch.float32):
    return torch.zeros(b, 2, d, dtype=dtype)


def _t(b=2):
    return torch.full((b,), 0.5)


BAD = {
    "perturb out dtype": (lambda: OPS.perturb(torch.zeros(2, 5).half(), None, _t(), _sde(), 0, None, None,
                                              _state(dtype=torch.half)), "cld_fast::perturb: out"),
    "perturb x0 shape": (lambda: OPS.perturb(torch.zeros(2, 4), None, _t(), _sde(), 0, None, None, _state()), "x0"),
    "perturb eps dtype": (lambda: OPS.perturb(torch.zeros(2, 5), None, _t(), _sde(), 0, torch.zeros(2, 2, 5).double(),
                                              None, _state()), "eps"),
    "perturb objective": (lambda: OPS.perturb(torch.zeros(2, 5), None, _t(), _sde(), 2, None, None, _state()),
                          r"objective must be one of 0 \(hsm\), 1 \(dsm\), got 2"),
    "perturb t shape": (lambda: OPS.perturb(torch.zeros(2, 5), None, _t(3), _sde(), 0, None, None, _state()), "t must"),
    "perturb t dtype": (lambda: OPS.perturb(torch.zeros(2, 5), None, torch.ones(2, dtype=torch.int64), _sde(), 0, None,
                                            None, _state()), "t must be float32 or float64"),
    "perturb sde dtype": (lambda: OPS.perturb(torch.zeros(2, 5), None, _t(), _sde().float(), 0, None, None, _state()),
                          "sde must have dtype"),
    "perturb sde shape": (lambda: OPS.perturb(torch.zeros(2, 5), None, _t(), _sde()[:4], 0, None, None, _state()),
                          "sde must have shape"),
    "loss without noise": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5), _state(), _t(), _sde(), 0, 1.0, 0, None, None, 0, 0),
                           "eps_v or seed"),
    "loss out shape": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 6), _state(), _t(), _sde(), 0, 1.0, 0,
                                                torch.zeros(2, 5), None, 0, 0), "out"),
    "loss out int dtype": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5, dtype=torch.int32), _state(), _t(), _sde(), 0, 1.0,
                                                    0, torch.zeros(2, 5), None, 0, 0), "out"),
    "loss weighting": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5), _state(), _t(), _sde(), 5, 1.0, 0, torch.zeros(2, 5),
                                                None, 0, 0), "weighting must be one of"),
    "loss reduction": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5), _state(), _t(), _sde(), 0, 1.0, 2, torch.zeros(2, 5),
                                                None, 0, 0), "reduction must be 0"),
    "loss grad shape": (lambda: OPS.hsm_loss_bwd(torch.zeros(3), torch.zeros(2, 5), _state(), _t(), _sde(), 0, 1.0,
                                                 torch.zeros(2, 5), None, 0, 0), "grad"),
    "loss grad dtype": (lambda: OPS.hsm_loss_bwd(torch.zeros(2).double(), torch.zeros(2, 5), _state(), _t(), _sde(), 0,
                                                 1.0, torch.zeros(2, 5), None, 0, 0), "grad must have dtype"),
    "mixed u shape": (lambda: OPS.mixed_score(torch.zeros(2, 5), torch.zeros(2, 3, 5), _t(), _sde(), 0, 0), "u must have shape"),
    "loss objective": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5), _state(), _t(), _sde(), 0, 1.0, 0, torch.zeros(2, 5),
                                                None, 2, 0), r"objective must be one of 0 \(hsm\), 1 \(dsm\), got 2"),
    "loss output": (lambda: OPS.hsm_loss_bwd(torch.zeros(2), torch.zeros(2, 5), _state(), _t(), _sde(), 2, 1.0,
                                             torch.zeros(2, 5), None, 0, 3),
                    r"output must be one of 0 \(mixed\), 1 \(eps\), 2 \(score\), got 3"),
    "mixed output": (lambda: OPS.mixed_score(torch.zeros(2, 5), _state(), _t(), _sde(), 0, -1), "output must be one of"),
    "half step ts dtype": (lambda: OPS.half_step_(_state(), _ts().half(), _i64(0), _sde(), None, None), "ts must be"),
    "half step ts shape": (lambda: OPS.half_step_(_state(), _ts().view(5, 1), _i64(0), _sde(), None, None), "ts must be"),
    "sscs y shape": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 4), _ts(), _i64(0), _sde(), False, None, None, False), "y"),
    "sscs eps shape": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 5), _ts(), _i64(0), _sde(), False,
                                              torch.zeros(2, 2, 5), None, False), "eps"),
    "sscs seed dtype": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 5), _ts(), _i64(0), _sde(), False, None,
                                               torch.tensor([1], dtype=torch.int32), False), "seed"),
    "affine step dtype": (lambda: OPS.affine_step(_state(), torch.zeros(2, 5), _ts(), torch.tensor([0.0]), _sde(), 0,
                                                  False, None, None, _state()), "step"),
    "affine kind": (lambda: OPS.affine_step(_state(), torch.zeros(2, 5), _ts(), _i64(0), _sde(), 3, False, None, None,
                                            _state()), r"kind must be one of 0 \(em\), 1 \(denoise\), 2 \(pf_drift\)"),
    "affine partial overlap": (lambda: (lambda buf: OPS.affine_step(buf[:20].view(2, 2, 5), torch.zeros(2, 5), _ts(),
                                                                    _i64(0), _sde(), 0, False, None, None,
                                                                    buf[5:25].view(2, 2, 5)))(torch.zeros(30)),
                               "overlap"),
    "gddim hist shape": (lambda: OPS.gddim_step_(_state(), torch.zeros(3, 2, 2, 5), torch.zeros(2, 5),
                                                 _gddim_table(), _i64(0)), "cld_fast::gddim_step_: hist must be"),
    "gddim hist channels": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 3, 5), torch.zeros(2, 5),
                                                    _gddim_table(), _i64(0)), "hist must be"),
    "gddim hist dtype": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 2, 5).double(), torch.zeros(2, 5),
                                                 _gddim_table(), _i64(0)), "hist must have dtype"),
    "gddim hist overlaps u": (lambda: (lambda s: OPS.gddim_step_(s, s.view(1, 2, 2, 5), torch.zeros(2, 5),
                                                                 _gddim_table(), _i64(0)))(_state()),
                              "hist must not share memory"),
    "gddim y shape": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 2, 5), torch.zeros(2, 4), _gddim_table(),
                                              _i64(0)), "y must have shape"),
    "gddim table shape": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 2, 5), torch.zeros(2, 5),
                                                  torch.zeros(5, 21, dtype=torch.float64), _i64(0)),
                          r"table must have shape \(S, 22\)"),
    "gddim table dtype": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 2, 5), torch.zeros(2, 5),
                                                  _gddim_table().half(), _i64(0)), "table must be float32 or float64"),
    "gddim step dtype": (lambda: OPS.gddim_step_(_state(), torch.zeros(1, 2, 2, 5), torch.zeros(2, 5), _gddim_table(),
                                                 torch.tensor([0], dtype=torch.int32)), "step must be int64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, needle = BAD[case]
    with pytest.raises(RuntimeError, match=needle):
        fn()


def test_loss_gradient_computed_in_the_forward_under_unit_scaled_and_repeated_backward():
    """cf.hsm_loss on the cpu backend takes d loss / d out from its forward: loss.backward() returns
    it as it is, another upstream gradient scales it, and a retained graph gives the same gradient
    again (accumulated into a leaf, never aliased with what the graph keeps)."""
    import cld_fast as cf

    g = _g(21)
    x0, t = torch.randn(3, 40, generator=g), _times(3).float()
    u, noise = cf.perturb(x0, t, cf.CLD(), backend="cpu")
    out = torch.randn(3, 40, generator=g, requires_grad=True)
    loss = cf.hsm_loss(out, u, t, cf.CLD(), noise, backend="cpu")
    ref = cf.hsm_loss(out, u, t, cf.CLD(), noise, backend="torch")
    (want,) = torch.autograd.grad(ref, out)
    (unit,) = torch.autograd.grad(loss, out, retain_graph=True)
    torch.testing.assert_close(unit, want, rtol=3e-6, atol=3e-6)
    kept = unit.clone()
    (scaled,) = torch.autograd.grad(loss, out, torch.tensor(2.5), retain_graph=True)
    torch.testing.assert_close(scaled, kept * 2.5, rtol=1e-6, atol=1e-6)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(out.grad, kept + kept, rtol=1e-6, atol=1e-6)
    assert torch.equal(unit, kept)  # what the first backward handed out is the caller's, untouched since
    fresh = cf.hsm_loss(out, u, t, cf.CLD(), noise, backend="cpu")
    assert torch.equal(torch.autograd.grad(fresh, out)[0], kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_perturb_kernel_reports_nonfinite_inputs_it_reads(dtype, bad):
    """The cpu perturb flags x0 (bit 1) and eps (bit 2) holding NaN or inf in the pass that reads them,
    at any element (vector body or tail, any thread's chunk), for every noise mode and objective;
    cf.perturb turns the flag into the error naming the argument."""
    import cld_fast as cf
    from cld_fast.backends import cpu_backend

    b, d = 3, 70_001  # chunks of several threads, an odd tail
    x0, t, sde = _randn(b, d, seed=3, dtype=dtype), _times(b), _sde()
    eps, out = _randn(b, 2, d, seed=4, dtype=dtype), torch.empty(b, 2, d, dtype=dtype)
    v0 = _randn(b, d, seed=5, dtype=dtype)
    for where in [(0, 0), (1, d - 1), (2, d // 2 + 7)]:
        for objective, v in ((0, None), (1, v0)):
            bx = x0.clone()
            bx[where] = bad
            OPS.perturb(bx, v, t, sde, objective, None, _i64(SEED), out)
            assert cpu_backend.nonfinite_perturb_inputs() == 1
            assert cpu_backend.nonfinite_perturb_inputs() == 0  # the read clears
            be = eps.clone()
            be[where[0], 1, where[1]] = bad
            OPS.perturb(x0, v, t, sde, objective, be, None, out)
            assert cpu_backend.nonfinite_perturb_inputs() == 2
            OPS.perturb(bx, v, t, sde, objective, be, None, out)
            assert cpu_backend.nonfinite_perturb_inputs() == 3
    OPS.perturb(x0, None, t, sde, 0, eps, None, out)
    assert cpu_backend.nonfinite_perturb_inputs() == 0
    bx = x0.clone()
    bx[1, 5] = bad
    with pytest.raises(ValueError, match="x0 contains NaN or inf"):
        cf.perturb(bx, t, SDE, backend="cpu")
    be = eps.clone()
    be[0, 0, 9] = bad
    with pytest.raises(ValueError, match="eps contains NaN or inf"):
        cf.perturb(x0, t, SDE, eps=be, backend="cpu")
