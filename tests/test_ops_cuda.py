"""What is specific to the ``cuda`` backend (the CUDA kernels of cld_fast._C, csrc/cuda).

Every op x dtype x layout against the torch reference is tests/test_ops_contract.py. Here, against the
float64 torch references of ``cld_fast.opdefs`` (or the ``cpu`` backend's C++ kernels): the loss
reduction over long rows (D = 5000, 100_000; 30_000 in proxy mode: the chunked two-stage path) and many small rows
(B = 70_000), bf16 / fp16 network outputs of the loss, the mixed score and the SSCS step, the loss
backward against autograd of the reference, bit-identical repeated losses, the in-kernel Philox noise
against the C++ cpu kernels on the same seed (and its moments), no host synchronisation, CUDA graph
capture of an SSCS and a gDDIM sampler loop, the schemas (opcheck) and argument errors.

Without a GPU and a CUDA build the file skips. ``CLD_FAST_CUDA_TESTS_PROXY=cpu`` runs the same tests
on the CPU with the ``cpu`` backend in place of ``cuda`` (tests/test_ops_cuda_proxy.py does, so the
file is exercised where there is no GPU); what needs CUDA itself (graph capture, sync debug mode, a
CPU tensor passed to the CUDA op) skips there, saying so.

Tolerances (float32 state; results divided by max(1, max |reference|)):
    float32 results                     1e-5  (float32 arithmetic, FMA contraction, in-kernel coefficients)
    losses summed over 70_000 samples   1e-4 relative (float32 accumulation of 7e6 terms)
    seed mode                           + 3e-6 (the Philox words are the same everywhere; the float32
                                        log / sincos of Box-Muller round differently: libdevice, libm, torch)
    bf16 / fp16 gradients (cast)        4e-3 / 5e-4 relative (half an ulp of the output dtype, plus 1e-5)
bf16 / fp16 inputs are exact in float64, so the loss, mixed score and SSCS step keep the float32 tolerance.
"""
import math
import os

import pytest
import torch

from cld_fast import opdefs, philox
from cld_fast.backends import cpu_backend as C
from cld_fast.sde import CLD, kernel_params
from cld_fast.samplers.gddim import gddim_table

PROXY = os.environ.get("CLD_FAST_CUDA_TESTS_PROXY", "")
if PROXY not in ("", "cpu"):
    raise ValueError(f"CLD_FAST_CUDA_TESTS_PROXY must be unset or 'cpu', got {PROXY!r}")

if PROXY:
    K = C
    DEV = torch.device("cpu")
else:
    from cld_fast.backends import cuda_backend as K

    DEV = torch.device("cuda")
    pytestmark = pytest.mark.gpu

if not K.is_available():
    pytest.skip(f"{K.NAME} backend unavailable: {K.why_unavailable() or 'no CUDA device'}", allow_module_level=True)

opdefs.define_library()
OPS = torch.ops.cld_fast
SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
SEED = 2 ** 40 + 12345  # exercises both Philox key words
TS = [1.0, 0.7, 0.45, 0.2, 0.05]
LONG_DS = [5000, 30_000 if PROXY else 100_000]  # proxy mode: the float64 reference's Philox is slow
F32 = 1e-5
SUM_F32 = 1e-4
SEEDED = 3e-6
CAST = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}
NEEDS_CUDA = pytest.mark.skipif(bool(PROXY), reason="proxy mode (CLD_FAST_CUDA_TESTS_PROXY=cpu): needs CUDA itself")
# (weighting, objective, output) codes of cld_fast.sde: the default; DSM with likelihood weighting and a
# mixed output; reweightedv1 with a score output (swapping objective and output changes each non-default)
LOSS_MODES = [(0, 0, 0), (1, 1, 0), (2, 0, 2)]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, offset=0):
    """A contiguous tensor on DEV; ``offset`` > 0 starts it that many elements into its storage, so its
    pointer is not 16-byte aligned (the CUDA kernels then leave their vector loads)."""
    x = torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(DEV, dtype)
    if offset == 0:
        return x
    view = torch.empty(x.numel() + offset, dtype=dtype, device=DEV)[offset:].view(x.shape)
    return view.copy_(x)


def _times(b, seed=0):
    return (torch.rand(b, generator=_g(seed), dtype=torch.float64) * 0.98 + 0.01).to(DEV, torch.float32)


def _i64(value, device=None):
    return torch.tensor([value], dtype=torch.int64, device=DEV if device is None else device)


def _sde(device=None):
    return kernel_params(SDE, DEV if device is None else device)


def _ts(device=None):
    return torch.tensor(TS, dtype=torch.float64, device=DEV if device is None else device)


def _f64(*tensors):
    """float64 CPU copies (exact) for the references."""
    return [None if x is None else x.detach().to("cpu", torch.float64) for x in tensors]


def _cpu(*tensors):
    return [None if x is None else x.detach().cpu() for x in tensors]


def _close(got, want, tol, dtype=None):
    """|got - want| <= tol * max(1, max |want|) elementwise (plus tol relative), on the CPU in float64."""
    assert got.shape == want.shape and got.device.type == DEV.type  # torch.device("cuda") != "cuda:0"
    if dtype is not None:
        assert got.dtype == dtype
    want = want.detach().to("cpu", torch.float64)
    got = got.detach().to("cpu", torch.float64)
    scale = want.abs().max().clamp(min=1.0) if want.numel() else 1.0
    torch.testing.assert_close(got / scale, want / scale, rtol=tol, atol=tol)


def test_backend_contract():
    assert K.NAME == ("cpu" if PROXY else "cuda")
    assert K.supports(DEV, torch.float32)
    for name in opdefs.OPS:
        assert K.op(name) is getattr(OPS, name)
    if not PROXY:
        import cld_fast._C as ext

        assert ext.with_cuda()
        assert not K.supports(DEV, torch.float64) and not K.supports(torch.device("cpu"), torch.float32)


# ---- HSM loss: reductions ------------------------------------------------------------------------

def _loss_inputs(b, d, out_dtype=torch.float32, seed=0):
    out = _randn(b, d, dtype=out_dtype, seed=seed + 1)
    u = _randn(b, 2, d, seed=seed + 2)
    t = _times(b, seed=seed + 3)
    eps_v = _randn(b, d, seed=seed + 4)
    grad = (torch.rand(b, generator=_g(seed + 5), dtype=torch.float64) + 0.5).to(DEV, torch.float32)
    return out, u, t, eps_v, grad


def _loss_both(out, u, t, eps_v, seed, mode, reduction, scale=0.5):
    """(kernel, float64 reference) of hsm_loss_fwd for the (weighting, objective, output) codes ``mode``."""
    w, obj, o = mode
    got = K.op("hsm_loss_fwd")(out, u, t, _sde(), w, scale, reduction, eps_v, seed, obj, o)
    o64, u64, t64, e64 = _f64(out, u, t, eps_v)
    want = opdefs.hsm_loss_fwd_ref(o64, u64, t64, _sde("cpu"), w, scale, reduction, e64, *_cpu(seed), obj, o)
    return got, want


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("noise", ["eps", "seed"])
@pytest.mark.parametrize("D", LONG_DS)
@pytest.mark.parametrize("B", [1, 3])
def test_hsm_loss_long_rows(B, D, noise, mode):
    """Rows longer than one block: the per-sample chunked reduction, per sample and summed."""
    out, u, t, eps_v, _ = _loss_inputs(B, D)
    eps_v, seed = (eps_v, None) if noise == "eps" else (None, _i64(SEED))
    for reduction in (0, 1):
        got, want = _loss_both(out, u, t, eps_v, seed, mode, reduction)
        assert got.dtype == torch.float32 and got.shape == (() if reduction else (B,))
        _close(got, want, F32 if noise == "eps" else SEEDED + F32)


@pytest.mark.parametrize("D", [1, 2, 3, 16, 100])
def test_hsm_loss_many_small_rows(D):
    """Many samples per block (lanes per sample) and a grid-stride loop over 70_000 samples."""
    out, u, t, eps_v, _ = _loss_inputs(70_000, D, seed=D)
    got, want = _loss_both(out, u, t, eps_v, None, LOSS_MODES[0], 0)
    _close(got, want, F32)
    got, want = _loss_both(out, u, t, eps_v, None, LOSS_MODES[0], 1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=SUM_F32, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [7, 1024, 5000])
def test_hsm_loss_half_precision_out(out_dtype, D):
    """bf16 / fp16 network outputs: the loss in float32, the gradient in the output's dtype."""
    out, u, t, eps_v, grad = _loss_inputs(3, D, out_dtype=out_dtype)
    for mode in LOSS_MODES:
        got, want = _loss_both(out, u, t, eps_v, None, mode, 0)
        _close(got, want, F32, torch.float32)
        w, obj, o = mode
        g = K.op("hsm_loss_bwd")(grad, out, u, t, _sde(), w, 0.5, eps_v, None, obj, o)
        o64, u64, t64, e64, g64 = _f64(out, u, t, eps_v, grad)
        r, ws, a = opdefs._loss_residual(o64, u64, t64, _sde("cpu"), w, 0.5, e64, None, obj, o)
        want_g = (2.0 * (ws * g64)).unsqueeze(1) * (a * r)  # float64, not rounded to out_dtype
        _close(g, want_g, CAST[out_dtype], out_dtype)


@pytest.mark.parametrize("reduction", [0, 1])
@pytest.mark.parametrize("noise", ["eps", "seed"])
def test_hsm_loss_bwd_matches_autograd_of_the_reference(noise, reduction):
    out, u, t, eps_v, grad = _loss_inputs(5, 1000)
    eps_v, seed = (eps_v, None) if noise == "eps" else (None, _i64(SEED))
    if reduction == 1:
        grad = grad[0].clone()  # 0-d
    for w, obj, o in LOSS_MODES:
        o64, u64, t64, e64, g64 = _f64(out, u, t, eps_v, grad)
        leaf = o64.requires_grad_(True)
        opdefs.hsm_loss_fwd_ref(leaf, u64, t64, _sde("cpu"), w, 0.25, reduction, e64, *_cpu(seed), obj, o).backward(g64)
        got = K.op("hsm_loss_bwd")(grad, out, u, t, _sde(), w, 0.25, eps_v, seed, obj, o)
        _close(got, leaf.grad, F32 if noise == "eps" else SEEDED + F32, torch.float32)


@pytest.mark.parametrize("noise", ["eps", "seed"])
@pytest.mark.parametrize("D", [1000, LONG_DS[-1]])
def test_hsm_loss_is_deterministic(D, noise):
    """Two runs of the same loss are bit-identical (no atomics in the reduction), and right."""
    out, u, t, eps_v, grad = _loss_inputs(8, D)
    eps_v, seed = (eps_v, None) if noise == "eps" else (None, _i64(SEED))
    for reduction in (0, 1):
        a = K.op("hsm_loss_fwd")(out, u, t, _sde(), 0, 1.0, reduction, eps_v, seed, 0, 0)
        b = K.op("hsm_loss_fwd")(out, u, t, _sde(), 0, 1.0, reduction, eps_v, seed, 0, 0)
        assert torch.equal(a, b)
        _, want = _loss_both(out, u, t, eps_v, seed, (0, 0, 0), reduction, scale=1.0)
        _close(a, want, F32 if noise == "eps" else SEEDED + F32)
    ga = K.op("hsm_loss_bwd")(grad, out, u, t, _sde(), 0, 1.0, eps_v, seed, 0, 0)
    gb = K.op("hsm_loss_bwd")(grad, out, u, t, _sde(), 0, 1.0, eps_v, seed, 0, 0)
    assert torch.equal(ga, gb)


# ---- mixed score and SSCS with half-precision network outputs --------------------------------------

@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [7, 1024, 5001])
def test_mixed_score_network_output_dtypes(D, out_dtype):
    out, u, t = _randn(3, D, dtype=out_dtype, seed=1), _randn(3, 2, D, seed=2), _times(3, seed=3)
    for obj, o in ((0, 0), (1, 1), (0, 2)):
        got = K.op("mixed_score")(out, u, t, _sde(), obj, o)
        o64, u64, t64 = _f64(out, u, t)
        _close(got, opdefs.mixed_score_ref(o64, u64, t64, _sde("cpu"), obj, o), F32, torch.float32)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [33, 1024])
def test_sscs_step_network_output_dtypes(D, y_dtype):
    """Every step of the grid (the last has no opening half step), mixed or not, both closing half steps."""
    u, y = _randn(3, 2, D, seed=11), _randn(3, D, dtype=y_dtype, seed=12)
    eps4 = _randn(3, 4, D, seed=13)
    for step in range(len(TS) - 1):
        for mixed, official in ((True, False), (False, False), (True, True)):
            w = u.clone()
            K.op("sscs_step_")(w, y, _ts(), _i64(step), _sde(), mixed, eps4, None, official)
            ref, y64, e64 = _f64(u, y, eps4)
            opdefs.sscs_step_ref(ref, y64, _ts("cpu"), _i64(step, "cpu"), _sde("cpu"), mixed, e64, None, official)
            _close(w, ref, F32, torch.float32)


def _obs(b, d, channels, seed=0, offset=0):
    """An inpainting condition (x_obs, a 0/1 mask[, z_x, z_v]) on DEV (cld_fast.conditions)."""
    obs = _randn(b, channels, d, seed=seed, offset=offset)
    obs[:, 1] = (torch.rand(b, d, generator=_g(seed + 1)) < 0.5).to(DEV, torch.float32)
    return obs


@pytest.mark.parametrize("mode", ["eps", "seed", "mean"])
@pytest.mark.parametrize("D", [7, 1024])
@pytest.mark.parametrize("offset", [0, 1])
def test_step_ops_with_an_inpainting_condition(mode, D, offset):
    """Every step op's replacement (obs) against the float64 reference, at every step of the grid (the
    last sscs step has no opening half step; the gDDIM denoising row sets x = x_obs)."""
    b = 3
    obs = _obs(b, D, 4 if mode == "eps" else 2, seed=21, offset=offset)
    seed = _i64(SEED) if mode == "seed" else None
    tol = F32 + (SEEDED if mode == "seed" else 0.0)
    u, y = _randn(b, 2, D, seed=22), _randn(b, D, seed=23)
    table = gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), 2, "eps", mixed=True).to(DEV)
    cpu_seed = None if seed is None else _i64(SEED, "cpu")
    for step in range(len(TS) - 1):
        calls = {
            "half_step_": (lambda w, f: f(w, _ts(w.device), _i64(step, w.device), _sde(w.device), None,
                                          seed if w.device == DEV else cpu_seed, obs_of(w))),
            "sscs_step_": (lambda w, f: f(w, y_of(w), _ts(w.device), _i64(step, w.device), _sde(w.device), True, None,
                                          seed if w.device == DEV else cpu_seed, False, obs_of(w))),
            "affine_step": (lambda w, f: f(w, y_of(w), _ts(w.device), _i64(step, w.device), _sde(w.device),
                                           1 if step == len(TS) - 2 else 0, True, None,
                                           seed if w.device == DEV else cpu_seed, w, obs_of(w))),
            "gddim_step_": (lambda w, f: f(w, torch.zeros(1, b, 2, D, dtype=w.dtype, device=w.device), y_of(w),
                                           table if w.device == DEV else table.cpu(), _i64(step + 1, w.device),
                                           _ts(w.device), _sde(w.device), seed if w.device == DEV else cpu_seed,
                                           obs_of(w))),
        }

        def obs_of(w):
            return obs if w.device == DEV and w.dtype == torch.float32 else _f64(obs)[0]

        def y_of(w):
            return y if w.device == DEV and w.dtype == torch.float32 else _f64(y)[0]

        for name, call in calls.items():
            got = u.clone()
            call(got, K.op(name))
            want = _f64(u)[0]
            call(want, opdefs.OPS[name].reference)
            _close(got, want, tol, torch.float32)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [7, 1024])
@pytest.mark.parametrize("offset", [0, 1])
def test_step_ops_with_classifier_free_guidance(y_dtype, D, offset):
    """Every step op with y_uncond (the two halves of one batch-doubled network output, views; ``offset``
    shifts the buffer off a 16-byte boundary) against the float64 reference fed the combination
    (1 + w) y - w y_uncond computed in float64, at every step of the grid; gDDIM with every ring."""
    b, w = 3, 2.5
    doubled = _randn(2 * b, D, dtype=y_dtype, seed=31, offset=offset)
    y, y_un = doubled[:b], doubled[b:]
    y64 = (1.0 + w) * _f64(y)[0] - w * _f64(y_un)[0]
    u, eps4, eps1 = _randn(b, 2, D, seed=32), _randn(b, 4, D, seed=33), _randn(b, D, seed=34)
    ts, sde, ts64, sde64 = _ts(), _sde(), _ts("cpu"), _sde("cpu")
    for step in range(len(TS) - 1):
        got, want = u.clone(), _f64(u)[0]
        K.op("sscs_step_")(got, y, ts, _i64(step), sde, True, eps4, None, False, None, y_un, w)
        opdefs.sscs_step_ref(want, y64, ts64, _i64(step, "cpu"), sde64, True, _f64(eps4)[0], None, False)
        _close(got, want, F32, torch.float32)
        for kind, eps in ((0, eps1), (1, None)):
            got, want = u.clone(), _f64(u)[0]
            K.op("affine_step")(got, y, ts, _i64(step), sde, kind, True, eps, None, got, None, y_un, w)
            opdefs.affine_step_ref(want, y64, ts64, _i64(step, "cpu"), sde64, kind, True, *_f64(eps), None, want)
            _close(got, want, F32, torch.float32)
    for order, predict in ((1, "eps"), (2, "x0"), (2, "eps"), (3, "x0"), (3, "eps")):
        table = gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), order, predict, mixed=True)
        hist = _randn(order - 1, b, 1 if predict == "x0" else 2, D, seed=35)
        got, want, h_got, h_want = u.clone(), _f64(u)[0], hist.clone(), _f64(hist)[0]
        for step in range(table.shape[0]):
            K.op("gddim_step_")(got, h_got, y, table.to(DEV), _i64(step), None, None, None, None, y_un, w)
            opdefs.gddim_step_ref(want, h_want, y64, table, _i64(step, "cpu"))
            _close(got, want, F32, torch.float32)
            _close(h_got, h_want, F32, torch.float32)


@pytest.mark.parametrize("offset", [1, 2])
@pytest.mark.parametrize("D", [7, 1024, 5000])
def test_misaligned_pointers(D, offset):
    """Every argument starting off a 16-byte boundary: the scalar / 8-byte paths give the same results."""
    b = 3
    x0, out, y = (_randn(b, D, seed=s, offset=offset) for s in (1, 2, 3))
    eps2, eps4 = _randn(b, 2, D, seed=4, offset=offset), _randn(b, 4, D, seed=5, offset=offset)
    u, t, sde = _randn(b, 2, D, seed=6, offset=offset), _times(b, seed=7), _sde()
    assert u.data_ptr() % 16 != 0
    x64, o64, y64, e2, e4, u64, t64 = _f64(x0, out, y, eps2, eps4, u, t)
    p = _randn(b, 2, D, seed=8, offset=offset)
    K.op("perturb")(x0, None, t, sde, 0, eps2, None, p)
    want = torch.empty(b, 2, D, dtype=torch.float64)
    opdefs.perturb_ref(x64, None, t64, _sde("cpu"), 0, e2, None, want)
    _close(p, want, F32)
    got = K.op("hsm_loss_fwd")(out, u, t, sde, 0, 1.0, 0, eps2[:, 1], None, 0, 0)
    _close(got, opdefs.hsm_loss_fwd_ref(o64, u64, t64, _sde("cpu"), 0, 1.0, 0, e2[:, 1], None), F32)
    _close(K.op("mixed_score")(out, u, t, sde, 0, 0), opdefs.mixed_score_ref(o64, u64, t64, _sde("cpu")), F32)
    ptr = u.data_ptr()
    K.op("sscs_step_")(u, y, _ts(), _i64(1), sde, True, eps4, None, False)
    assert u.data_ptr() == ptr
    opdefs.sscs_step_ref(u64, y64, _ts("cpu"), _i64(1, "cpu"), _sde("cpu"), True, e4, None)
    _close(u, u64, F32)


# ---- in-kernel Philox noise -----------------------------------------------------------------------

def _seeded_runs(dev, impl=None, dtype=torch.float32, b=3, d=4099):
    """Every op with in-kernel noise in seed mode on ``dev``, the same host values on every device.
    ``impl`` maps op names to callables of the opdefs schema (default: the torch.ops kernels)."""
    ops = impl or {name: getattr(OPS, name) for name in opdefs.OPS}

    def r(*shape, seed):
        return torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dev, dtype)

    x0, y, u = r(b, d, seed=1), r(b, d, seed=2), r(b, 2, d, seed=3)
    t = (torch.rand(b, generator=_g(4), dtype=torch.float64) * 0.98 + 0.01).to(dev, torch.float32)
    sde, ts, seed = kernel_params(SDE, dev), _ts(dev), _i64(SEED, dev)
    res = {}
    p = torch.empty(b, 2, d, device=dev, dtype=dtype)
    ops["perturb"](x0, None, t, sde, 0, None, seed, p)
    res["perturb"] = p
    res["hsm_loss_fwd"] = ops["hsm_loss_fwd"](y, u, t, sde, 0, 1.0, 0, None, seed, 0, 0)
    w = u.clone()
    ops["half_step_"](w, ts, _i64(1, dev), sde, None, seed)
    res["half_step_"] = w
    w = u.clone()
    ops["sscs_step_"](w, y, ts, _i64(2, dev), sde, True, None, seed, False)
    res["sscs_step_"] = w
    o = torch.empty_like(u)
    ops["affine_step"](u, y, ts, _i64(3, dev), sde, 0, True, None, seed, o)
    res["em"] = o
    return res


def test_seed_mode_noise_matches_the_cpu_kernels_and_the_reference():
    """The same seed draws the same Philox words on the device as in the C++ cpu kernels and in
    cld_fast.philox (the float64 reference): results differ only by float32 rounding of log / sincos
    (and, against the reference, float32 arithmetic). Repeated runs are bit-identical."""
    got, again = _seeded_runs(DEV), _seeded_runs(DEV)
    refs = {name: d_.reference for name, d_ in opdefs.OPS.items()}
    want = _seeded_runs(torch.device("cpu"), refs, torch.float64)
    cpu = None if PROXY else _seeded_runs(torch.device("cpu"))
    for name, g in got.items():
        assert torch.equal(g, again[name]), name
        assert g.dtype == torch.float32
        _close(g, want[name], SEEDED + F32)
        if cpu is not None:
            _close(g, cpu[name].to(DEV), SEEDED)


def test_seed_mode_noise_is_the_contract_normals_with_unit_moments():
    """A half step of the zero state is pure noise L (z0, z1): whitened, z equals cld_fast.philox's
    normals for (seed, step, TAG_HALF_STEP), with mean 0 and unit covariance."""
    b, d = 4, 50_000
    step = 1
    u = torch.zeros(b, 2, d, device=DEV)
    K.op("half_step_")(u, _ts(), _i64(step), _sde(), None, _i64(SEED))
    r = SDE.half_step_coefficients(torch.tensor(TS[step], dtype=torch.float64), TS[step] - TS[step + 1])
    l11, l21, l22 = r[4].item(), r[5].item(), r[6].item()
    x, v = u[:, 0].double().cpu().reshape(-1), u[:, 1].double().cpu().reshape(-1)
    z0 = x / l11
    z1 = (v - l21 * z0) / l22
    want = philox.philox_normals(b * d, _i64(SEED, "cpu"), _i64(step, "cpu"), philox.TAG_HALF_STEP)
    torch.testing.assert_close(z0, want[0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z1, want[1].double(), rtol=1e-5, atol=1e-5)
    n = z0.numel()
    for z in (z0, z1):
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z0 * z1).mean().item()) < 5 / math.sqrt(n)


# ---- no host synchronisation and CUDA graphs -----------------------------------------------------

@NEEDS_CUDA
def test_no_host_synchronisation():
    b, d = 4, 4096
    out, u, t, _, _ = _loss_inputs(b, d)
    sde, ts, seed, step = _sde(), _ts(), _i64(SEED), _i64(1)
    table = gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), 3, "eps", mixed=True).to(DEV)
    hist = torch.zeros(2, b, 2, d, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.perturb(out, None, t, sde, 0, None, seed, torch.empty_like(u))
        loss = OPS.hsm_loss_fwd(out, u, t, sde, 0, 1.0, 1, None, seed, 0, 0)
        OPS.hsm_loss_bwd(loss, out, u, t, sde, 0, 1.0, None, seed, 0, 0)
        OPS.mixed_score(out, u, t, sde, 0, 0)
        OPS.half_step_(u, ts, step, sde, None, seed)
        OPS.sscs_step_(u, out, ts, step, sde, True, None, seed, False)
        OPS.affine_step(u, out, ts, step, sde, 0, True, None, seed, u)
        OPS.gddim_step_(u, hist, out, table, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _capture(body):
    """A CUDA graph of ``body()`` after one warm-up run on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


@NEEDS_CUDA
def test_sscs_loop_captures_in_a_cuda_graph():
    """One captured SSCS step replayed S times: each replay reads the step index and seed from device
    memory, so the loop equals the eager kernels bit for bit and the float64 reference to 1e-5."""
    b, d = 3, 1000
    y, u0, sde, ts = _randn(b, d, seed=2), _randn(b, 2, d, seed=1), _sde(), _ts()
    seed, step = _i64(SEED), _i64(0)
    u = u0.clone()

    def body():
        OPS.sscs_step_(u, y, ts, step, sde, True, None, seed, False)
        step.add_(1)

    graph = _capture(body)
    u.copy_(u0)
    step.fill_(0)
    for _ in range(len(TS) - 1):
        graph.replay()
    eager, ref = u0.clone(), _f64(u0)[0]
    for k in range(len(TS) - 1):
        OPS.sscs_step_(eager, y, ts, _i64(k), sde, True, None, seed, False)
        opdefs.sscs_step_ref(ref, _f64(y)[0], _ts("cpu"), _i64(k, "cpu"), _sde("cpu"), True, None,
                             _i64(SEED, "cpu"), False)
    torch.cuda.synchronize()
    assert torch.equal(u, eager)
    _close(u, ref, F32 + SEEDED)


@NEEDS_CUDA
def test_gddim_loop_captures_in_a_cuda_graph():
    """One captured order-3 gDDIM step replayed over the whole table (the ring buffer wraps)."""
    b, d = 3, 1000
    table = gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), 3, "eps", mixed=True).to(DEV)
    y, u0 = _randn(b, d, seed=2), _randn(b, 2, d, seed=1)
    u, hist, step = u0.clone(), torch.zeros(2, b, 2, d, device=DEV), _i64(0)

    def body():
        OPS.gddim_step_(u, hist, y, table, step)
        step.add_(1)

    graph = _capture(body)
    u.copy_(u0)
    hist.zero_()
    step.fill_(0)
    for _ in range(table.shape[0]):
        graph.replay()
    eager, eh = u0.clone(), torch.zeros_like(hist)
    ref, rh = _f64(u0, eh)
    for k in range(table.shape[0]):
        OPS.gddim_step_(eager, eh, y, table, _i64(k))
        opdefs.gddim_step_ref(ref, rh, _f64(y)[0], table.cpu(), _i64(k, "cpu"))
    torch.cuda.synchronize()
    assert torch.equal(u, eager) and torch.equal(hist, eh)
    _close(u, ref, F32)
    _close(hist, rh, F32)


# ---- schemas and argument errors -----------------------------------------------------------------

def _opcheck_cases():
    b, d = 3, 8
    u, out, y = _randn(b, 2, d, seed=1), _randn(b, d, seed=2), _randn(b, d, seed=3)
    t, sde, ts, seed, step = _times(b), _sde(), _ts(), _i64(SEED), _i64(1)
    grad = (torch.rand(b, generator=_g(4), dtype=torch.float64) + 0.5).to(DEV, torch.float32)
    table = gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), 3, "eps", mixed=True).to(DEV)
    return {
        "perturb": (out, None, t, sde, 0, None, seed, torch.empty(b, 2, d, device=DEV)),
        "hsm_loss_fwd": (out.bfloat16(), u, t, sde, 1, 0.5, 1, None, seed, 1, 2),
        "hsm_loss_fwd_grad": (out.bfloat16(), u, t, sde, 1, 0.5, 1, None, seed, 1, 2,
                              torch.empty(b, d, dtype=torch.bfloat16, device=DEV)),
        "hsm_loss_bwd": (grad, out.half(), u, t, sde, 2, 1.0, _randn(b, d, seed=5), None, 1, 0),
        "mixed_score": (out.bfloat16(), u, t, sde, 1, 1),
        "half_step_": (u.clone(), ts, step, sde, None, seed),
        "sscs_step_": (u.clone(), y.half(), ts, step, sde, True, None, seed, True),
        "affine_step": (u, y, ts, step, sde, 0, True, None, seed, torch.empty(b, 2, d, device=DEV), None,
                        _randn(b, d, seed=8), 1.5),
        "gddim_step_": (u.clone(), _randn(2, b, 2, d, seed=6), y.bfloat16(), table, step, ts, sde, seed,
                        _obs(b, d, 2, seed=7)),
    }


@pytest.mark.parametrize("name", sorted(opdefs.OPS))
def test_opcheck(name):
    """Schema (mutation annotations), fake kernel and AOT-dispatch consistency of the kernels."""
    torch.library.opcheck(getattr(OPS, name).default, _opcheck_cases()[name])


def _state(b=2, d=5, dtype=torch.float32, device=None):
    return torch.zeros(b, 2, d, dtype=dtype, device=DEV if device is None else device)


def _z(*shape, dtype=torch.float32, device=None):
    return torch.zeros(*shape, dtype=dtype, device=DEV if device is None else device)


def _t(b=2, device=None):
    return torch.full((b,), 0.5, device=DEV if device is None else device)


CPU = torch.device("cpu")
BAD = {
    "perturb half state": (lambda: OPS.perturb(_z(2, 5, dtype=torch.half), None, _t(), _sde(), 0, None, None,
                                               _state(dtype=torch.half)), "cld_fast::perturb: out"),
    "perturb x0 shape": (lambda: OPS.perturb(_z(2, 4), None, _t(), _sde(), 0, None, None, _state()), "x0"),
    "perturb eps dtype": (lambda: OPS.perturb(_z(2, 5), None, _t(), _sde(), 0, _z(2, 2, 5, dtype=torch.half), None,
                                              _state()), "eps"),
    "perturb t int": (lambda: OPS.perturb(_z(2, 5), None, _t().long(), _sde(), 0, None, None, _state()), "t must"),
    "perturb sde float32": (lambda: OPS.perturb(_z(2, 5), None, _t(), _sde().float(), 0, None, None, _state()),
                            "sde must have dtype"),
    "loss seed int32": (lambda: OPS.hsm_loss_fwd(_z(2, 5), _state(), _t(), _sde(), 0, 1.0, 0, None,
                                                 _i64(1).int(), 0, 0), "seed"),
    "loss out int": (lambda: OPS.hsm_loss_fwd(_z(2, 5, dtype=torch.int32), _state(), _t(), _sde(), 0, 1.0, 0,
                                              _z(2, 5), None, 0, 0), "out"),
    "loss eps_v shape": (lambda: OPS.hsm_loss_fwd(_z(2, 5), _state(), _t(), _sde(), 0, 1.0, 0, _z(2, 4), None, 0, 0),
                         "eps_v"),
    "loss grad shape": (lambda: OPS.hsm_loss_bwd(_z(3), _z(2, 5), _state(), _t(), _sde(), 0, 1.0, _z(2, 5), None, 0,
                                                 0), "grad"),
    "mixed out shape": (lambda: OPS.mixed_score(_z(2, 6), _state(), _t(), _sde(), 0, 0), "out"),
    "mixed output code": (lambda: OPS.mixed_score(_z(2, 5), _state(), _t(), _sde(), 0, 3), "output must be one of"),
    "half step ts half": (lambda: OPS.half_step_(_state(), _ts().half(), _i64(0), _sde(), None, None), "ts must be"),
    "sscs y int": (lambda: OPS.sscs_step_(_state(), _z(2, 5, dtype=torch.int32), _ts(), _i64(0), _sde(), False, None,
                                          None, False), "y"),
    "sscs eps shape": (lambda: OPS.sscs_step_(_state(), _z(2, 5), _ts(), _i64(0), _sde(), False, _z(2, 2, 5), None,
                                              False), "eps"),
    "affine step float": (lambda: OPS.affine_step(_state(), _z(2, 5), _ts(), _z(1), _sde(), 0, False, None, None,
                                                  _state()), "step"),
    "affine eps shape": (lambda: OPS.affine_step(_state(), _z(2, 5), _ts(), _i64(0), _sde(), 0, False, _z(2, 2, 5),
                                                 None, _state()), "eps"),
    "sscs y_uncond dtype": (lambda: OPS.sscs_step_(_state(), _z(2, 5), _ts(), _i64(0), _sde(), True, None, None,
                                                   False, None, _z(2, 5, dtype=torch.bfloat16), 1.0), "y_uncond"),
    "affine pf_drift y_uncond": (lambda: OPS.affine_step(_state(), _z(2, 5), _ts(), _i64(0), _sde(), 2, True, None,
                                                         None, _state(), None, _z(2, 5), 1.0), "y_uncond"),
    "gddim y_uncond shape": (lambda: OPS.gddim_step_(_state(), _z(1, 2, 2, 5), _z(2, 5),
                                                     gddim_table(SDE, torch.tensor(TS, dtype=torch.float64)).to(DEV),
                                                     _i64(0), None, None, None, None, _z(2, 4), 1.0), "y_uncond"),
    "gddim table shape": (lambda: OPS.gddim_step_(_state(), _z(1, 2, 2, 5), _z(2, 5),
                                                  _z(5, 21, dtype=torch.float64), _i64(0)), "table must have shape"),
}
# a CPU tensor handed to the CUDA op (the dispatcher picks the CUDA kernel from the other arguments)
CPU_BAD = {
    "perturb out on cpu": (lambda: OPS.perturb(_z(2, 5), None, _t(), _sde(), 0, None, None, _state(device=CPU)),
                           "out must be a CUDA tensor"),
    "loss u on cpu": (lambda: OPS.hsm_loss_fwd(_z(2, 5), _state(device=CPU), _t(), _sde(), 0, 1.0, 0, _z(2, 5), None,
                                               0, 0), "u must be a CUDA tensor"),
    "loss seed on cpu": (lambda: OPS.hsm_loss_fwd(_z(2, 5), _state(), _t(), _sde(), 0, 1.0, 0, None, _i64(1, CPU), 0,
                                                  0), "seed"),
    "half step step on cpu": (lambda: OPS.half_step_(_state(), _ts(), _i64(0, CPU), _sde(), None, None), "step"),
    "sscs sde on cpu": (lambda: OPS.sscs_step_(_state(), _z(2, 5), _ts(), _i64(0), _sde(CPU), True, None, None,
                                               False), "sde"),
    "gddim y on cpu": (lambda: OPS.gddim_step_(_state(), _z(1, 2, 2, 5), _z(2, 5, device=CPU),
                                               gddim_table(SDE, torch.tensor(TS, dtype=torch.float64)).to(DEV),
                                               _i64(0)), "y"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, needle = BAD[case]
    with pytest.raises(RuntimeError, match=needle):
        fn()


@NEEDS_CUDA
@pytest.mark.parametrize("case", sorted(CPU_BAD))
def test_cpu_tensor_to_the_cuda_op_names_the_argument(case):
    fn, needle = CPU_BAD[case]
    with pytest.raises(RuntimeError, match=needle):
        fn()
