"""Parity with the official CLD-SGM code: DSM score and loss, ``reweightedv1``, non-mixed outputs and the
official SSCS half steps, on every backend, against float64 references written here from the official
formulas (the textbook covariance of the perturbation kernel, the noise multiplier
-sqrt(s_xx / det Sigma), the loss in score / noise_multiplier - eps_v, the SSCS analytical half steps).

Tolerances: float64 states 1e-10 relative (the references use the textbook forms, which cancel a few
digits at small t), float32 states 2e-5 relative.
"""
import math

import pytest
import torch

import cld_fast as cf
from cld_fast import sde as sde_mod

BACKENDS = [b for b in ("torch", "cpu", "triton") if b in cf.backends()]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


# ---- the official formulas, float64 ----------------------------------------------------------------


def official_var(sde, t, var0v):
    """Covariance of p(u_t | x0[, v0]) as the official ``CLD.var`` writes it (var0x = 0)."""
    t = t.double()
    g, f = sde.g, sde.Gamma
    b = sde.beta0 * t + 0.5 * sde.beta1 * t * t
    m = torch.exp(-4.0 * b * g)
    var_xx = 1.0 / m - 1.0 - 4.0 * b * g - 8.0 * b ** 2 * g ** 2 + 16.0 * g ** 4 * b ** 2 * var0v
    var_xv = 4.0 * g ** 2 * b * var0v + 4.0 * g * b ** 2 - 8.0 * g ** 3 * b ** 2 * var0v
    var_vv = (f ** 2 * (1.0 / m - 1.0) / 4.0 + f * b - 4.0 * g * b * var0v + 4.0 * g ** 2 * b ** 2 * var0v + var0v
              - 2.0 * b ** 2)
    eps = sde.numerical_eps
    return var_xx * m + eps, var_xv * m, var_vv * m + eps


def var0v_of(sde, objective):
    return sde.gamma / sde.m_inv if objective == "hsm" else 0.0


def official_noise_multiplier(sde, t, objective):
    s_xx, s_xv, s_vv = official_var(sde, t, var0v_of(sde, objective))
    return -torch.sqrt(s_xx / (s_xx * s_vv - s_xv ** 2))


def official_score(sde, out, u, t, objective, output):
    """The official ``get_score_fn``: mixed score -v / var_vv(HSM) + out * noise_multiplier(objective),
    ``mixed_score=False``: out * noise_multiplier; ``output="score"`` (ours): out itself."""
    out, u = out.double(), u.double()
    if output == "score":
        return out
    nm = official_noise_multiplier(sde, t, objective)[:, None]
    if output == "eps":
        return out * nm
    v = u.chunk(2, dim=1)[1]
    s_vv_hsm = official_var(sde, t, var0v_of(sde, "hsm"))[2][:, None]
    return -v / s_vv_hsm + out * nm


def official_loss(sde, out, u, t, eps_v, objective, output, weighting):
    """The official ``loss_fn`` per sample given the perturbed data and its velocity noise."""
    score = official_score(sde, out, u, t, objective, output)
    nm = official_noise_multiplier(sde, t, objective)[:, None]
    multiplier = (sde.beta(t.double()) * sde.Gamma)[:, None]
    eps_v = eps_v.double()
    if weighting == "reweightedv1":
        loss = (score / nm - eps_v) ** 2 * multiplier
    elif weighting == "likelihood":
        loss = (score - eps_v * nm) ** 2 * multiplier
    else:
        loss = (score / nm - eps_v) ** 2
    return loss.sum(1)


def _use_backend(monkeypatch, backend):
    monkeypatch.setenv("CLD_FAST_BACKEND", backend)


SDES = [cf.CLD(beta0=4.0, beta1=0.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-9),
        cf.CLD(beta0=0.5, beta1=7.5, m_inv=2.0, gamma=0.1, numerical_eps=1e-6)]


def _times(b, gen):
    return torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.02


class _Linear(torch.nn.Module):
    """A fixed map out = u W + t w (no training: only the wrapper's algebra matters)."""

    def __init__(self, d, gen):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2 * d, d, generator=gen, dtype=torch.float64) / d)

    def forward(self, u, t):
        return (u.double() @ self.w + t.double()[:, None]).to(u.dtype)


# ---- score: objective and output ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["hsm", "dsm"])
@pytest.mark.parametrize("output", ["mixed", "eps", "score"])
def test_score_fn_matches_official_score(monkeypatch, backend, objective, output):
    _use_backend(monkeypatch, backend)
    gen = torch.Generator().manual_seed(5)
    b, d = 7, 6
    for sde in SDES:
        model = _Linear(d, gen)
        u = torch.randn(b, 2 * d, generator=gen, dtype=torch.float64)
        t = _times(b, gen)
        out = model(u.float(), t.float()).double()  # what the wrapper feeds on (float32 network call)
        want = official_score(sde, out, u, t, objective, output)
        for dtype in (torch.float64, torch.float32):
            got = cf.score_fn(model, sde, objective=objective, output=output)(u.to(dtype), t.to(dtype))
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_dsm_score_uses_the_dsm_noise_multiplier(gen):
    """The issue's symptom: the HSM multiplier differs from the DSM one by far more than rounding
    (measured: 90% at t = 1e-5, 11% at t = 1e-3, 4% at t = 1e-2 for the default CLD)."""
    sde = cf.CLD()
    t = torch.tensor([1e-5, 1e-3, 1e-2], dtype=torch.float64)
    c_hsm = sde.score_coefficients(t, "hsm")[:, 1]
    c_dsm = sde.score_coefficients(t, "dsm")[:, 1]
    rel = ((c_hsm - c_dsm) / c_dsm).abs()
    assert float(rel[0]) > 0.8 and float(rel[1]) > 0.1 and float(rel[2]) > 0.03, rel
    # the official textbook form loses ~6 digits to cancellation at t = 1e-3 (measured 3e-10)
    torch.testing.assert_close(c_dsm, official_noise_multiplier(sde, t, "dsm"), rtol=1e-8, atol=0)


def test_score_fn_mixed_flag_is_an_output_shorthand():
    sde = cf.CLD()
    model = _Linear(3, torch.Generator().manual_seed(0))
    assert cf.score_fn(model, sde).output == "mixed"
    assert cf.score_fn(model, sde, mixed=True).output == "mixed"
    assert cf.score_fn(model, sde, mixed=False).output == "score"
    with pytest.raises(ValueError, match="either mixed"):
        cf.score_fn(model, sde, mixed=False, output="eps")
    with pytest.raises(ValueError, match="output must be one of"):
        cf.score_fn(model, sde, output="noise")
    with pytest.raises(ValueError, match="objective must be one of"):
        cf.score_fn(model, sde, objective="ism")
    with pytest.raises(ValueError, match="applies to a CLD only"):
        cf.score_fn(model, cf.VPSDE(), objective="dsm")


def test_vp_eps_output_is_the_official_non_mixed_score(gen):
    sde = cf.VPSDE()
    x = torch.randn(5, 3, generator=gen)
    t = torch.rand(5, generator=gen) * 0.9 + 0.05
    out = torch.randn(5, 3, generator=gen)
    got = cf.score_fn(lambda x_, t_: out, sde, output="eps")(x, t)
    want = -out.double() / torch.sqrt(-torch.expm1(-sde.beta_int(t.double())))[:, None]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective, output", [("dsm", "mixed"), ("hsm", "eps"), ("dsm", "eps")])
def test_likelihood_wrapper_uses_the_objective(objective, output):
    """``.differentiable()`` (cf.likelihood's path) keeps the objective and output."""
    sde = SDES[1]
    gen = torch.Generator().manual_seed(3)
    model = _Linear(4, gen)
    u = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = _times(5, gen)
    s = cf.score_fn(model, sde, objective=objective, output=output).differentiable()
    with torch.enable_grad():
        got = s(u, t)
    want = official_score(sde, model(u.detach().float(), t.float()).double(), u.detach(), t, objective, output)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


# ---- loss: objective, output, weighting -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["hsm", "dsm"])
@pytest.mark.parametrize("output", ["mixed", "eps", "score"])
def test_loss_matches_official_loss_and_gradient(monkeypatch, backend, objective, output):
    _use_backend(monkeypatch, backend)
    gen = torch.Generator().manual_seed(11)
    b, d = 6, 10
    for sde in SDES:
        x0 = torch.randn(b, d, generator=gen, dtype=torch.float64)
        t = _times(b, gen)
        eps = torch.randn(b, 2, d, generator=gen, dtype=torch.float64)
        out0 = torch.randn(b, d, generator=gen, dtype=torch.float64)
        for dtype in (torch.float64, torch.float32):
            u, noise = cf.perturb(x0.to(dtype), t.to(dtype), sde, objective=objective, eps=eps.to(dtype),
                                  generator=torch.Generator().manual_seed(2))
            for weighting in ("reweightedv2", "reweightedv1", "likelihood"):
                out = out0.to(dtype).clone().requires_grad_(True)
                loss = cf.hsm_loss(out, u, t.to(dtype), sde, noise, weighting=weighting, reduction="none",
                                   objective=objective, output=output)
                ref_out = out0.clone().requires_grad_(True)
                want = official_loss(sde, ref_out, u.double(), t, eps[:, 1], objective, output, weighting)
                torch.testing.assert_close(loss.double(), want.detach(), **TOL[dtype])
                grad = torch.linspace(0.5, 1.5, b, dtype=torch.float64)
                loss.backward(grad.to(dtype))
                want.backward(grad)
                torch.testing.assert_close(out.grad.double(), ref_out.grad, **TOL[dtype])


def test_dsm_perturb_then_loss_in_seed_mode_matches_explicit_noise():
    """Seeded (in-kernel Philox) DSM noise: the loss regenerates eps_v of the DSM draw."""
    sde = SDES[1]
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, 4, generator=gen)
    t = _times(5, gen).float()
    for backend in BACKENDS:
        u, noise = cf.perturb(x0, t, sde, objective="dsm", seed=12345, generator=torch.Generator().manual_seed(1),
                              backend=backend)
        out = torch.randn(5, 3, 4, generator=gen)
        got = cf.hsm_loss(out, u, t, sde, noise, weighting="reweightedv1", reduction="none", objective="dsm",
                          backend=backend)
        # recover the noise: eps_v = (v - mean_v - l21 eps_x) / l22 with eps_x = (x - mean_x) / l11 is
        # ill-conditioned; instead draw the same Philox numbers through the torch reference
        from cld_fast import philox

        z = philox.philox_normals(5 * 12, torch.tensor([12345]), torch.zeros(1, dtype=torch.int64),
                                  philox.TAG_PERTURB)[:2].view(2, 5, 12)
        want = official_loss(sde, out.reshape(5, 12), u.reshape(5, 24), t.double(), z[1], "dsm", "mixed",
                             "reweightedv1")
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_loss_objective_must_match_the_noise():
    sde = cf.CLD()
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 0.5)
    u, noise = cf.perturb(x0, t, sde, objective="dsm", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"perturb\(objective='dsm'\) but hsm_loss got objective='hsm'"):
        cf.hsm_loss(torch.zeros(3, 4), u, t, sde, noise)
    with pytest.raises(ValueError, match="output must be one of"):
        cf.hsm_loss(torch.zeros(3, 4), u, t, sde, noise, objective="dsm", output="noise")
    with pytest.raises(ValueError, match="weighting must be one of"):
        cf.hsm_loss(torch.zeros(3, 4), u, t, sde, noise, objective="dsm", weighting="reweightedv3")


def test_reweightedv1_is_reweightedv2_times_beta_gamma():
    sde = SDES[1]
    t = torch.linspace(0.05, 1.0, 9, dtype=torch.float64)
    for objective in ("hsm", "dsm"):
        v1 = sde.loss_coefficients(t, "reweightedv1", objective)
        v2 = sde.loss_coefficients(t, "reweightedv2", objective)
        torch.testing.assert_close(v1[:, 1], v2[:, 1] * sde.beta(t) * sde.Gamma, rtol=1e-15, atol=0)
        torch.testing.assert_close(v1[:, [0, 2]], v2[:, [0, 2]], rtol=0, atol=0)


# ---- SSCS: the official half steps ----------------------------------------------------------------


def official_half_step(sde, u, s, dt, z):
    """The official ``analytical_dynamics(u, s, dt, half_step=True)`` in reverse time s = 1 - t with
    given noise z = (z_x, z_v): beta integrated from 1 - s to 1 - s - dt / 2."""
    g, f = sde.g, sde.Gamma

    def big_b(t):
        return sde.beta0 * t + 0.5 * sde.beta1 * t * t

    bb = big_b(1.0 - (s + dt / 2.0)) - big_b(1.0 - s)
    x, v = u.chunk(2, dim=1)
    c = math.exp(2.0 * g * bb)
    mean_x = c * ((1.0 - 2.0 * g * bb) * x + 4.0 * g ** 2 * bb * v)
    mean_v = c * (-bb * x + (1.0 + 2.0 * g * bb) * v)
    c4 = math.exp(4.0 * g * bb)
    var_xx = c4 * (1.0 / c4 - 1.0 + 4.0 * g * bb - 8.0 * g ** 2 * bb ** 2)
    var_xv = -c4 * (4.0 * g * bb ** 2)
    var_vv = c4 * (-f ** 2 * (1.0 - 1.0 / c4) / 4.0 - f * bb - 2.0 * bb ** 2)
    l11 = math.sqrt(var_xx)
    l21 = var_xv / l11
    l22 = math.sqrt(var_vv - l21 ** 2)
    return torch.cat([mean_x + l11 * z[0], mean_v + l21 * z[0] + l22 * z[1]], dim=1)


def official_sscs(sde, u, ts, score, noise):
    """The official SSCS loop (no denoising step) on the forward-time grid ts, float64."""
    for i in range(ts.numel() - 1):
        s, dt = 1.0 - float(ts[i]), float(ts[i] - ts[i + 1])
        u = official_half_step(sde, u, s, dt, noise[i][0])
        x, v = u.chunk(2, dim=1)
        y = score(u, torch.full((u.shape[0],), 1.0 - s, dtype=torch.float64))
        v = v + 2.0 * sde.Gamma * (y + sde.m_inv * v) * float(sde.beta(1.0 - s)) * dt
        u = official_half_step(sde, torch.cat([x, v], 1), s, dt, noise[i][1])
    return u


def _toy_score(u, t):
    x, v = u.chunk(2, dim=1)
    return -0.7 * v - torch.sin(x) * t[:, None].to(u.dtype)


def fused_sscs(sde, u, ts, noise, backend, official):
    """Our SSCS through the ops: opening half step, then one fused sscs_step_ per evaluation, with the
    explicit noise laid out as the kernels read it (closing noise of step i, opening noise of i + 1)."""
    u = u.clone()
    n = ts.numel() - 1
    cf.half_step_(u, torch.stack([ts[0], ts[0] - 0.5 * (ts[0] - ts[1])]), sde, step=0,
                  eps=torch.stack(noise[0][0], 1).to(u.dtype), backend=backend)
    for i in range(n):
        y = _toy_score(u, ts[i].expand(u.shape[0]).to(u.dtype))
        z_open = noise[i + 1][0] if i + 1 < n else [torch.zeros_like(noise[i][1][0])] * 2
        eps = torch.stack(list(noise[i][1]) + list(z_open), 1).to(u.dtype)
        cf.sscs_step_(u, y, ts.to(u.dtype), sde, step=i, eps=eps, backend=backend, official_half_steps=official)
    return u


@pytest.mark.parametrize("backend", BACKENDS)
def test_sscs_official_half_steps_match_official_sampler(backend):
    gen = torch.Generator().manual_seed(21)
    b, d, n = 4, 5, 6
    ts = cf.sde.time_grid(n, 1e-3, "quadratic")
    u0 = torch.randn(b, 2 * d, generator=gen, dtype=torch.float64)
    noise = [[[torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(2)]
             for _ in range(n)]
    for beta1 in (0.0, 4.0):
        sde = cf.CLD(beta0=4.0, beta1=beta1)
        want = official_sscs(sde, u0, ts, _toy_score, noise)
        for dtype in (torch.float64, torch.float32):
            got = fused_sscs(sde, u0.to(dtype), ts, noise, backend, official=True)
            torch.testing.assert_close(got.double(), want, **TOL[dtype])
            ours = fused_sscs(sde, u0.to(dtype), ts, noise, backend, official=False)
            diff = float((ours.double() - want).abs().max())
            if beta1 == 0.0:  # constant beta: the two splittings are the same up to rounding
                torch.testing.assert_close(ours.double(), got.double(), **TOL[dtype])
            else:  # measured 0.72 here (official: 3e-14 in float64): far above rounding
                assert diff > 1e-2, diff


def test_sample_official_half_steps_option(toy_score_net):
    """cf.sample plumbs the option to the fused step: the same draw for constant beta (to float32
    rounding), a different one for beta1 = 4; only sscs accepts it."""
    net = toy_score_net()()
    for beta1, same in ((0.0, True), (4.0, False)):
        sde = cf.CLD(beta1=beta1)
        score = cf.score_fn(net, sde)
        runs = [cf.sample(score, (16, 2), sde, steps=8, generator=torch.Generator().manual_seed(3),
                          sscs_official_half_steps=flag).u for flag in (False, True)]
        diff = float((runs[0] - runs[1]).abs().max())
        assert (diff < 1e-4) if same else (diff > 1e-3), (beta1, diff)
    with pytest.raises(ValueError, match="sscs_official_half_steps= is an option of"):
        cf.sample(score, (4, 2), sde, steps=4, method="em", sscs_official_half_steps=True)
    with pytest.raises(TypeError, match="sscs_official_half_steps must be a bool"):
        cf.sample(score, (4, 2), sde, steps=4, sscs_official_half_steps=1)


def test_closing_half_step_spans():
    sde = cf.CLD(beta1=4.0)
    assert sde.sscs_closing_half_step(0.8, 0.6) == pytest.approx((0.7, 0.1))
    assert sde.sscs_closing_half_step(0.8, 0.6, official_half_steps=True) == pytest.approx((0.8, 0.1))


@pytest.mark.parametrize("objective, output", [("dsm", "mixed"), ("hsm", "eps"), ("dsm", "score")])
def test_sample_with_non_default_modes_uses_their_score(toy_score_net, objective, output):
    """A DSM / non-mixed wrapper is not folded as the HSM mixed score: sampling with it equals
    sampling with the same score as a plain callable."""
    net = toy_score_net()()
    sde = cf.CLD()
    wrapped = cf.score_fn(net, sde, objective=objective, output=output)

    def plain(u, t):
        return wrapped(u, t)

    for method in ("sscs", "em"):
        a = cf.sample(wrapped, (8, 2), sde, steps=6, method=method, generator=torch.Generator().manual_seed(0)).u
        b = cf.sample(plain, (8, 2), sde, steps=6, method=method, generator=torch.Generator().manual_seed(0)).u
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_output_codes_agree():
    assert sde_mod.OUTPUT_CODES == {"mixed": 0, "eps": 1, "score": 2}
    assert sde_mod.WEIGHTING_CODES["reweightedv1"] == 2
