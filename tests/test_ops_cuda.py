"""The ``cuda`` backend (CUDA kernels of cld_fast._C, csrc/cuda) against the ``torch`` reference backend.

Skipped without a GPU and a CUDA build of the extension. The same comparisons as tests/test_ops_cpu.py
on float32 state, run with the reference on the same GPU, plus what only the CUDA kernels have: the
vector-width paths (16-byte, 8-byte and scalar, chosen from D and pointer alignment), the two-stage
chunked loss reduction for long rows, seed-mode agreement with the reference and with the CPU
kernels, in-kernel noise moments, no host synchronisation, and CUDA graph capture.

Tolerances: float32 results to 1e-5 (the kernels contract a * b + c into FMAs, the reference rounds
each product), seed mode to 1e-5, bf16 / fp16 network outputs to 1e-2.
"""
import math

import pytest
import torch

from cld_fast import philox
from cld_fast.backends import cpu_backend as C
from cld_fast.backends import cuda_backend as K
from cld_fast.backends import torch_backend as R

if not K.is_available():
    pytest.skip(f"cuda backend unavailable: {K.why_unavailable() or 'no CUDA device'}", allow_module_level=True)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
OPS = torch.ops.cld_fast
BS = [1, 3, 5]
DS = [1, 2, 6, 7, 33, 1023, 1024]
LONG_DS = [3072, 5000, 5001, 8192]  # the chunked loss reduction (D > 1024), vector and scalar paths
SEED = 2 ** 40 + 12345
STEP = 3
F32 = dict(rtol=1e-5, atol=1e-5)
SEEDED = dict(rtol=1e-5, atol=1e-5)
HALF = dict(rtol=1e-2, atol=1e-2)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, offset=0):
    """A contiguous CUDA tensor; ``offset`` > 0 starts it ``offset`` elements into its storage (misaligned)."""
    x = torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dtype)
    if offset == 0:
        return x.to(DEV)
    buf = torch.empty(x.numel() + offset, dtype=dtype, device=DEV)
    view = buf[offset:].view(x.shape)
    view.copy_(x)
    return view


def _seed(value=SEED):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def _step(value=STEP):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def _table(cols, rows=5, seed=1):
    return 0.5 * _randn(rows, cols, seed=seed)


def _close(actual, expected, **tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
    torch.testing.assert_close(actual, expected, **tol)


def test_backend_contract():
    import cld_fast._C as ext

    assert K.NAME == "cuda" and ext.with_cuda()
    assert K.supports(DEV, torch.float32) and not K.supports(DEV, torch.float64)
    assert not K.supports(torch.device("cpu"), torch.float32)


# ---- perturb ------------------------------------------------------------------------------------

@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("with_v0", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_perturb_eps(B, D, with_v0, offset):
    x0, coef = _randn(B, D, seed=1, offset=offset), _randn(B, 7, seed=2)
    eps = _randn(B, 2, D, seed=3)
    v0 = _randn(B, D, seed=4) if with_v0 else None
    want = R.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), eps=eps, v0=v0)
    got = K.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), eps=eps, v0=v0)
    _close(got, want, **F32)


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS + [5000])
def test_perturb_seed_mode(B, D):
    x0, coef = _randn(B, D, seed=1), _randn(B, 7, seed=2)
    want = R.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed())
    got = K.perturb(x0, coef, torch.empty(B, 2, D, device=DEV), seed=_seed())
    _close(got, want, **SEEDED)
    # the CPU kernels compile the same Philox contract
    cpu = C.perturb(x0.cpu(), coef.cpu(), torch.empty(B, 2, D), seed=_seed().cpu())
    _close(got.cpu(), cpu, **SEEDED)


def test_seed_normals_match_philox_contract_and_moments():
    B, D = 4, 50_000
    n = B * D
    tab = torch.zeros(STEP + 1, 7, device=DEV)
    tab[STEP] = torch.tensor([0, 0, 0, 0, 1, 0, 1.0], device=DEV)  # x' = z0, v' = z1
    u = torch.zeros(B, 2, D, device=DEV)
    K.half_step_(u, tab, _step(), seed=_seed())
    z = philox.philox_normals(n, _seed(), _step(), philox.TAG_HALF_STEP)
    torch.testing.assert_close(u[:, 0].reshape(-1), z[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(u[:, 1].reshape(-1), z[1], rtol=0, atol=2e-6)
    x, v = u[:, 0].double().reshape(-1), u[:, 1].double().reshape(-1)
    assert abs(x.mean().item()) < 5 / math.sqrt(n) and abs(v.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n) and abs(v.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x * v).mean().item()) < 5 / math.sqrt(n)


# ---- HSM loss -----------------------------------------------------------------------------------

def _loss_inputs(B, D, out_dtype=torch.float32, seed=0, offset=0):
    out = _randn(B, D, dtype=out_dtype, seed=seed + 1, offset=offset)
    u = _randn(B, 2, D, seed=seed + 2)
    coef = (torch.rand(B, 2, generator=_g(seed + 3)) + 0.1).to(DEV)
    eps_v = _randn(B, D, seed=seed + 4)
    grad = (torch.rand(B, generator=_g(seed + 5)) + 0.5).to(DEV)
    return out, u, coef, eps_v, grad


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS + LONG_DS)
@pytest.mark.parametrize("offset", [0, 1])
def test_hsm_loss_eps(B, D, offset):
    out, u, coef, eps_v, grad = _loss_inputs(B, D, offset=offset)
    _close(K.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **F32)
    _close(K.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v), R.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v), **F32)


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS + LONG_DS)
def test_hsm_loss_seed_mode(B, D):
    out, u, coef, _, grad = _loss_inputs(B, D)
    _close(K.hsm_loss_fwd(out, u, coef, seed=_seed()), R.hsm_loss_fwd(out, u, coef, seed=_seed()), **SEEDED)
    _close(K.hsm_loss_bwd(grad, out, u, coef, seed=_seed()), R.hsm_loss_bwd(grad, out, u, coef, seed=_seed()), **SEEDED)


def test_hsm_loss_many_samples_small_rows():
    """The lanes-per-sample reduction with many samples per warp and grid-stride over samples."""
    for D in (1, 2, 3, 16, 100):
        out, u, coef, eps_v, _ = _loss_inputs(70_000, D)
        _close(K.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **F32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [7, 1024, 5000])
def test_hsm_loss_half_precision_out(out_dtype, D):
    out, u, coef, eps_v, grad = _loss_inputs(3, D, out_dtype=out_dtype)
    _close(K.hsm_loss_fwd(out, u, coef, eps_v=eps_v), R.hsm_loss_fwd(out, u, coef, eps_v=eps_v), **HALF)
    g = K.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v)
    assert g.dtype == out_dtype
    _close(g, R.hsm_loss_bwd(grad, out, u, coef, eps_v=eps_v), **HALF)


@pytest.mark.parametrize("mode", ["eps", "seed"])
def test_hsm_loss_bwd_matches_autograd(mode):
    out, u, coef, eps_v, grad = _loss_inputs(5, 1000)
    kw = dict(eps_v=eps_v) if mode == "eps" else dict(seed=_seed())
    leaf = out.detach().clone().requires_grad_(True)
    R.hsm_loss_fwd(leaf, u, coef, **kw).backward(grad)
    _close(K.hsm_loss_bwd(grad, out, u, coef, **kw), leaf.grad, **F32)


@pytest.mark.parametrize("D", [1000, 100_000])
def test_hsm_loss_deterministic(D):
    out, u, coef, eps_v, _ = _loss_inputs(8, D)
    a = K.hsm_loss_fwd(out, u, coef, eps_v=eps_v)
    b = K.hsm_loss_fwd(out, u, coef, eps_v=eps_v)
    assert torch.equal(a, b)
    want = R.hsm_loss_fwd(out.double(), u.double(), coef.double(), eps_v=eps_v.double()).float()
    _close(a, want, rtol=1e-5, atol=1e-5)


# ---- mixed score --------------------------------------------------------------------------------

@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_score(B, D, out_dtype):
    out, u, coef = _randn(B, D, dtype=out_dtype, seed=1), _randn(B, 2, D, seed=2), _randn(B, 2, seed=3)
    got = K.mixed_score(out, u, coef)
    assert got.dtype == torch.float32
    _close(got, R.mixed_score(out, u, coef), **(F32 if out_dtype == torch.float32 else HALF))


# ---- sampler steps ------------------------------------------------------------------------------

def _run_steps(mod, B, D, mode, y_dtype=torch.float32, offset=0):
    u = _randn(B, 2, D, seed=11, offset=offset)
    y = _randn(B, D, dtype=y_dtype, seed=12, offset=offset)

    def kw(rows, seed):
        if mode == "eps":
            return dict(eps=_randn(*((B, rows, D) if rows else (B, D)), seed=seed))
        return dict(seed=_seed()) if mode == "seed" else {}

    res = {}
    w = u.clone()
    mod.half_step_(w, _table(7, seed=13), _step(), **kw(2, 14))
    res["half"] = w
    w = u.clone()
    mod.sscs_step_(w, y, _table(16, seed=15), _step(), **kw(4, 16))
    res["sscs"] = w
    res["affine"] = mod.affine_step(u, y, _table(6, seed=17), _step(), torch.empty_like(u), **kw(0, 18))
    w = u.clone()
    mod.affine_step(w, y, _table(6, seed=17), _step(), w, **kw(0, 18))
    res["affine_inplace"] = w
    return res


@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("mode", ["eps", "none", "seed"])
@pytest.mark.parametrize("offset", [0, 1])
def test_sampler_steps(B, D, mode, offset):
    got, want = _run_steps(K, B, D, mode, offset=offset), _run_steps(R, B, D, mode, offset=offset)
    for k in want:
        _close(got[k], want[k], **(SEEDED if mode == "seed" else F32))
    _close(got["affine_inplace"], got["affine"], rtol=0, atol=0)


@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [33, 1024])
def test_sampler_steps_half_precision_y(y_dtype, D):
    got, want = _run_steps(K, 3, D, "eps", y_dtype), _run_steps(R, 3, D, "eps", y_dtype)
    for k in want:
        _close(got[k], want[k], **HALF)


def test_sampler_steps_seed_mode_matches_cpu_kernels():
    got = _run_steps(K, 3, 1024, "seed")
    u, y = _randn(3, 2, 1024, seed=11).cpu(), _randn(3, 1024, seed=12).cpu()
    w = u.clone()
    C.sscs_step_(w, y, _table(16, seed=15).cpu(), _step().cpu(), seed=_seed().cpu())
    _close(got["sscs"].cpu(), w, **SEEDED)


def test_step_tensor_picks_the_row():
    u, y = _randn(2, 2, 36, seed=1), _randn(2, 36, seed=2)
    tab = _table(16, rows=6)
    for k in (0, 4, 5):
        a, b = u.clone(), u.clone()
        K.sscs_step_(a, y, tab, _step(k))
        K.sscs_step_(b, y, tab[k:k + 1].contiguous(), _step(0))
        _close(a, b, rtol=0, atol=0)


def test_no_host_synchronisation():
    B, D = 4, 4096
    out, u, coef, eps_v, grad = _loss_inputs(B, D)
    tab16, tab7, tab6, pc = _table(16), _table(7), _table(6), _randn(B, 7, seed=9)
    seed, step = _seed(), _step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        K.perturb(out, pc, torch.empty_like(u), seed=seed)
        loss = K.hsm_loss_fwd(out, u, coef, seed=seed)
        K.hsm_loss_bwd(loss, out, u, coef, seed=seed)
        K.mixed_score(out, u, coef)
        K.half_step_(u, tab7, step, seed=seed)
        K.sscs_step_(u, out, tab16, step, seed=seed)
        K.affine_step(u, out, tab6, step, u, seed=seed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_sampler_loop_captures_in_cuda_graph():
    """A few SSCS steps captured once; replays read the step index and seed from device memory."""
    B, D, S = 3, 1000, 6
    tab = _table(16, rows=S)
    y = _randn(B, D, seed=2)
    seed, step = _seed(), _step(0)
    u0 = _randn(B, 2, D, seed=1)
    u = u0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        K.sscs_step_(u.clone(), y, tab, step, seed=seed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.sscs_step_(u, y, tab, step, seed=seed)
        step.add_(1)
    u.copy_(u0)
    step.fill_(0)
    for _ in range(S):
        graph.replay()
    ref = u0.clone()
    for k in range(S):
        R.sscs_step_(ref, y, tab, _step(k), seed=seed)
    torch.cuda.synchronize()
    _close(u, ref, **SEEDED)


def _opcheck_cases():
    torch.manual_seed(100)  # this test draws from the global RNG
    B, D = 3, 8
    u, out = _randn(B, 2, D, seed=1), _randn(B, D, seed=2)
    coef = (torch.rand(B, 2) + 0.1).to(DEV)
    seed, step = _seed(), _step(1)
    return {
        "perturb": (OPS.perturb.default, (out, None, _randn(B, 7, seed=3), None, seed, torch.empty(B, 2, D, device=DEV))),
        "hsm_loss_fwd": (OPS.hsm_loss_fwd.default, (out, u, coef, None, seed)),
        "hsm_loss_bwd": (OPS.hsm_loss_bwd.default, (torch.rand(B, device=DEV), out, u, coef, _randn(B, D, seed=4), None)),
        "mixed_score": (OPS.mixed_score.default, (out.bfloat16(), u, coef)),
        "half_step_": (OPS.half_step_.default, (u.clone(), _table(7), step, None, seed)),
        "sscs_step_": (OPS.sscs_step_.default, (u.clone(), out.half(), _table(16), step, None, seed)),
        "affine_step": (OPS.affine_step.default, (u, out, _table(6), step, None, seed, torch.empty(B, 2, D, device=DEV))),
    }


@pytest.mark.parametrize(
    "name", ["affine_step", "half_step_", "hsm_loss_bwd", "hsm_loss_fwd", "mixed_score", "perturb", "sscs_step_"])
def test_opcheck(name):
    """Schema (mutation annotations), fake kernel and AOT-dispatch consistency (torch.library.opcheck)."""
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ---- bad inputs ---------------------------------------------------------------------------------

def _state(B=2, D=5, dtype=torch.float32):
    return torch.zeros(B, 2, D, dtype=dtype, device=DEV)


def _z(*shape, dtype=torch.float32, device=DEV):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD = {
    "perturb float64 state": (lambda: OPS.perturb(_z(2, 5, dtype=torch.float64), None, _z(2, 7, dtype=torch.float64), None,
                                                  None, _state(dtype=torch.float64)), "out"),
    "perturb coef on cpu": (lambda: OPS.perturb(_z(2, 5), None, _z(2, 7, device="cpu"), None, None, _state()), "coef"),
    "loss seed on cpu": (lambda: OPS.hsm_loss_fwd(_z(2, 5), _state(), _z(2, 2), None, torch.tensor([1])), "seed"),
    "loss out float64": (lambda: OPS.hsm_loss_fwd(_z(2, 5, dtype=torch.float64), _state(), _z(2, 2), _z(2, 5), None), "out"),
    "mixed out shape": (lambda: OPS.mixed_score(_z(2, 6), _state(), _z(2, 2)), "out"),
    "half step cpu step": (lambda: OPS.half_step_(_state(), _z(4, 7), torch.tensor([0]), None, None), "step"),
    "sscs y dtype": (lambda: OPS.sscs_step_(_state(), _z(2, 5, dtype=torch.int32), _z(4, 16), _step(0), None, None), "y"),
    "affine eps shape": (lambda: OPS.affine_step(_state(), _z(2, 5), _z(4, 6), _step(0), _z(2, 2, 5), None, _state()), "eps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, needle = BAD[case]
    with pytest.raises(RuntimeError, match=needle):
        fn()
