"""Bad input raises a ValueError or TypeError that names the argument and what was expected."""
import pytest
import torch

import cld_fast as cf
from cld_fast.sde import CLD

SDE = CLD()
_GEN = torch.Generator().manual_seed(0)  # module-level inputs: seeded, independent of test order
X0 = torch.randn(3, 2, 5, generator=_GEN)
T = torch.tensor([0.1, 0.5, 1.0])
U, NOISE = cf.perturb(X0, T, SDE, backend="torch", generator=_GEN)
OUT = torch.randn(3, 2, 5, generator=_GEN)
TS = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)


def _nan_x0():
    x = X0.clone()
    x[0, 0, 0] = float("nan")
    return x


BAD = [
    # perturb
    ("x0 list", lambda: cf.perturb([1.0, 2.0], T, SDE), TypeError, "x0 must be a torch.Tensor"),
    ("x0 int", lambda: cf.perturb(torch.ones(3, 2, dtype=torch.int64), T, SDE), TypeError, "x0 must have dtype"),
    ("x0 bf16", lambda: cf.perturb(X0.bfloat16(), T, SDE), TypeError, "x0 must have dtype"),
    ("x0 1-d", lambda: cf.perturb(torch.randn(3), T, SDE), ValueError, "x0 must have at least 2 dimensions"),
    ("x0 empty", lambda: cf.perturb(torch.randn(0, 2), torch.ones(0), SDE), ValueError, "x0 must not be empty"),
    ("x0 nan", lambda: cf.perturb(_nan_x0(), T, SDE), ValueError, "x0 contains NaN"),
    ("t not tensor", lambda: cf.perturb(X0, 0.5, SDE), TypeError, r"t must be a torch.Tensor of shape \(3,\)"),
    ("t int dtype", lambda: cf.perturb(X0, torch.ones(3, dtype=torch.int64), SDE), TypeError, "t must be a floating-point"),
    ("t wrong shape", lambda: cf.perturb(X0, torch.ones(3, 1), SDE), ValueError, r"t must have shape \(3,\)"),
    ("t wrong batch", lambda: cf.perturb(X0, torch.ones(4), SDE), ValueError, r"t must have shape \(3,\)"),
    ("t zero", lambda: cf.perturb(X0, torch.tensor([0.0, 0.5, 1.0]), SDE), ValueError, r"t must lie in \(0, 1\]"),
    ("t above one", lambda: cf.perturb(X0, torch.tensor([0.1, 0.5, 1.01]), SDE), ValueError, r"t must lie in \(0, 1\]"),
    ("t nan", lambda: cf.perturb(X0, torch.tensor([0.1, float("nan"), 1.0]), SDE), ValueError, "t contains NaN"),
    ("sde wrong type", lambda: cf.perturb(X0, T, cf.VPSDE()), TypeError, "sde must be a cld_fast.CLD"),
    ("objective", lambda: cf.perturb(X0, T, SDE, objective="ism"), ValueError, "objective must be one of"),
    ("eps shape", lambda: cf.perturb(X0, T, SDE, eps=torch.randn(3, 2, 4)), ValueError, r"eps must have shape \(3, 2, 10\)"),
    ("backend unknown", lambda: cf.perturb(X0, T, SDE, backend="metal"), ValueError, "unknown backend 'metal'"),
    # hsm_loss
    ("out shape", lambda: cf.hsm_loss(torch.randn(3, 4, 5), U, T, SDE, NOISE), ValueError, r"out must have the data shape \(3, 2, 5\)"),
    ("out int", lambda: cf.hsm_loss(OUT.long(), U, T, SDE, NOISE), TypeError, "out must have dtype"),
    ("out fp64 with fp32 state", lambda: cf.hsm_loss(OUT.double(), U, T, SDE, NOISE), TypeError, "out is float64 but u is float32"),
    ("u odd channels", lambda: cf.hsm_loss(OUT, torch.randn(3, 3, 5), T, SDE, NOISE), ValueError, "u must have an even size along dim 1"),
    ("noise wrong type", lambda: cf.hsm_loss(OUT, U, T, SDE, torch.randn(3, 2, 10)), TypeError, "noise must be the Noise handle"),
    ("noise other batch", lambda: cf.hsm_loss(OUT[:2], U[:2], T[:2], SDE, NOISE), ValueError, "noise was drawn for 30 elements"),
    ("weighting", lambda: cf.hsm_loss(OUT, U, T, SDE, NOISE, weighting="l1"), ValueError, "weighting must be one of"),
    ("reduction", lambda: cf.hsm_loss(OUT, U, T, SDE, NOISE, reduction="max"), ValueError, "reduction must be"),
    ("loss t range", lambda: cf.hsm_loss(OUT, U, torch.tensor([0.1, 0.5, 2.0]), SDE, NOISE), ValueError, r"t must lie in \(0, 1\]"),
    ("mixed out shape", lambda: cf.mixed_score(torch.randn(3, 2, 4), U, T, SDE), ValueError, "out must have the data shape"),
    # sampler steps
    ("ts 2-d", lambda: cf.sscs_step_(U.clone(), OUT, TS.view(3, 1), SDE, step=1), ValueError, "ts must be a 1-D floating tensor"),
    ("ts int", lambda: cf.sscs_step_(U.clone(), OUT, TS.long(), SDE, step=1), ValueError, "ts must be a 1-D floating tensor"),
    ("ts above one", lambda: cf.sscs_step_(U.clone(), OUT, [1.5, 0.5], SDE, step=0), ValueError, r"ts must lie in \[0, 1\] \(forward times\)"),
    ("sscs sde", lambda: cf.sscs_step_(U.clone(), OUT, TS, cf.VPSDE(), step=1), TypeError, "sde must be a cld_fast.CLD"),
    ("y shape", lambda: cf.sscs_step_(U.clone(), torch.randn(3, 5), TS, SDE, step=1), ValueError, "y .* must have the data shape"),
    ("step negative", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=-1), ValueError, r"step = -1 is out of range .* \(valid 0..1\)"),
    ("step past grid", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=2), ValueError, r"sscs_step_: step = 2 is out of range for a time grid ts of 3 points"),
    ("step one-point grid", lambda: cf.half_step_(U.clone(), [0.5], SDE, step=0), ValueError, "too few for a step"),
    ("step float tensor", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=torch.tensor([1.0])), TypeError, "step must be a \\(1,\\) int64"),
    ("step bool", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=True), TypeError, "step must be an int"),
    ("seed range", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=1, seed=-5), ValueError, "seed must be in"),
    ("seed type", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=1, seed="abc"), TypeError, "seed must be None"),
    ("sscs eps shape", lambda: cf.sscs_step_(U.clone(), OUT, TS, SDE, step=1, eps=torch.randn(3, 2, 10)), ValueError, r"eps must have shape \(3, 4, 10\)"),
    ("em eps nan", lambda: cf.em_step_(U.clone(), OUT, TS, SDE, step=1, eps=torch.full((3, 10), float("nan"))), ValueError, "eps contains NaN"),
    ("half u dtype", lambda: cf.half_step_(U.half(), TS, SDE, step=0), TypeError, "u must have dtype"),
    ("pf_drift t", lambda: cf.pf_drift(U, OUT, torch.ones(2), SDE), ValueError, "t must be a float or a one-element tensor"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


def test_at_least_twenty_cases():
    assert len(BAD) >= 20


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("CLD_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but can't run here"):
        cf.perturb(X0, T, SDE)
    monkeypatch.setenv("CLD_FAST_BACKEND", "nonsense")
    with pytest.raises(RuntimeError, match="CLD_FAST_BACKEND='nonsense' is not a backend"):
        cf.perturb(X0, T, SDE)


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="t is on meta but the data is on cpu"):
        cf.perturb(X0, T.to("meta"), SDE)
    with pytest.raises(ValueError, match="y is on meta but u is on cpu"):
        cf.sscs_step_(U.clone(), OUT.to("meta"), TS, SDE, step=1)


# ---- perturb's autograd, seed range, explicit noise and coefficient tables ---------------------------


def _backends_here():
    return [b for b in ("torch", "cpu", "triton") if b in cf.backends()]


@pytest.mark.parametrize("objective", ["hsm", "dsm"])
def test_perturb_never_keeps_x0_graph(objective, sde):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.rand(3, generator=g) * 0.9 + 0.1
    for backend in _backends_here():
        u, _ = cf.perturb(x * 2.0, t, sde, objective=objective, backend=backend,
                          generator=torch.Generator().manual_seed(1))
        assert not u.requires_grad and u.grad_fn is None, backend


def test_seed_range_is_the_same_for_perturb_and_the_step_ops(sde):
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(4, 3, generator=g), torch.full((4,), 0.5)
    for backend in _backends_here():
        for seed in (-1, 2**62, 2**63 - 1):
            for as_tensor in (False, True):
                s = torch.tensor([seed]) if as_tensor else seed
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.perturb(x0, t, sde, seed=s, backend=backend)
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.half_step_(torch.randn(4, 6, generator=g), [1.0, 0.5], sde, seed=s, backend=backend)
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.em_step_(torch.randn(4, 6, generator=g), torch.randn(4, 3), [1.0, 0.5], sde, seed=s,
                                backend=backend)
        top = 2**62 - 1
        cf.perturb(x0, t, sde, seed=torch.tensor([top]), backend=backend)
        cf.half_step_(torch.randn(4, 6, generator=g), [1.0, 0.5], sde, seed=top, backend=backend)


def test_objective_and_non_finite_explicit_inputs(sde):
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(4, 3, generator=g), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="objective must be one of"):
        cf.perturb(x0, t, sde, objective="bogus")
    with pytest.raises(TypeError, match="coefficients"):  # coefficients come from t and the CLD only
        cf.perturb(x0, t, sde, objective="bogus", coefficients=torch.zeros(4, 7))
    eps = torch.randn(4, 2, 3, generator=g)
    eps[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="eps contains NaN"):
        cf.perturb(x0, t, sde, eps=eps)
    from cld_fast.samplers.gddim import gddim_table

    table = gddim_table(sde, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64), 1, "eps")
    u, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    hist = cf.gddim_history(u, 1)
    cf.gddim_step_(u.clone(), y, hist, table, step=0)
    table[0, 3] = float("nan")
    with pytest.raises(ValueError, match="table contains NaN"):
        cf.gddim_step_(u.clone(), y, hist, table, step=0)
    with cf.value_checks(False):  # the documented opt-out: no host read
        cf.gddim_step_(u.clone(), y, hist, table, step=0, backend="torch")


def test_value_check_switch_is_per_thread():
    """value_checks(False) in one thread leaves another thread's checks on (the switch is not process-global)."""
    import threading

    off, done = threading.Event(), threading.Event()

    def quiet_thread():
        with cf.value_checks(False):
            off.set()
            done.wait(10)

    worker = threading.Thread(target=quiet_thread)
    worker.start()
    try:
        assert off.wait(10)
        assert cf.checks.value_checks_enabled()
        with pytest.raises(ValueError, match="t contains NaN"):
            cf.perturb(X0, torch.tensor([0.1, float("nan"), 0.5]), SDE, backend="torch")
    finally:
        done.set()
        worker.join()


def test_value_check_switch_applies_inside_its_thread():
    seen = []

    def run():
        with cf.value_checks(False):
            seen.append(cf.checks.value_checks_enabled())
            cf.perturb(X0, torch.tensor([0.1, float("nan"), 0.5]), SDE, backend="torch")  # no error: checks off
        seen.append(cf.checks.value_checks_enabled())

    import threading
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_host_finiteness_check_is_exact(dtype):
    """Every finite value passes (the largest, the smallest subnormal, -0); one NaN or +-inf anywhere
    fails, in the first chunk, a middle one and the last, partial one."""
    from cld_fast.checks import _FINITE_CHUNK, _all_finite, host_values

    info = torch.finfo(dtype)
    n = 2 * _FINITE_CHUNK + 123
    x = torch.randn(n).to(dtype)
    x[:4] = torch.tensor([info.max, -info.max, info.smallest_normal * info.eps, -0.0], dtype=torch.float64).to(dtype)
    assert _all_finite(host_values(x))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in (0, _FINITE_CHUNK + 7, n - 1):
            y = x.clone()
            y[i] = bad
            assert not _all_finite(host_values(y)), (bad, i)
