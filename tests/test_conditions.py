"""Inpainting by replacement (cld_fast.conditions, the step ops' ``obs`` argument).

References: the replacement is checked against ``CLD.perturbation_kernel`` directly (float64), the
ops of every backend here against the float64 torch reference, the samplers' final observed
coordinates against x_obs, and the toy against the exact conditional of a Gaussian mixture.

Toy tolerance (bench/results/inpaint-toy-cpu.md, 4000 samples, mean of 3 seeds, two mixtures and
SDEs, x1 = 0 observed): SSCS at 50 NFE is at energy distance 0.0020 (ring8, default CLD) and 0.0043
(cross4, CLD(1, 7, 9)) from the exact conditional, where the noise floor is |0.0001| and the
unconditional sampler sits at 0.053 and 0.082. The test (one seed, 3000 samples) allows 0.01, about
twice the larger value, and asks for less than a fifth of the unconditional sampler's distance.
"""
import math

import pytest
import torch

import cld_fast as cf
from cld_fast import opdefs, philox
from cld_fast.samplers.gddim import gddim_table
from cld_fast.sde import AFFINE_KIND_CODES, CLD, kernel_params
from cld_fast.toy import GaussianMixture2D, energy_distance

SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
TS = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.05], dtype=torch.float64)
B, D = 3, 37  # odd sizes
SEED = 2 ** 40 + 12345


def _backend(name):
    if name not in cf.backends():
        pytest.skip(f"{name} backend not available here")
    return name


def _obs(dtype, noise: bool, b=B, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_obs = torch.randn(b, d, generator=g, dtype=torch.float64)
    mask = torch.rand(b, d, generator=g) < 0.6
    parts = [torch.where(mask, x_obs, torch.zeros_like(x_obs)), mask.double()]
    if noise:
        parts += list(torch.randn(2, b, d, generator=g, dtype=torch.float64))
    return torch.stack(parts, 1).to(dtype)


def _args(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, 2, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    return u, y


# (name, runner(backend module name, u (B, 2, D), y, obs, noise mode, step) -> new u)
def _run(op, *args):
    from cld_fast import backends

    return backends.get(op[0]).op(op[1])(*args)


def _half(bk, u, y, obs, mode, k):
    seed = torch.tensor([SEED]) if mode == "seed" else None
    _run((bk, "half_step_"), u, TS, torch.tensor([k]), kernel_params(SDE, "cpu"), None, seed, obs)
    return u


def _sscs(bk, u, y, obs, mode, k):
    seed = torch.tensor([SEED]) if mode == "seed" else None
    _run((bk, "sscs_step_"), u, y, TS, torch.tensor([k]), kernel_params(SDE, "cpu"), True, None, seed, False, obs)
    return u


def _affine(kind):
    def run(bk, u, y, obs, mode, k):
        seed = torch.tensor([SEED]) if mode == "seed" else None
        _run((bk, "affine_step"), u, y, TS, torch.tensor([k]), kernel_params(SDE, "cpu"), AFFINE_KIND_CODES[kind],
             True, None, seed, u, obs)
        return u
    return run


def _gddim(rows_extra):
    def run(bk, u, y, obs, mode, k):
        table = gddim_table(SDE, TS, order=2, mixed=True, denoise=rows_extra).to(torch.float64)
        k = min(k, table.shape[0] - 1)
        hist = torch.zeros(1, u.shape[0], 2, u.shape[2], dtype=u.dtype)
        seed = torch.tensor([SEED]) if mode == "seed" else None
        _run((bk, "gddim_step_"), u, hist, y, table, torch.tensor([k]), TS, kernel_params(SDE, "cpu"), seed, obs)
        return u
    return run


STEPS = {"half_step_": _half, "sscs_step_": _sscs, "em": _affine("em"), "denoise": _affine("denoise"),
         "gddim_step_": _gddim(False), "gddim_denoise_row": _gddim(True)}


def _replacement_time(name, k):
    """t_r of each op at step k (None: the exact rule), from the docs of cld_fast.opdefs."""
    last = TS.numel() - 1
    if name in ("half_step_", "em", "gddim_step_"):
        return float(TS[k + 1])
    if name == "sscs_step_":
        t1, t2 = float(TS[k + 1]), float(TS[min(k + 2, last)])
        return t1 - 0.5 * (t1 - t2)
    if name == "gddim_denoise_row":
        return None if k + 1 >= TS.numel() else float(TS[k + 1])
    return None


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("k", [0, 3])
def test_replacement_is_the_perturbation_of_x_obs(name, k):
    """float64 torch op with explicit noise: observed elements = A(t_r) (x_obs, 0) + L(t_r) z from
    CLD.perturbation_kernel, free elements = the op without obs."""
    if name == "gddim_denoise_row":
        k = 4
    u, y = _args(torch.float64)
    obs = _obs(torch.float64, noise=True)
    free = STEPS[name]("torch", u.clone(), y, None, "eps", k)
    got = STEPS[name]("torch", u.clone(), y, obs, "eps", k)
    keep = obs[:, 1] != 0
    t_r = _replacement_time(name, k)
    if t_r is None:
        want_x, want_v = obs[:, 0], free[:, 1]
    else:
        kk = SDE.perturbation_kernel(torch.tensor([t_r], dtype=torch.float64), "hsm")
        want_x = kk.a_xx * obs[:, 0] + kk.l11 * obs[:, 2]
        want_v = kk.a_vx * obs[:, 0] + kk.l21 * obs[:, 2] + kk.l22 * obs[:, 3]
    torch.testing.assert_close(got[:, 0][keep], want_x[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[:, 1][keep], want_v[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[:, 0][~keep], free[:, 0][~keep], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1][~keep], free[:, 1][~keep], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("mode", ["eps", "seed", "none"])
@pytest.mark.parametrize("name", list(STEPS))
def test_step_ops_with_obs_match_float64_reference(backend, mode, name):
    """Every backend's float32 step with a condition against the float64 reference (1e-5; seed mode +3e-6)."""
    backend = _backend(backend)
    k = 4 if name == "gddim_denoise_row" else 1
    u, y = _args(torch.float32)
    obs = _obs(torch.float32, noise=mode == "eps")
    ref = STEPS[name]("torch", u.double(), y.double(), obs.double(), mode, k)
    got = STEPS[name](backend, u.clone(), y, obs, mode, k)
    tol = 1e-5 + (3e-6 if mode == "seed" else 0.0)
    scale = max(1.0, float(ref.abs().max()))
    assert float((got.double() - ref).abs().max()) / scale <= tol


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_seed_mode_replacement_moments(backend):
    """In-kernel replacement noise: mean A x_obs and covariance L L^T of the HSM kernel at t_r, within
    5 standard errors, and the half step's pair (z2, z3) is independent of a step op's (z0, z1)."""
    backend = _backend(backend)
    n = 20000
    obs = torch.stack([torch.full((1, n), 0.7), torch.ones(1, n)], 1)
    u = torch.zeros(1, 2, n)
    seed = torch.tensor([SEED])
    params = kernel_params(SDE, "cpu")
    cf.backends.get(backend).op("half_step_")(u, TS, torch.tensor([1]), params, None, seed, obs)
    w = torch.zeros(1, 2, n)
    cf.backends.get(backend).op("affine_step")(w, torch.zeros(1, n), TS, torch.tensor([0]), params,
                                               AFFINE_KIND_CODES["em"], False, None, seed, w, obs)
    kk = SDE.perturbation_kernel(torch.tensor([float(TS[2])], dtype=torch.float64), "hsm")
    x, v = u[0, 0].double(), u[0, 1].double()
    for got, want, sd in ((x.mean(), kk.a_xx * 0.7, kk.l11 / math.sqrt(n)),
                          (v.mean(), kk.a_vx * 0.7, torch.sqrt(kk.s_vv / n))):
        assert abs(float(got - want)) < 5 * float(sd)
    for got, want in ((x.var(), kk.s_xx), (v.var(), kk.s_vv)):
        assert abs(float(got / want) - 1) < 5 * math.sqrt(2 / n)
    corr = torch.corrcoef(torch.stack([x, v]))[0, 1]
    assert abs(float(corr) - float(kk.s_xv / torch.sqrt(kk.s_xx * kk.s_vv))) < 5 / math.sqrt(n)
    # same seed and step 1 vs 0 would differ anyway; same step 1 with the other pair must be independent
    w1 = torch.zeros(1, 2, n)
    cf.backends.get(backend).op("affine_step")(w1, torch.zeros(1, n), TS, torch.tensor([1]), params,
                                               AFFINE_KIND_CODES["em"], False, None, seed, w1, obs)
    zx_half = (u[0, 0].double() - kk.a_xx * 0.7) / kk.l11
    zx_em = (w1[0, 0].double() - kk.a_xx * 0.7) / kk.l11
    assert abs(float(torch.corrcoef(torch.stack([zx_half, zx_em]))[0, 1])) < 5 / math.sqrt(n)


def _inpaint_problem(b=64, c=3, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_obs = torch.randn(b, c, hw, hw, generator=g)
    mask = torch.rand(1, c, hw, hw, generator=g) < 0.5
    return x_obs, mask


def _score(u, t):
    return -0.3 * u[:, u.shape[1] // 2:]  # any smooth score; the observed x does not depend on it


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
@pytest.mark.parametrize("denoise", [True, False])
def test_final_sample_holds_x_obs(method, denoise):
    """With the denoising step the observed coordinates are x_obs exactly; without it they are a draw at
    t = eps (within a few l11(eps) of x_obs)."""
    x_obs, mask = _inpaint_problem()
    sde = CLD()
    res = cf.sample(_score, x_obs.shape, sde, steps=8, method=method, denoise=denoise,
                    generator=torch.Generator().manual_seed(1), condition=cf.Inpaint(x_obs, mask))
    m = mask.expand_as(x_obs)
    if denoise:
        assert torch.equal(res.x[m], x_obs[m])
    else:
        l11 = float(sde.perturbation_kernel(torch.tensor([1e-3]), "hsm").l11)
        assert float((res.x[m] - x_obs[m]).abs().max()) < 6 * l11 + 1e-2 * float(x_obs.abs().max())
    assert not torch.equal(res.x[~m], torch.zeros_like(res.x[~m]))


def test_condition_reproducible_from_the_generator():
    x_obs, mask = _inpaint_problem(b=8)
    sde = CLD()
    states = []

    def run(seed):
        seen = []
        cf.sample(_score, x_obs.shape, sde, steps=6, generator=torch.Generator().manual_seed(seed),
                  condition=cf.Inpaint(x_obs, mask), callback=lambda i, t, u: seen.append(u.clone()))
        return seen

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    m = torch.cat([mask, mask], 1).expand(8, 6, 4, 4)
    assert not torch.equal(a[1][m], c[1][m])  # the replacement noise comes from the seed


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_samplers_agree_across_backends_with_condition(backend):
    backend = _backend(backend)
    x_obs, mask = _inpaint_problem(b=4)
    sde = CLD()
    runs = [cf.sample(_score, x_obs.shape, sde, steps=6, generator=torch.Generator().manual_seed(5), backend=bk,
                      condition=cf.Inpaint(x_obs, mask)).u for bk in (backend, "torch")]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["sscs", "gddim"])
def test_scheduler_loop_with_condition_matches_sample(method):
    x_obs, mask = _inpaint_problem(b=4)
    sde = CLD()
    cond = cf.Inpaint(x_obs, mask)
    want = cf.sample(_score, x_obs.shape, sde, steps=6, method=method, generator=torch.Generator().manual_seed(7),
                     condition=cond)
    sched = cf.Scheduler(sde, method=method, steps=6)
    u = sched.init_noise(x_obs.shape, generator=torch.Generator().manual_seed(7), condition=cond)
    for t in sched.timesteps:
        u = sched.step(_score(u, t.expand(4)), t, u)
    assert torch.equal(u, want.u)
    with pytest.raises(ValueError, match="x_obs has shape"):
        sched.init_noise((3, 3, 4, 4), condition=cond)


def _exact_conditional(gm, a, n, g):
    w = torch.softmax(gm.log_weights - 0.5 * (a - gm.means[:, 0]) ** 2 / gm.std ** 2, 0)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    return gm.means[k, 1] + gm.std * torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("case", [(GaussianMixture2D(), CLD(), 0.0),
                                  (GaussianMixture2D(4, 1.0, 0.2), CLD(beta0=1.0, beta1=7.0, m_inv=9.0), 0.0)],
                         ids=["ring8-default-cld", "cross4-cld-1-7-9"])
def test_toy_inpainting_samples_the_conditional(case):
    gm, sde, a = case
    n = 3000
    exact = _exact_conditional(gm, a, n, torch.Generator().manual_seed(11))[:, None]
    x_obs = torch.tensor([[a, 0.0]])
    mask = torch.tensor([[True, False]])
    res = cf.sample(gm.cld_score(sde), (n, 2), sde, steps=50, generator=torch.Generator().manual_seed(2),
                    condition=cf.Inpaint(x_obs, mask))
    unc = cf.sample(gm.cld_score(sde), (n, 2), sde, steps=50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(res.x[:, 0], torch.full((n,), a))
    e_cond = energy_distance(res.x[:, 1:].double(), exact)
    e_unc = energy_distance(unc.x[:, 1:].double(), exact)
    assert e_cond < 0.01, (e_cond, e_unc)
    assert e_cond < 0.2 * e_unc, (e_cond, e_unc)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, text", [
    (lambda: cf.Inpaint([1.0], torch.ones(1)), TypeError, "x_obs"),
    (lambda: cf.Inpaint(torch.zeros(2, 3), "mask"), TypeError, "mask must be a torch.Tensor"),
    (lambda: cf.Inpaint(torch.zeros(2, 3), torch.ones(2, 4)), ValueError, "mask must have the shape of x_obs"),
    (lambda: cf.Inpaint(torch.zeros(2, 3), torch.full((2, 3), 2.0)), ValueError, "mask must hold only 0 and 1"),
    (lambda: cf.Inpaint(torch.full((2, 3), float("nan")), torch.ones(2, 3)), ValueError, "x_obs contains NaN"),
    (lambda: cf.Inpaint(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3)), TypeError, "x_obs"),
    (lambda: cf.Inpaint(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be bool"),
])
def test_inpaint_bad_input(make, error, text):
    with pytest.raises(error, match=text):
        make()


def test_nan_outside_the_mask_is_allowed():
    x = torch.tensor([[1.0, float("nan")]])
    cond = cf.Inpaint(x, torch.tensor([[1, 0]]))
    assert torch.isfinite(cond.packed((1, 2), torch.float32, "cpu")).all()


@pytest.mark.parametrize("kw, error, text", [
    (dict(method="ode"), ValueError, "method='ode' does not take condition="),
    (dict(condition="mask"), TypeError, "condition must be one of"),
    (dict(shape=(4, 3)), ValueError, "x_obs has shape"),
])
def test_sample_refuses_a_condition_it_cannot_honour(kw, error, text):
    x_obs, mask = torch.zeros(4, 2), torch.ones(4, 2)
    args = dict(condition=cf.Inpaint(x_obs, mask), method="sscs", shape=(4, 2))
    args.update(kw)
    shape = args.pop("shape")
    with pytest.raises(error, match=text):
        cf.sample(_score, shape, CLD(), steps=4, **args)


def test_vpsde_refuses_a_condition():
    with pytest.raises(ValueError, match="implemented for the CLD"):
        cf.sample(lambda x, t: -x, (4, 2), cf.VPSDE(), steps=4, method="em",
                  condition=cf.Inpaint(torch.zeros(4, 2), torch.ones(4, 2)))


def test_ops_check_obs():
    u = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="obs must be a"):
        cf.sscs_step_(u, torch.zeros(2, 2, 5), TS, SDE, step=0, obs=torch.zeros(2, 3, 10))
    with pytest.raises(TypeError, match="obs must have the state dtype"):
        cf.em_step_(u, torch.zeros(2, 2, 5), TS, SDE, step=0, obs=torch.zeros(2, 2, 10, dtype=torch.float64))
    hist = cf.gddim_history(u, 2)
    table = gddim_table(SDE, TS, order=2)
    with pytest.raises(ValueError, match="needs the run's time grid ts and the sde"):
        cf.gddim_step_(u, torch.zeros(2, 2, 5), hist, table, step=0, obs=torch.zeros(2, 2, 10))
