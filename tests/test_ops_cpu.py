"""The ``cpu`` backend (C++ kernels of cld_fast._C, csrc/cpu) against the ``torch`` reference backend.

Every op on random odd shapes in float32 and float64: explicit noise to float rounding, seed mode
against the reference's seed mode (the same Philox uniform bits; normals to float32 rounding of
log / cos / sin), reduced-precision network outputs, the loss gradient against autograd, per-step
tables read at a step other than 0, the affine step in place and out of place, and bad inputs.
"""
import pytest
import torch

import cld_fast as cf
from cld_fast import philox
from cld_fast.backends import cpu_backend as C
from cld_fast.backends import torch_backend as R
from cld_fast.sde import CLD

if not C.is_available():
    pytest.skip(f"cpu backend unavailable: {C.why_unavailable()}", allow_module_level=True)

OPS = torch.ops.cld_fast
BS = [1, 3, 5]
DS = [1, 7, 33, 1023]
DTYPES = [torch.float32, torch.float64]
SEED = 2 ** 40 + 12345  # exercises both key words
STEP = 3                # a table row other than 0 (and the Philox counter word c2)
EXACT = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SEEDED = dict(rtol=1e-5, atol=1e-5)
HALF = dict(rtol=1e-2, atol=1e-2)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dtype)


def _seed(value=SEED):
    return torch.tensor([value], dtype=torch.int64)


def _step(value=STEP):
    return torch.tensor([value], dtype=torch.int64)


def _table(cols, dtype, rows=5, seed=1):
    return (0.5 * _randn(rows, cols, seed=seed)).to(dtype)


def _close(actual, expected, **tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tol)


def test_backend_contract():
    assert C.NAME == "cpu" and "cpu" in cf.backends()
    assert C.supports(torch.device("cpu"), torch.float32) and C.supports(torch.device("cpu"), torch.float64)
    assert not C.supports(torch.device("cpu"), torch.float16)
    import cld_fast._C as ext

    assert ext.has_cpu_kernels is True
    assert isinstance(ext.with_cuda(), bool)


# ---- perturb ------------------------------------------------------------------------------------

@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_v0", [False, True])
def test_perturb_eps_exact(B, D, dtype, with_v0):
    x0, coef, eps = _randn(B, D, dtype=dtype, seed=1), _randn(B, 7, dtype=dtype, seed=2), _randn(B, 2, D, dtype=dtype, seed=3)
    v0 = _randn(B, D, dtype=dtype, seed=4) if with_v0 else None
    want = R.perturb(x0, coef, torch.empty(B, 2, D, dtype=dtype), eps=eps, v0=v0)
    got = C.perturb(x0, coef, torch.empty(B, 2, D, dtype=dtype), eps=eps, v0=v0)
    _close(got, want, **EXACT[dtype])


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_seed_mode(B, D, dtype):
    x0, coef = _randn(B, D, dtype=dtype, seed=1), _randn(B, 7, dtype=dtype, seed=2)
    want = R.perturb(x0, coef, torch.empty(B, 2, D, dtype=dtype), seed=_seed())
    got = C.perturb(x0, coef, torch.empty(B, 2, D, dtype=dtype), seed=_seed())
    _close(got, want, **SEEDED)


def test_perturb_no_noise_is_the_mean():
    x0, v0, coef = _randn(3, 7, seed=1), _randn(3, 7, seed=2), _randn(3, 7, seed=3)
    got = C.perturb(x0, coef, torch.empty(3, 2, 7), v0=v0)
    want = R.perturb(x0, coef, torch.empty(3, 2, 7), eps=torch.zeros(3, 2, 7), v0=v0)
    _close(got, want, **EXACT[torch.float32])


# ---- noise contract -----------------------------------------------------------------------------

@pytest.mark.parametrize("start", [0, 2 ** 32 - 100])
@pytest.mark.parametrize("seed,step,tag", [(0, 0, 0), (SEED, STEP, philox.TAG_SSCS), (2 ** 62 - 1, 2 ** 32 + 7, 3)])
def test_compiled_philox_bits_and_uniforms_are_exact(start, seed, step, tag):
    """The Philox4x32-10 of csrc/include/cld_philox.h gives the reference's bits and uniforms exactly,
    including element indices past 2^32 (the high counter word)."""
    import cld_fast._C as ext

    bits, unif = ext._philox_probe(seed, start, 200, step, tag)
    ref = torch.stack(philox.philox_bits(200, seed, step, tag, start=start))
    assert torch.equal(bits, ref)
    assert torch.equal(unif, philox.uniform_from_bits(ref))


@pytest.mark.parametrize("seed,step", [(0, 0), (SEED, STEP), (2 ** 62 - 1, 7)])
def test_seed_normals_match_philox_contract(seed, step):
    """z0..z3 drawn in C++ equal cld_fast.philox.philox_normals (half step: z0, z1; SSCS: z2, z3)."""
    B, D = 3, 333
    n = B * D
    tab = torch.zeros(step + 1, 7, dtype=torch.float64)
    tab[step] = torch.tensor([0, 0, 0, 0, 1, 0, 1], dtype=torch.float64)  # x' = z0, v' = z1
    u = torch.zeros(B, 2, D, dtype=torch.float64)
    C.half_step_(u, tab, _step(step), seed=_seed(seed))
    z = philox.philox_normals(n, seed, step, philox.TAG_HALF_STEP).double()
    torch.testing.assert_close(u[:, 0].reshape(-1), z[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(u[:, 1].reshape(-1), z[1], rtol=0, atol=2e-6)
    # SSCS: identity score update, a noise-free first half step (zero noise columns), second half = (z2, z3)
    tab = torch.zeros(step + 1, 16, dtype=torch.float64)
    tab[step] = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.float64)
    u = torch.zeros(B, 2, D, dtype=torch.float64)
    C.sscs_step_(u, torch.zeros(B, D), tab, _step(step), seed=_seed(seed))
    z = philox.philox_normals(n, seed, step, philox.TAG_SSCS).double()
    torch.testing.assert_close(u[:, 0].reshape(-1), z[2], rtol=0, atol=2e-6)
    torch.testing.assert_close(u[:, 1].reshape(-1), z[3], rtol=0, atol=2e-6)


# ---- HSM loss -----------------------------------------------------------------------------------

def _loss_inputs(B, D, dtype, out_dtype=None, seed=0):
    out = _randn(B, D, dtype=out_dtype or dtype, seed=seed + 1)
    u = _randn(B, 2, D, dtype=dtype, seed=seed + 2)
    coef = torch.rand(B, 2, generator=_g(seed + 3), dtype=torch.float64).to(dtype) + 0.1
    eps_v = _randn(B, D, dtype=dtype, seed=seed + 4)
    grad = torch.rand(B, generator=_g(seed + 5), dtype=torch.float64).to(dtype) + 0.5
    return out, u, coef, eps_v, grad


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hsm_loss_eps_exact(B, D, dtype):
    out, u, coef, eps_v, grad = _loss_inputs(B, D, dtype)
    _close(C.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **EXACT[dtype])
    _close(C.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v), R.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v),
           **EXACT[dtype])


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hsm_loss_seed_mode(B, D, dtype):
    out, u, coef, _, grad = _loss_inputs(B, D, dtype)
    _close(C.hsm_loss_fwd(out, u, coef, seed=_seed()), R.hsm_loss_fwd(out, u, coef, seed=_seed()), **SEEDED)
    _close(C.hsm_loss_bwd(grad, out, u, coef, seed=_seed()), R.hsm_loss_bwd(grad, out, u, coef, seed=_seed()),
           **SEEDED)


def test_hsm_loss_seed_regenerates_perturb_eps_v():
    B, D = 3, 33
    z = philox.philox_normals(B * D, SEED, 0, philox.TAG_PERTURB)[1].view(B, D)
    out, u, coef, _, grad = _loss_inputs(B, D, torch.float32)
    _close(C.hsm_loss_fwd(out, u, coef, seed=_seed()), C.hsm_loss_fwd(out, u, coef, eps_v=z), **SEEDED)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [7, 1023])
def test_hsm_loss_half_precision_out(out_dtype, D):
    out, u, coef, eps_v, grad = _loss_inputs(3, D, torch.float32, out_dtype=out_dtype)
    _close(C.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **HALF)
    g = C.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v)
    assert g.dtype == out_dtype
    _close(g, R.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v), **HALF)


def test_hsm_loss_float64_out_with_float32_state():
    out, u, coef, eps_v, grad = _loss_inputs(3, 33, torch.float32, out_dtype=torch.float64)
    got = C.hsm_loss_fwd(out, u, coef, eps_v=eps_v)
    assert got.dtype == torch.float64
    _close(got, R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **EXACT[torch.float32])


@pytest.mark.parametrize("mode", ["eps", "seed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hsm_loss_bwd_matches_autograd(mode, dtype):
    B, D = 5, 33
    out, u, coef, eps_v, grad = _loss_inputs(B, D, dtype)
    kw = dict(eps_v=eps_v) if mode == "eps" else dict(seed=_seed())
    leaf = out.detach().clone().requires_grad_(True)
    R.hsm_loss_fwd(leaf, u, coef, **kw).backward(grad)
    _close(C.hsm_loss_bwd(grad, out, u, coef, **kw), leaf.grad, **(EXACT[dtype] if mode == "eps" else SEEDED))


def test_hsm_loss_deterministic_across_thread_counts():
    out, u, coef, eps_v, _ = _loss_inputs(5, 20000, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.hsm_loss_fwd(out, u, coef, eps_v=eps_v)
        torch.set_num_threads(max(2, before))
        many = C.hsm_loss_fwd(out, u, coef, eps_v=eps_v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    _close(one, R.hsm_loss_fwd(out.double(), u.double(), coef.double(), eps_v=eps_v.double()).float(),
           rtol=1e-5, atol=1e-5)


def test_public_hsm_loss_on_cpu_backend_matches_torch():
    sde = CLD()
    g = _g(5)
    x0 = torch.randn(4, 3, 5, generator=g)
    t = torch.rand(4, generator=g) * 0.9 + 0.05
    eps = torch.randn(4, 2, 15, generator=g)
    res = {}
    for name in ("torch", "cpu"):
        u, noise = cf.perturb(x0, t, sde, eps=eps, backend=name)
        out = (0.3 * u[:, :3]).detach().requires_grad_(True)
        loss = cf.hsm_loss(out, u, t, sde, noise, backend=name)
        loss.backward()
        res[name] = (u, loss.detach(), out.grad)
    for a, b in zip(res["cpu"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- mixed score --------------------------------------------------------------------------------

@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_score_exact(B, D, dtype):
    out, u, coef = _randn(B, D, dtype=dtype, seed=1), _randn(B, 2, D, dtype=dtype, seed=2), _randn(B, 2, dtype=dtype, seed=3)
    _close(C.mixed_score(out, u, coef), R.mixed_score(out, u, coef), **EXACT[dtype])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_mixed_score_half_precision_out(out_dtype):
    out, u, coef = _randn(3, 33, dtype=out_dtype, seed=1), _randn(3, 2, 33, seed=2), _randn(3, 2, seed=3)
    got = C.mixed_score(out, u, coef)
    assert got.dtype == torch.float32
    _close(got, R.mixed_score(out, u, coef), **HALF)


# ---- sampler steps ------------------------------------------------------------------------------

def _run_steps(mod, B, D, dtype, mode, y_dtype=None):
    """half_step_, sscs_step_, affine_step (out of place and in place) of ``mod`` with row STEP."""
    u = _randn(B, 2, D, dtype=dtype, seed=11)
    y = _randn(B, D, dtype=y_dtype or dtype, seed=12)

    def kw(rows, seed):
        if mode == "eps":
            return dict(eps=_randn(*((B, rows, D) if rows else (B, D)), dtype=dtype, seed=seed))
        return dict(seed=_seed()) if mode == "seed" else {}

    res = {}
    w = u.clone()
    mod.half_step_(w, _table(7, dtype, seed=13), _step(), **kw(2, 14))
    res["half"] = w
    w = u.clone()
    mod.sscs_step_(w, y, _table(16, dtype, seed=15), _step(), **kw(4, 16))
    res["sscs"] = w
    res["affine"] = mod.affine_step(u, y, _table(6, dtype, seed=17), _step(), torch.empty_like(u), **kw(0, 18))
    w = u.clone()
    mod.affine_step(w, y, _table(6, dtype, seed=17), _step(), w, **kw(0, 18))
    res["affine_inplace"] = w
    return res


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eps", "none"])
def test_sampler_steps_exact(B, D, dtype, mode):
    got, want = _run_steps(C, B, D, dtype, mode), _run_steps(R, B, D, dtype, mode)
    for k in want:
        _close(got[k], want[k], **EXACT[dtype])
    _close(got["affine_inplace"], got["affine"], rtol=0, atol=0)


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_steps_seed_mode(B, D, dtype):
    got, want = _run_steps(C, B, D, dtype, "seed"), _run_steps(R, B, D, dtype, "seed")
    for k in want:
        _close(got[k], want[k], **SEEDED)


@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16])
def test_sampler_steps_half_precision_y(y_dtype):
    got, want = _run_steps(C, 3, 33, torch.float32, "eps", y_dtype), _run_steps(R, 3, 33, torch.float32, "eps", y_dtype)
    for k in want:
        _close(got[k], want[k], **HALF)


def test_step_tensor_picks_the_row():
    u, y = _randn(2, 2, 9, seed=1), _randn(2, 9, seed=2)
    tab = _table(16, torch.float32, rows=6)
    for k in (0, 4, 5):
        a, b = u.clone(), u.clone()
        C.sscs_step_(a, y, tab, _step(k))
        C.sscs_step_(b, y, tab[k:k + 1], _step(0))
        _close(a, b, rtol=0, atol=0)


def test_in_place_ops_on_non_contiguous_state():
    base = _randn(3, 7, 2, seed=1)
    u = base.permute(0, 2, 1)  # (3, 2, 7), not contiguous
    ref = u.contiguous()
    tab, step, eps = _table(7, torch.float32), _step(), _randn(3, 2, 7, seed=2)
    C.half_step_(u, tab, step, eps=eps)
    R.half_step_(ref, tab, step, eps=eps)
    _close(u.contiguous(), ref, **EXACT[torch.float32])


def test_ops_trace_under_torch_compile():
    """The fake kernels of cld_fast._fake_ops let torch.compile trace every op without graph breaks."""
    B, D = 3, 8
    out, u, coef, _, grad = _loss_inputs(B, D, torch.float32)
    tab16, tab7, tab6 = _table(16, torch.float32), _table(7, torch.float32), _table(6, torch.float32)
    step, seed, pcoef = _step(), _seed(), torch.ones(B, 7)

    def f(out, u):
        loss = C.hsm_loss_fwd(out, u, coef, seed=seed)
        g = C.hsm_loss_bwd(loss, out, u, coef, seed=seed)
        s = C.mixed_score(out, u, coef)
        w = u.clone()
        C.sscs_step_(w, out, tab16, step, seed=seed)
        o = torch.empty_like(u)
        C.affine_step(w, out, tab6, step, o, seed=seed)
        C.half_step_(o, tab7, step, seed=seed)
        p = torch.empty_like(u)
        C.perturb(out, pcoef, p, seed=seed)
        return loss.sum() + g.sum() + s.sum() + o.sum() + p.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(out, u), f(out, u), rtol=1e-5, atol=1e-5)


def _opcheck_cases():
    B, D = 3, 8
    u, out, coef = _randn(B, 2, D, seed=1), _randn(B, D, seed=2), torch.rand(B, 2) + 0.1
    seed, step = _seed(), _step(1)
    return {
        "perturb": (OPS.perturb.default, (out, None, _randn(B, 7, seed=3), None, seed, torch.empty(B, 2, D))),
        "hsm_loss_fwd": (OPS.hsm_loss_fwd.default, (out, u, coef, None, seed)),
        "hsm_loss_bwd": (OPS.hsm_loss_bwd.default, (torch.rand(B), out, u, coef, _randn(B, D, seed=4), None)),
        "mixed_score": (OPS.mixed_score.default, (out, u, coef)),
        "half_step_": (OPS.half_step_.default, (u.clone(), _table(7, torch.float32), step, None, seed)),
        "sscs_step_": (OPS.sscs_step_.default, (u.clone(), out, _table(16, torch.float32), step, None, seed)),
        "affine_step": (OPS.affine_step.default, (u, out, _table(6, torch.float32), step, None, seed, torch.empty(B, 2, D))),
    }


@pytest.mark.parametrize(
    "name", ["affine_step", "half_step_", "hsm_loss_bwd", "hsm_loss_fwd", "mixed_score", "perturb", "sscs_step_"])
def test_opcheck(name):
    """Schema (mutation annotations), fake kernel and AOT-dispatch consistency (torch.library.opcheck)."""
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ---- bad inputs ---------------------------------------------------------------------------------

def _state(B=2, D=5, dtype=torch.float32):
    return torch.zeros(B, 2, D, dtype=dtype)


BAD = {
    "perturb out dtype": (lambda: OPS.perturb(torch.zeros(2, 5, dtype=torch.half), None, torch.zeros(2, 7, dtype=torch.half),
                                              None, None, _state(dtype=torch.half)), "out"),
    "perturb x0 shape": (lambda: OPS.perturb(torch.zeros(2, 4), None, torch.zeros(2, 7), None, None, _state()), "x0"),
    "perturb coef cols": (lambda: OPS.perturb(torch.zeros(2, 5), None, torch.zeros(2, 6), None, None, _state()), "coef"),
    "perturb eps dtype": (lambda: OPS.perturb(torch.zeros(2, 5), None, torch.zeros(2, 7), torch.zeros(2, 2, 5, dtype=torch.float64),
                                              None, _state()), "eps"),
    "loss without noise": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5), _state(), torch.zeros(2, 2), None, None), "eps_v or seed"),
    "loss out shape": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 6), _state(), torch.zeros(2, 2), torch.zeros(2, 5), None), "out"),
    "loss out int dtype": (lambda: OPS.hsm_loss_fwd(torch.zeros(2, 5, dtype=torch.int32), _state(), torch.zeros(2, 2),
                                                    torch.zeros(2, 5), None), "out"),
    "loss grad shape": (lambda: OPS.hsm_loss_bwd(torch.zeros(3), torch.zeros(2, 5), _state(), torch.zeros(2, 2),
                                                 torch.zeros(2, 5), None), "grad"),
    "mixed u not contiguous": (lambda: OPS.mixed_score(torch.zeros(2, 5), torch.zeros(2, 5, 2).permute(0, 2, 1), torch.zeros(2, 2)),
                               "u"),
    "mixed u shape": (lambda: OPS.mixed_score(torch.zeros(2, 5), torch.zeros(2, 3, 5), torch.zeros(2, 2)), "u"),
    "half step out of range": (lambda: OPS.half_step_(_state(), torch.zeros(4, 7), _step(4), None, None), "step"),
    "half step table cols": (lambda: OPS.half_step_(_state(), torch.zeros(4, 6), _step(0), None, None), "table"),
    "sscs y shape": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 4), torch.zeros(4, 16), _step(0), None, None), "y"),
    "sscs eps shape": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 5), torch.zeros(4, 16), _step(0),
                                              torch.zeros(2, 2, 5), None), "eps"),
    "sscs seed dtype": (lambda: OPS.sscs_step_(_state(), torch.zeros(2, 5), torch.zeros(4, 16), _step(0), None,
                                               torch.tensor([1], dtype=torch.int32)), "seed"),
    "affine step dtype": (lambda: OPS.affine_step(_state(), torch.zeros(2, 5), torch.zeros(4, 6), torch.tensor([0.0]), None,
                                                  None, _state()), "step"),
    "affine partial overlap": (lambda: (lambda buf: OPS.affine_step(buf[:20].view(2, 2, 5), torch.zeros(2, 5), torch.zeros(4, 6),
                                                                    _step(0), None, None, buf[5:25].view(2, 2, 5)))(torch.zeros(30)),
                               "overlap"),
    "affine table dtype": (lambda: OPS.affine_step(_state(), torch.zeros(2, 5), torch.zeros(4, 6, dtype=torch.float64), _step(0),
                                                   None, None, _state()), "table"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, needle = BAD[case]
    with pytest.raises(RuntimeError, match=needle):
        fn()
