"""cf.likelihood: the probability-flow NLL bound against exact densities of a Gaussian mixture."""
import math

import pytest
import torch

import cld_fast as cf

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1000
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def data(gm):
    return gm.sample(N, torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.fixture(scope="module")
def exact_run(gm, sde, data):
    return cf.likelihood(gm.cld_score(sde), data, sde, probe="exact", generator=torch.Generator().manual_seed(7))


def _v0(sde, shape, seed, dtype=torch.float64):
    """The v0 that cf.likelihood draws first from a generator with this seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * math.sqrt(sde.gamma * sde.M)


def test_cld_bound_matches_true_nll(gm, sde, data, exact_run):
    """With the exact score the bound is the data NLL: compared per sample with the same v0 (then the
    v0 terms -log N(v0) - H(v0) cancel exactly) within 2%, and in expectation within the sampling error."""
    res = exact_run
    d = 2
    v0 = _v0(sde, data.shape, 7)
    log_nv = (-0.5 * v0 ** 2 / (sde.gamma * sde.M) - 0.5 * math.log(2 * math.pi * sde.gamma * sde.M)).sum(1)
    paired = (-gm.log_prob(data) - log_nv - sde.initial_velocity_entropy(d)) / (d * LN2)
    true_bpd = gm.nll_bits_per_dim(data)
    got, want = res.bpd.mean().item(), paired.mean().item()
    print(f"CLD bound {got:.5f} bits/dim, paired true {want:.5f}, E[-log2 p(x0)]/2 = {true_bpd.mean().item():.5f}, "
          f"nfe {res.nfe}")
    assert abs(got - want) <= 0.02 * abs(want)
    se = (res.bpd - true_bpd).std().item() / math.sqrt(N)
    assert abs(got - true_bpd.mean().item()) < 4 * se
    assert res.bpd.shape == (N,) and res.bpd.dtype == torch.float64
    assert res.z.shape == (N, 4) and 50 < res.nfe < 2000
    torch.testing.assert_close(res.bpd, res.nll / (d * LN2))


def test_bound_is_log_density_at_eps(gm, sde, data, exact_run):
    """Per sample, -log p_eps(u0) from the ODE equals the exact CLD marginal at t = eps."""
    v0 = _v0(sde, data.shape, 7)
    u0 = torch.cat([data, v0], 1)
    exact = gm.cld_log_prob(u0, torch.full((N,), 1e-5, dtype=torch.float64), sde)
    got = -(exact_run.nll + sde.initial_velocity_entropy(2))
    assert (got - exact).abs().max() < 0.05
    assert (got - exact).abs().mean() < 2e-3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(gm, sde, data, exact_run, probe):
    res = cf.likelihood(gm.cld_score(sde), data, sde, probe=probe, generator=torch.Generator().manual_seed(7))
    diff = res.bpd - exact_run.bpd  # same v0 (drawn first), different trace estimates
    se = diff.std().item() / math.sqrt(N)
    assert abs(diff.mean().item()) < 5 * se + 1e-3, (diff.mean().item(), se)


def test_more_probes_less_variance(gm, sde, data, exact_run):
    x = data[:300]
    ex = exact_run.bpd[:300]
    one = cf.likelihood(gm.cld_score(sde), x, sde, generator=torch.Generator().manual_seed(7))
    four = cf.likelihood(gm.cld_score(sde), x, sde, n_probes=4, generator=torch.Generator().manual_seed(7))
    assert (four.bpd - ex).std() < (one.bpd - ex).std()


def test_vpsde_likelihood(gm):
    vp = cf.VPSDE()
    x = gm.sample(500, torch.Generator().manual_seed(2), dtype=torch.float64)
    res = cf.likelihood(gm.vp_score(vp), x, vp, probe="exact")
    exact = -gm.vp_log_prob(x, torch.full((500,), 1e-5, dtype=torch.float64), vp) / (2 * LN2)
    assert abs(res.bpd.mean().item() - exact.mean().item()) <= 0.02 * abs(exact.mean().item())
    assert res.z.shape == x.shape


def test_float32_state(gm, sde, data, exact_run):
    res = cf.likelihood(gm.cld_score(sde), data.float(), sde, probe="exact", generator=torch.Generator().manual_seed(7))
    assert res.bpd.dtype == torch.float64 and res.z.dtype == torch.float32
    v0 = _v0(sde, data.shape, 7, torch.float32)
    u0 = torch.cat([data.float(), v0], 1).double()
    exact = gm.cld_log_prob(u0, torch.full((N,), 1e-5, dtype=torch.float64), sde)
    got = -(res.nll + sde.initial_velocity_entropy(2))
    assert (got - exact).abs().mean() < 5e-3


def test_dequantization_offsets(sde):
    """8-bit data in [0, 1]: official dequantisation (255 x + U) / 256, bits/dim offset 7 (centred) or 8."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 2, 2), generator=gen).float() / 255.0
    seen = []

    def score(u, t):
        seen.append(u.detach()[:, :1].clone())
        return -torch.chunk(u, 2, dim=1)[1]  # a (wrong but) differentiable score

    for centered, offset in ((True, 7.0), (False, 8.0)):
        seen.clear()
        res = cf.likelihood(score, x, sde, dequantize=True, centered=centered, rtol=1e-3, atol=1e-3,
                            generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(res.bpd - res.nll / (4 * LN2), torch.full((4,), offset, dtype=torch.float64))
        x_model = seen[0]  # the data as the ODE starts from it
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
        deq = (255.0 * x + noise) / 256.0
        torch.testing.assert_close(x_model, 2 * deq - 1 if centered else deq)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cf.likelihood(score, x * 255.0, sde, dequantize=True)


def test_network_score_wrapper_is_made_differentiable(sde, toy_score_net):
    Model = toy_score_net(width=16, activation=torch.nn.Tanh)

    s = cf.score_fn(Model(), sde)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)) * 0.5
    kw = dict(rtol=1e-3, atol=1e-3)
    a = cf.likelihood(s, x, sde, generator=torch.Generator().manual_seed(2), **kw)
    b = cf.likelihood(s.differentiable(), x, sde, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.isfinite(a.bpd).all()
    torch.testing.assert_close(a.bpd, b.bpd)


def test_bad_arguments(gm, sde):
    score = gm.cld_score(sde)
    x = torch.zeros(4, 2)
    with pytest.raises(TypeError, match="differentiable"):
        cf.likelihood(lambda u, t: score(u, t).detach(), x, sde)
    with pytest.raises(ValueError, match="probe"):
        cf.likelihood(score, x, sde, probe="uniform")
    with pytest.raises(ValueError, match="n_probes"):
        cf.likelihood(score, x, sde, n_probes=0)
    with pytest.raises(ValueError, match="eps"):
        cf.likelihood(score, x, sde, eps=0.0)
    with pytest.raises(ValueError, match="method"):
        cf.likelihood(score, x, sde, method="euler")
    with pytest.raises(TypeError, match="sde"):
        cf.likelihood(score, x, None)
    with pytest.raises(ValueError, match="data shape"):
        cf.likelihood(lambda u, t: u * 1.0, x, sde)


def test_public_name_survives_submodule_import():
    import cld_fast.nll  # noqa: F401

    assert cf.likelihood is cld_fast.nll.likelihood
    assert cf.likelihood(lambda u, t: -u[:, 2:] / 0.25, torch.zeros(2, 2), cf.CLD(), probe="exact").bpd.shape == (2,)
