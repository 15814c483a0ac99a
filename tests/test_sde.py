"""cld_fast.sde against an independent 40-digit reference: Van Loan's matrix exponential of the
linear SDE (mpmath), never the closed forms."""
import math

import mpmath as mp
import pytest
import torch

import cld_fast as cf
from cld_fast.sde import CLD, VPSDE

import cld_reference as R

mp.mp.dps = 40

PARAMS = [
    dict(),
    dict(m_inv=1.0, gamma=0.1, beta0=1.0, beta1=3.0),
    dict(m_inv=9.0, gamma=0.01, beta0=8.0, beta1=-4.0),
    dict(m_inv=0.25, gamma=0.5, beta0=0.1, beta1=20.0),
]
TIMES = [1e-5, 3e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.37, 0.5, 0.77, 0.9, 1.0]


def _B(sde, t):
    t = mp.mpf(t)
    return mp.mpf(sde.beta0) * t + mp.mpf(sde.beta1) * t * t / 2


def van_loan(sde, b, s0x, s0v, reverse=False):
    """(Phi, Sigma) of du = F u dB + sqrt(2 Gamma) dW_B over an integrated-beta span b."""
    G = 2 / mp.sqrt(mp.mpf(sde.m_inv))
    mi = mp.mpf(sde.m_inv)
    F = mp.matrix([[0, -mi], [1, -G * mi]]) if reverse else mp.matrix([[0, mi], [-1, -G * mi]])
    Z = mp.zeros(4, 4)
    for i in range(2):
        for j in range(2):
            Z[i, j] = -F[i, j] * b
            Z[i + 2, j + 2] = F[j, i] * b
    Z[1, 3] = 2 * G * b
    E = mp.expm(Z)
    Phi = mp.matrix(2, 2)
    C12 = mp.matrix(2, 2)
    for i in range(2):
        for j in range(2):
            Phi[i, j] = E[j + 2, i + 2]
            C12[i, j] = E[i, j + 2]
    S = Phi * C12 + Phi * mp.matrix([[s0x, 0], [0, s0v]]) * Phi.T
    return Phi, S


def _rel(got, want):
    want = float(want)
    return abs(float(got) - want) / max(abs(want), 1e-300)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("objective", ["hsm", "dsm"])
def test_perturbation_kernel_matches_van_loan(params, objective):
    sde = CLD(**params)
    t = torch.tensor(TIMES, dtype=torch.float64)
    k = sde.perturbation_kernel(t, objective)
    s0x, s0v = sde.initial_covariance(objective)
    eps = mp.mpf(sde.numerical_eps)
    for i, ti in enumerate(TIMES):
        Phi, S = van_loan(sde, _B(sde, ti), mp.mpf(s0x), mp.mpf(s0v))
        sxx, sxv, svv = S[0, 0] + eps, S[0, 1], S[1, 1] + eps
        l11 = mp.sqrt(sxx)
        l21 = sxv / l11
        l22 = mp.sqrt(svv - l21 ** 2)
        want = dict(a_xx=Phi[0, 0], a_xv=Phi[0, 1], a_vx=Phi[1, 0], a_vv=Phi[1, 1], s_xx=sxx, s_xv=sxv,
                    s_vv=svv, l11=l11, l21=l21, l22=l22)
        for name, ref in want.items():
            got = getattr(k, name)[i]
            assert got.dtype == torch.float64
            assert _rel(got, ref) < 1e-9, (name, ti, float(got), float(ref))


@pytest.mark.parametrize("params", PARAMS)
def test_half_step_matches_van_loan_of_reverse_linear_part(params):
    sde = CLD(**params)
    t = torch.tensor(TIMES, dtype=torch.float64)
    for frac in (0.5, 1e-3):
        h = t * frac
        rows = sde.half_step_coefficients(t, h)
        sxx_all, sxv_all, svv_all = sde.half_step_covariance(t, h)
        for i, ti in enumerate(TIMES):
            b = _B(sde, ti) - _B(sde, ti - float(h[i]))
            Phi, S = van_loan(sde, b, 0, 0, reverse=True)
            for j, ref in enumerate([Phi[0, 0], Phi[0, 1], Phi[1, 0], Phi[1, 1]]):
                assert _rel(rows[i, j], ref) < 1e-9, (j, ti, frac)
            for got, ref in ((sxx_all[i], S[0, 0]), (sxv_all[i], S[0, 1]), (svv_all[i], S[1, 1])):
                assert _rel(got, ref) < 1e-9, (ti, frac, float(got), float(ref))
            l11, l21, l22 = rows[i, 4], rows[i, 5], rows[i, 6]
            assert _rel(l11 * l11, S[0, 0]) < 1e-9
            assert _rel(l11 * l21, S[0, 1]) < 1e-9
            assert _rel(l21 * l21 + l22 * l22, S[1, 1]) < 1e-9


def test_large_time_reaches_prior_without_overflow():
    sde = CLD(beta0=4.0, beta1=400.0)  # B(1) = 204: the textbook form overflows exp(4 g B)
    k = sde.perturbation_kernel(torch.tensor([1.0], dtype=torch.float64), "hsm")
    for name in ("s_xx", "s_xv", "s_vv", "l22"):
        assert torch.isfinite(getattr(k, name)).all(), name
    assert abs(k.s_xx.item() - (1.0 + sde.numerical_eps)) < 1e-12
    assert abs(k.s_vv.item() - (sde.M + sde.numerical_eps)) < 1e-12
    assert abs(k.s_xv.item()) < 1e-12


@pytest.mark.parametrize("params", PARAMS)
def test_mixed_and_loss_coefficients(params):
    """Against the independent reference (textbook covariance, torch.linalg Cholesky), and the two loss
    weightings against their definitions evaluated on random (out, v, eps_v)."""
    sde = CLD(**params)
    t = torch.tensor([1e-3, 0.05, 0.3, 1.0], dtype=torch.float64)
    s_xx, s_xv, s_vv = R.covariance(sde, t)
    _, _, l22 = R.cholesky(s_xx, s_xv, s_vv)
    mixed = sde.mixed_score_coefficients(t)
    torch.testing.assert_close(mixed[:, 0], -1 / s_vv, rtol=1e-9, atol=0)
    # l22 of the textbook form loses digits to cancellation in s_xx at small B(t): measured worst
    # relative difference 2.8e-8 (t = 1e-3, beta0 = 0.1); 1e-6 leaves a 35x margin
    torch.testing.assert_close(mixed[:, 1], -1 / l22, rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(3)
    out, v, eps_v = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    score = -v / s_vv[:, None] - out / l22[:, None]
    want = {"reweightedv2": ((out + v * (l22 / s_vv)[:, None] - eps_v) ** 2).sum(1),
            "likelihood": ((score + eps_v / l22[:, None]) ** 2).sum(1) * R.beta(sde, t) * R.consts(sde)[1]}
    for weighting, expect in want.items():
        cw = sde.loss_coefficients(t, weighting)
        got = cw[:, 1] * ((out + cw[:, 0:1] * v - eps_v) ** 2).sum(1)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        sde.loss_coefficients(t, "l2")


def test_score_and_affine_coefficients_are_the_reverse_sde():
    sde = CLD(beta0=2.0, beta1=1.5)
    t, h = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.01], dtype=torch.float64)
    beta = 2.0 + 1.5 * 0.6
    ab = sde.score_step_coefficients(t, h)[0]
    assert math.isclose(ab[0].item(), 1 + 2 * sde.Gamma * beta * 0.01 * sde.m_inv, rel_tol=1e-14)
    assert math.isclose(ab[1].item(), 2 * sde.Gamma * beta * 0.01, rel_tol=1e-14)
    em = sde.reverse_affine_coefficients(t, h, "em")[0].tolist()
    G, mi, bh = sde.Gamma, sde.m_inv, beta * 0.01
    for got, want in zip(em, [1.0, -mi * bh, bh, 1 + G * mi * bh, 2 * G * bh, math.sqrt(2 * G * bh)]):
        assert math.isclose(got, want, rel_tol=1e-14)
    assert sde.reverse_affine_coefficients(t, h, "denoise")[0, 5].item() == 0.0
    pf = sde.reverse_affine_coefficients(t, h, "pf_drift")[0].tolist()
    for got, want in zip(pf, [0.0, mi * beta, -beta, -G * mi * beta, -G * beta, 0.0]):
        assert math.isclose(got, want, rel_tol=1e-14, abs_tol=1e-300)
    with pytest.raises(ValueError, match="kind"):
        sde.reverse_affine_coefficients(t, h, "heun")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m_inv=0.0), "m_inv"),
        (dict(m_inv=-1.0), "m_inv"),
        (dict(gamma=0.0), "gamma"),
        (dict(beta0=0.0), "beta"),
        (dict(beta0=1.0, beta1=-2.0), "beta"),
        (dict(numerical_eps=-1e-9), "numerical_eps"),
        (dict(gamma=float("nan")), "gamma"),
    ],
)
def test_cld_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLD(**kwargs)


def test_cld_is_immutable_and_typed():
    sde = CLD()
    with pytest.raises(Exception):
        sde.m_inv = 2.0
    with pytest.raises(TypeError, match="beta0"):
        CLD(beta0="4")
    with pytest.raises(ValueError, match="objective"):
        sde.perturbation_kernel(torch.tensor([0.5]), "ism")


def test_prior_and_entropy():
    sde = CLD()
    g = torch.Generator().manual_seed(0)
    u = sde.prior_sampling((20000, 3), generator=g, dtype=torch.float64)
    assert u.shape == (20000, 6)
    assert abs(u[:, :3].var().item() - 1.0) < 0.03
    assert abs(u[:, 3:].var().item() - sde.M) < 0.03 * sde.M
    u1 = u[:2]
    x, v = u1[:, :3], u1[:, 3:]
    one = torch.tensor(1.0, dtype=torch.float64)
    want = (torch.distributions.Normal(0 * one, one).log_prob(x).sum(1)
            + torch.distributions.Normal(0 * one, one * math.sqrt(sde.M)).log_prob(v).sum(1))
    torch.testing.assert_close(sde.prior_logp(u1), want, rtol=1e-12, atol=1e-12)
    n = 5
    want_h = torch.distributions.Normal(0 * one, one * math.sqrt(sde.gamma * sde.M)).entropy().item() * n
    assert math.isclose(sde.initial_velocity_entropy(n), want_h, rel_tol=1e-12)


def test_vpsde_marginal_matches_its_sde():
    vp = VPSDE()
    t = torch.tensor([1e-4, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma = vp.marginal_coefficients(t)
    b = 0.1 * t + 0.5 * 19.9 * t ** 2
    torch.testing.assert_close(alpha, torch.exp(-b / 2), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma ** 2, 1 - torch.exp(-b), rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        VPSDE(beta_min=-1.0)
