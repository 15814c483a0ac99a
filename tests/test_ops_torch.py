"""The public ops on the ``torch`` backend against independent float64 references.

The references here are written from the SPEC formulas directly (Gaussian log-densities,
unfused official-style SSCS/EM steps), not from the kernels' folded coefficients; the perturbation
kernel's coefficients come from tests/cld_reference.py (textbook closed forms, torch.linalg Cholesky),
never from ``cld_fast.sde``.
"""
import math

import pytest
import torch

import cld_fast as cf
from cld_fast.sde import CLD
from cld_fast.sde import kernel_params as sde_kernel_params

import cld_reference as R

B_ODD = [1, 3, 5]
SHAPES = [(3, 7), (5, 3, 5, 3), (1, 1, 1), (2, 33)]


def _ref_kernel(sde, t, objective="hsm"):
    """The perturbation kernel's fields from the independent reference (float64, t's shape)."""
    from types import SimpleNamespace

    a = R.mean_matrix(sde, t.double())
    s_xx, s_xv, s_vv = R.covariance(sde, t.double(), objective)
    l11, l21, l22 = R.cholesky(s_xx, s_xv, s_vv)
    return SimpleNamespace(a_xx=a[..., 0, 0], a_xv=a[..., 0, 1], a_vx=a[..., 1, 0], a_vv=a[..., 1, 1],
                           s_xx=s_xx, s_xv=s_xv, s_vv=s_vv, l11=l11, l21=l21, l22=l22)


def _times(b, g, dtype=torch.float64):
    return torch.rand(b, generator=g, dtype=dtype) * 0.999 + 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturb_explicit_noise_is_mean_plus_cholesky(shape, dtype, gen):
    sde = CLD()
    x0 = torch.randn(shape, generator=gen, dtype=dtype)
    t = _times(shape[0], gen, dtype)
    b, d = shape[0], x0[0].numel()
    eps = torch.randn(b, 2, d, generator=gen, dtype=dtype)
    u, noise = cf.perturb(x0, t, sde, eps=eps, backend="torch")
    assert u.shape == (shape[0], 2 * shape[1]) + shape[2:] and u.dtype == dtype
    # reference: mean from the SPEC closed form, covariance factor by a float64 Cholesky of Sigma
    k = _ref_kernel(sde, t.double())
    g_, bb = R.consts(sde)[2], R.big_b(sde, t.double())
    c = torch.exp(-2 * g_ * bb)
    x0d = x0.double().reshape(b, d)
    mean_x = (c * (1 + 2 * g_ * bb))[:, None] * x0d
    mean_v = (-c * bb)[:, None] * x0d
    sig = torch.stack([torch.stack([k.s_xx, k.s_xv], -1), torch.stack([k.s_xv, k.s_vv], -1)], -2)
    L = torch.linalg.cholesky(sig)
    e = eps.double()
    want_x = mean_x + L[:, 0, 0, None] * e[:, 0]
    want_v = mean_v + L[:, 1, 0, None] * e[:, 0] + L[:, 1, 1, None] * e[:, 1]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    u2 = u.reshape(b, 2, d).double()
    torch.testing.assert_close(u2[:, 0], want_x, **tol)
    torch.testing.assert_close(u2[:, 1], want_v, **tol)
    assert torch.equal(noise.eps_v, eps[:, 1])


@pytest.mark.parametrize("objective", ["hsm", "dsm"])
def test_perturb_moments_within_five_standard_errors(objective):
    sde = CLD()
    n, d = 40000, 3
    g = torch.Generator().manual_seed(7)
    x0 = torch.full((n, d), 0.8, dtype=torch.float64)
    t = torch.full((n,), 0.15, dtype=torch.float64)
    u, _ = cf.perturb(x0, t, sde, objective=objective, generator=g, backend="torch")
    x, v = u[:, :d].flatten(), u[:, d:].flatten()
    k = _ref_kernel(sde, t[:1], objective)
    s_xx, s_xv, s_vv = k.s_xx.item(), k.s_xv.item(), k.s_vv.item()
    if objective == "dsm":  # v0 ~ N(0, gamma M) drawn inside: add its contribution
        s0 = sde.gamma * sde.M
        s_xx += k.a_xv.item() ** 2 * s0
        s_xv += k.a_xv.item() * k.a_vv.item() * s0
        s_vv += k.a_vv.item() ** 2 * s0
    m = x.numel()
    assert abs(x.mean().item() - k.a_xx.item() * 0.8) < 5 * math.sqrt(s_xx / m)
    assert abs(v.mean().item() - k.a_vx.item() * 0.8) < 5 * math.sqrt(s_vv / m)
    assert abs(x.var().item() - s_xx) < 5 * s_xx * math.sqrt(2 / m)
    assert abs(v.var().item() - s_vv) < 5 * s_vv * math.sqrt(2 / m)
    cov = ((x - x.mean()) * (v - v.mean())).mean().item()
    assert abs(cov - s_xv) < 5 * math.sqrt((s_xx * s_vv + s_xv ** 2) / m)


def test_perturb_same_generator_seed_same_result():
    torch.manual_seed(100)  # this test draws from the global RNG
    sde = CLD()
    x0 = torch.randn(3, 5)
    t = torch.tensor([0.1, 0.5, 1.0])
    a, _ = cf.perturb(x0, t, sde, generator=torch.Generator().manual_seed(11))
    b, _ = cf.perturb(x0, t, sde, generator=torch.Generator().manual_seed(11))
    c, _ = cf.perturb(x0, t, sde, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hsm_target_is_the_true_conditional_score(gen):
    """-eps_v / l22 equals grad_v log p(u | x0) of the HSM Gaussian, by autograd of its log-density."""
    sde = CLD()
    b, d = 4, 3
    x0 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.05, 0.4, 1.0], dtype=torch.float64)
    u, noise = cf.perturb(x0, t, sde, generator=gen, backend="torch")
    k = _ref_kernel(sde, t)
    mx = k.a_xx[:, None] * x0
    mv = k.a_vx[:, None] * x0
    x = u[:, :d].clone()
    v = u[:, d:].clone().requires_grad_(True)
    det = k.s_xx * k.s_vv - k.s_xv ** 2
    dx, dv = x - mx, v - mv
    quad = (k.s_vv[:, None] * dx ** 2 - 2 * k.s_xv[:, None] * dx * dv + k.s_xx[:, None] * dv ** 2) / det[:, None]
    logp = (-0.5 * quad - 0.5 * torch.log(det)[:, None] - math.log(2 * math.pi)).sum()
    (score_v,) = torch.autograd.grad(logp, v)
    target = -noise.eps_v / k.l22[:, None]
    torch.testing.assert_close(target, score_v, rtol=1e-8, atol=1e-8)


def _official_loss(out, u, t, sde, eps_v, weighting):
    """The loss as the official code states it, from the mixed score, in float64."""
    k = _ref_kernel(sde, t.double())
    b = u.shape[0]
    v = u.double().reshape(b, 2, -1)[:, 1]
    o = out.double().reshape(b, -1)
    score = -v / k.s_vv[:, None] - o / k.l22[:, None]
    if weighting == "reweightedv2":
        per = (o + v * (k.l22 / k.s_vv)[:, None] - eps_v.double()) ** 2
    else:
        per = (score + eps_v.double() / k.l22[:, None]) ** 2 * (R.beta(sde, t.double()) * R.consts(sde)[1])[:, None]
    return per.sum(1)


@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hsm_loss_matches_official_definition(weighting, out_dtype, gen):
    sde = CLD()
    x0 = torch.randn(5, 3, 4, 3, generator=gen)
    t = _times(5, gen, torch.float32)
    u, noise = cf.perturb(x0, t, sde, generator=gen, backend="torch")
    out = torch.randn(5, 3, 4, 3, generator=gen).to(out_dtype)
    got = cf.hsm_loss(out, u, t, sde, noise, weighting=weighting, reduction="none", backend="torch")
    want = _official_loss(out, u, t, sde, noise.eps_v, weighting)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if out_dtype == torch.float32 else 1e-2, atol=1e-4)
    mean = cf.hsm_loss(out, u, t, sde, noise, weighting=weighting, backend="torch")
    torch.testing.assert_close(mean, got.mean())


@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood"])
def test_hsm_loss_gradcheck_float64(weighting, gen):
    sde = CLD()
    x0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = _times(3, gen)
    u, noise = cf.perturb(x0, t, sde, generator=gen, backend="torch")
    out = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    u = u.requires_grad_(True)
    fn = lambda o, uu: cf.hsm_loss(o, uu, t, sde, noise, weighting=weighting, reduction="none", backend="torch")
    assert torch.autograd.gradcheck(fn, (out, u))


def test_hsm_loss_seed_mode_regenerates_eps_v(gen):
    """A seeded perturb (as triton/cuda draw it) and its loss agree with the explicit-noise reference."""
    from cld_fast.backends import torch_backend
    sde = CLD()
    b, d = 3, 11
    x0 = torch.randn(b, d, generator=gen)
    t = _times(b, gen, torch.float32)
    seed = torch.tensor([123456789], dtype=torch.int64)
    u = torch.empty(b, 2, d)
    torch_backend.op("perturb")(x0, None, t, sde_kernel_params(sde, "cpu"), 0, None, seed, u)
    z = cf.philox.philox_normals(b * d, 123456789, 0, cf.philox.TAG_PERTURB)
    eps = torch.stack([z[0].view(b, d), z[1].view(b, d)], 1)
    u_ref, noise_ref = cf.perturb(x0, t, sde, eps=eps, backend="torch")
    torch.testing.assert_close(u.view(b, 2 * d), u_ref)
    seeded = cf.ops.Noise(eps=None, seed=seed, backend="torch", objective="hsm", numel=b * d)
    out = torch.randn(b, d, generator=gen)
    torch.testing.assert_close(cf.hsm_loss(out, u_ref, t, sde, seeded, reduction="none"),
                               cf.hsm_loss(out, u_ref, t, sde, noise_ref, reduction="none"))


def test_mixed_score_formula(gen):
    sde = CLD()
    u = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    t = _times(3, gen)
    k = _ref_kernel(sde, t)
    want = -u[:, 2:] / k.s_vv[:, None, None] - out / k.l22[:, None, None]
    torch.testing.assert_close(cf.mixed_score(out, u, t, sde, backend="torch"), want, rtol=1e-12, atol=1e-12)


def _half_ref(sde, x, v, t, h, ex, ev):
    """Official-style analytic half step in float64, straight from the SPEC formulas."""
    g = sde.g
    Bd = float(sde.beta_int(t - h) - sde.beta_int(t))
    kk = math.exp(2 * g * Bd)
    nx = kk * ((1 - 2 * g * Bd) * x + 4 * g ** 2 * Bd * v)
    nv = kk * (-Bd * x + (1 + 2 * g * Bd) * v)
    k4 = math.exp(4 * g * Bd)
    sxx = k4 * (1 / k4 - 1 + 4 * g * Bd - 8 * g ** 2 * Bd ** 2)
    sxv = -k4 * 4 * g * Bd ** 2
    svv = k4 * (-sde.Gamma ** 2 * (1 - 1 / k4) / 4 - sde.Gamma * Bd - 2 * Bd ** 2)
    l11 = math.sqrt(sxx)
    l21 = sxv / l11
    l22 = math.sqrt(svv - l21 ** 2)
    return nx + l11 * ex, nv + l21 * ex + l22 * ev


def test_sscs_step_equals_unfused_official_sequence(gen):
    """half step, score Euler step, half step (and the next opening half step) as the official code does."""
    sde = CLD(beta0=3.0, beta1=0.0)
    b, c = 3, 5
    ts = torch.tensor([1.0, 0.6, 0.25], dtype=torch.float64)
    u = torch.randn(b, 2 * c, generator=gen, dtype=torch.float64)
    x, v = u[:, :c].clone(), u[:, c:].clone()
    z = torch.randn(3, 4, b, c, generator=gen, dtype=torch.float64)
    ys = torch.randn(2, b, c, generator=gen, dtype=torch.float64)
    cf.half_step_(u, [1.0, 0.8], sde, step=0, eps=torch.stack([z[0, 0], z[0, 1]], 1), backend="torch")
    x, v = _half_ref(sde, x, v, 1.0, 0.2, z[0, 0], z[0, 1])
    torch.testing.assert_close(u, torch.cat([x, v], 1), rtol=1e-12, atol=1e-12)
    for i in range(2):
        t_i, h = ts[i].item(), (ts[i] - ts[i + 1]).item()
        cf.sscs_step_(u, ys[i], ts, sde, step=i, eps=torch.stack([z[i + 1, j] for j in range(4)], 1), backend="torch")
        v = v + 2 * sde.Gamma * (ys[i] + sde.m_inv * v) * sde.beta(t_i).item() * h
        x, v = _half_ref(sde, x, v, t_i - h / 2, h / 2, z[i + 1, 0], z[i + 1, 1])
        if i == 0:
            h2 = (ts[1] - ts[2]).item()
            x, v = _half_ref(sde, x, v, ts[1].item(), h2 / 2, z[i + 1, 2], z[i + 1, 3])
        torch.testing.assert_close(u, torch.cat([x, v], 1), rtol=1e-12, atol=1e-12)


def test_em_step_and_pf_drift_match_reverse_sde(gen):
    sde = CLD(beta0=2.0, beta1=2.0)
    b, c = 3, 4
    u = torch.randn(b, 2 * c, generator=gen, dtype=torch.float64)
    score = torch.randn(b, c, generator=gen, dtype=torch.float64)
    z = torch.randn(b, c, generator=gen, dtype=torch.float64)
    t, h = 0.7, 0.05
    x, v = u[:, :c].clone(), u[:, c:].clone()
    beta = 2.0 + 2.0 * t
    G, mi = sde.Gamma, sde.m_inv
    # reverse SDE: du = [f - G G^T score] dt + G dW, stepped backwards by h
    fx, fv = mi * v * beta, (-x - G * mi * v) * beta
    want_x = x - fx * h
    want_v = v - (fv - 2 * G * beta * score) * h + math.sqrt(2 * G * beta * h) * z
    cf.em_step_(u, score, [0.9, t, t - h], sde, step=1, eps=z, backend="torch")
    torch.testing.assert_close(u, torch.cat([want_x, want_v], 1), rtol=1e-12, atol=1e-12)
    u0 = torch.cat([x, v], 1)
    got = cf.pf_drift(u0, score, t, sde, backend="torch")
    want = torch.cat([fx, fv - G * beta * score], 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_step_ops_seed_mode_reproducible_and_step_dependent():
    sde = CLD()
    ts = torch.linspace(1.0, 0.1, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    u0 = torch.randn(2, 6, generator=g)
    y = torch.randn(2, 3, generator=g)
    runs = []
    for step in (1, 1, 0):
        u = u0.clone()
        cf.sscs_step_(u, y, ts, sde, step=torch.tensor([step]), seed=99, backend="torch")
        runs.append(u)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_inplace_ops_handle_non_contiguous_state(gen):
    sde = CLD()
    ts = torch.tensor([1.0, 0.5], dtype=torch.float64)
    u = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    u_cl = u.clone().to(memory_format=torch.channels_last)
    y = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 18, generator=gen, dtype=torch.float64)
    cf.sscs_step_(u, y, ts, sde, step=0, eps=eps, backend="torch")
    cf.sscs_step_(u_cl, y, ts, sde, step=0, eps=eps, backend="torch")
    assert u_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(u_cl, u, rtol=0, atol=0)
    x0 = torch.randn(5, 3, generator=gen).t()  # non-contiguous (3, 5)
    t = torch.full((3,), 0.3)
    e = torch.randn(3, 2, 5, generator=gen)
    a, _ = cf.perturb(x0, t, sde, eps=e, backend="torch")
    b, _ = cf.perturb(x0.contiguous(), t, sde, eps=e, backend="torch")
    assert torch.equal(a, b)


def test_value_checks_can_be_switched_off():
    torch.manual_seed(101)  # this test draws from the global RNG
    sde = CLD()
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cf.perturb(x0, torch.tensor([0.5, 1.5]), sde)
    with cf.value_checks(False):
        cf.perturb(x0, torch.tensor([0.5, 0.9]), sde)


def test_perturb_seed_is_the_philox_contract_and_checked():
    """A seeded perturb equals the explicit-noise one with the Philox normals of that seed."""
    sde = CLD()
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(5, 4, generator=g)
    t = _times(5, g, torch.float32)
    seed = torch.tensor([424242], dtype=torch.int64)
    u, noise = cf.perturb(x0, t, sde, seed=seed, backend="torch")
    z = cf.philox.philox_normals(20, 424242, 0, cf.philox.TAG_PERTURB)
    eps = torch.stack([z[0].view(5, 4), z[1].view(5, 4)], 1)
    u_ref, _ = cf.perturb(x0, t, sde, eps=eps, backend="torch")
    torch.testing.assert_close(u, u_ref)
    assert noise.seed is not None and noise.eps is None
    with pytest.raises(ValueError, match="either eps or seed"):
        cf.perturb(x0, t, sde, eps=eps, seed=seed)
    with pytest.raises(TypeError, match="seed must be"):
        cf.perturb(x0, t, sde, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="objective must be one of"):
        cf.perturb(x0, t, sde, objective="bogus")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mean_reduction_is_the_mean_and_its_gradient(backend):
    if backend not in cf.backends():
        pytest.skip(f"{backend} backend not built")
    sde = CLD()
    b = 6
    g = torch.Generator().manual_seed(2)
    t = _times(b, g, torch.float32)
    x0 = torch.randn(b, 3, 5, generator=g)
    u, noise = cf.perturb(x0, t, sde, seed=torch.tensor([77]), backend=backend)
    out1 = torch.randn(b, 3, 5, generator=g, requires_grad=True)
    out2 = out1.detach().clone().requires_grad_(True)
    per_sample = cf.hsm_loss(out1, u, t, sde, noise, reduction="none", backend=backend)
    m = cf.hsm_loss(out2, u, t, sde, noise, reduction="mean", backend=backend)
    torch.testing.assert_close(per_sample.mean(), m, rtol=1e-5, atol=1e-6)
    per_sample.mean().backward()
    m.backward()
    torch.testing.assert_close(out1.grad, out2.grad, rtol=1e-5, atol=1e-7)
