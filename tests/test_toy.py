"""The toy Gaussian mixture: exact densities and scores (checked against autograd and the package's
perturbation kernel) and the energy distance."""
import math

import pytest
import torch

import cld_fast as cf
from cld_fast.toy import GaussianMixture2D, energy_distance

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixture_layout_and_sampling(gm):
    assert gm.means.shape == (8, 2)
    assert torch.allclose(gm.means.norm(dim=1), torch.full((8,), 0.7, dtype=torch.float64))
    a = gm.sample(5000, torch.Generator().manual_seed(0))
    b = gm.sample(5000, torch.Generator().manual_seed(0))
    assert a.shape == (5000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # Every point sits near one mean; the residual has the component std.
    d = torch.cdist(a.double(), gm.means)
    resid = a.double() - gm.means[d.argmin(1)]
    assert abs(resid.std().item() - 0.08) < 0.004
    assert abs(resid.mean().item()) < 0.005


def test_log_prob_normalised(gm):
    g = torch.linspace(-1.2, 1.2, 481, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    p = gm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    mass = p.sum().item() * (g[1] - g[0]).item() ** 2
    assert abs(mass - 1.0) < 1e-4


def _grad_v(logp_fn, u):
    u = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp_fn(u).sum(), u)
    return g


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.3, 1.0])
def test_cld_score_is_grad_of_log_prob(gm, t):
    sde = cf.CLD()
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(64, 4, generator=gen, dtype=torch.float64) * 0.5
    tt = torch.full((64,), t, dtype=torch.float64)
    g = _grad_v(lambda uu: gm.cld_log_prob(uu, tt, sde), u)[:, 2:]
    s = gm.cld_score(sde)(u, tt)
    assert s.dtype == torch.float32 and s.shape == (64, 2)
    torch.testing.assert_close(s.double(), g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_cld_marginal_limits(gm):
    sde = cf.CLD()
    gen = torch.Generator().manual_seed(2)
    x = gm.sample(100, gen, dtype=torch.float64)
    v = torch.randn(100, 2, generator=gen, dtype=torch.float64) * math.sqrt(sde.gamma * sde.M)
    u = torch.cat([x, v], 1)
    # t -> 0: p(x) N(v; 0, gamma M)
    lp0 = gm.cld_log_prob(u, torch.full((100,), 1e-9, dtype=torch.float64), sde)
    lv = (-0.5 * v ** 2 / (sde.gamma * sde.M) - 0.5 * math.log(2 * math.pi * sde.gamma * sde.M)).sum(1)
    torch.testing.assert_close(lp0, gm.log_prob(x) + lv, rtol=1e-5, atol=1e-5)
    # t = 1: close to the prior N(0, I) x N(0, M I)
    u1 = sde.prior_sampling((100, 2), gen, dtype=torch.float64)
    lp1 = gm.cld_log_prob(u1, torch.ones(100, dtype=torch.float64), sde)
    assert (lp1 - sde.prior_logp(u1)).abs().max() < 0.05


def test_cld_score_stein_identity_with_perturb(gm):
    """E[s_d(u_t) v_d] = -1 and E[s(u_t)] = 0 under u_t = perturb(x0, t), x0 from the mixture (HSM kernel)."""
    sde = cf.CLD()
    gen = torch.Generator().manual_seed(3)
    n = 40000
    x0 = gm.sample(n, gen, dtype=torch.float64)
    score = gm.cld_score(sde)
    for t in (0.02, 0.2):
        tt = torch.full((n,), t, dtype=torch.float64)
        u, _ = cf.perturb(x0, tt, sde, objective="hsm", generator=gen, backend="torch")
        s = score(u, tt).double()
        v = u[:, 2:]
        prod = (s * v).mean(0)
        se = (s * v).std(0) / math.sqrt(n)
        assert torch.all((prod + 1.0).abs() < 5 * se + 1e-3), (t, prod, se)
        assert torch.all(s.mean(0).abs() < 5 * s.std(0) / math.sqrt(n))


@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 1.0])
def test_vp_score_is_grad_of_log_prob(gm, t):
    sde = cf.VPSDE()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.6
    tt = torch.full((64,), t, dtype=torch.float64)
    g = _grad_v(lambda xx: gm.vp_log_prob(xx, tt, sde), x)
    torch.testing.assert_close(gm.vp_score(sde)(x, tt).double(), g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_scores_reject_wrong_sde_and_shape(gm):
    with pytest.raises(TypeError):
        gm.cld_score(cf.VPSDE())
    with pytest.raises(TypeError):
        gm.vp_score(cf.CLD())
    with pytest.raises(ValueError):
        gm.cld_score(cf.CLD())(torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(ValueError):
        GaussianMixture2D(n_components=0)
    with pytest.raises(ValueError):
        GaussianMixture2D(std=0.0)


def test_energy_distance():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 2, generator=gen, dtype=torch.float64) + 0.5
    # brute force
    dab = torch.cdist(a, b).mean()
    daa = torch.cdist(a, a).sum() / (300 * 299)
    dbb = torch.cdist(b, b).sum() / (200 * 199)
    ref = (dab - 0.5 * daa - 0.5 * dbb).item()
    assert energy_distance(a, b, chunk=64) == pytest.approx(ref, rel=1e-7)
    assert energy_distance(b, a) == pytest.approx(ref, rel=1e-7)
    assert ref > 0.05
    same = energy_distance(torch.randn(2000, 2, generator=gen), torch.randn(2000, 2, generator=gen))
    assert abs(same) < 2e-3
    with pytest.raises(ValueError):
        energy_distance(a, b[:, :1])
