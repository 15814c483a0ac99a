"""Sampler steps and samplers against the independent float64 reference of tests/cld_reference.py.

beta1 != 0 throughout: with a constant beta every half step over the same length of time has the same
coefficients, so a half step taken over the wrong interval is invisible.
Unit level: every backend's half_step_, sscs_step_, em_step_ and pf_drift. Sampler level: cf.sample is
replayed call by call (the score function records the state it is called with) and each recorded
state must follow from the previous one by the reference step with the sampler's Philox noise; the
final denoising step of every method is checked against a hand-written noise-free reverse step.
"""
import math

import pytest
import torch

import cld_fast as cf
from cld_fast import philox

import cld_reference as R

SDE = cf.CLD(beta0=3.0, beta1=4.0)
TS = [1.0, 0.7, 0.45, 0.2, 0.05]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _backends(dtype):
    out = []
    for name in cf.backends():
        if name == "cuda":
            continue
        if cf.backends.get(name).supports(torch.device("cpu"), dtype):
            out.append(name)
    return out


def _cases():
    for dtype in (torch.float32, torch.float64):
        for name in ("torch", "cpu", "triton"):
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


def _skip(backend, dtype):
    if backend not in _backends(dtype):
        pytest.skip(f"{backend} not available for {dtype}")


def _inputs(dtype, b=3, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, 2 * d, generator=g, dtype=torch.float64)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    z = torch.randn(b, 4, d, generator=g, dtype=torch.float64)
    return u.to(dtype), y.to(dtype), z.to(dtype)


def _xv(u):
    d = u.shape[1] // 2
    return u[:, :d].double(), u[:, d:].double()


def _close(got, want_x, want_v, dtype):
    torch.testing.assert_close(got.double(), torch.cat([want_x, want_v], 1), **TOL[dtype])


@pytest.mark.parametrize("backend, dtype", list(_cases()))
@pytest.mark.parametrize("step", [0, 2, 3])
def test_half_and_sscs_step_with_time_dependent_beta(backend, dtype, step):
    _skip(backend, dtype)
    u, y, z = _inputs(dtype, seed=step)
    x, v = _xv(u)
    t0, t1 = TS[step], TS[step + 1]
    ts = torch.tensor(TS, dtype=torch.float64)

    w = u.clone()
    cf.half_step_(w, ts, SDE, step=step, eps=z[:, :2].contiguous(), backend=backend)
    _close(w, *R.half_step(SDE, t0, t1, x, v, z[:, 0].double(), z[:, 1].double()), dtype)

    w = u.clone()
    cf.sscs_step_(w, y, ts, SDE, step=step, eps=z, backend=backend)
    nx, nv = R.sscs_step(SDE, t0, t1, x, v, y.double(), (z[:, 0].double(), z[:, 1].double()))
    if step + 2 < len(TS):  # the opening half step of the next step, fused in
        t2 = TS[step + 2]
        nx, nv = R.half_step(SDE, t1, t1 - 0.5 * (t1 - t2), nx, nv, z[:, 2].double(), z[:, 3].double())
    _close(w, nx, nv, dtype)

    # mixed: y is the network output of the mixed score -v / s_vv - out / l22 (HSM covariance at t0)
    s_xx, s_xv, s_vv = R.covariance(SDE, t0)
    _, _, l22 = R.cholesky(s_xx, s_xv, s_vv)
    score = -v / s_vv - y.double() / l22
    w = u.clone()
    cf.sscs_step_(w, y, ts, SDE, step=step, mixed=True, eps=z, backend=backend)
    nx, nv = R.sscs_step(SDE, t0, t1, x, v, score, (z[:, 0].double(), z[:, 1].double()))
    if step + 2 < len(TS):
        t2 = TS[step + 2]
        nx, nv = R.half_step(SDE, t1, t1 - 0.5 * (t1 - t2), nx, nv, z[:, 2].double(), z[:, 3].double())
    _close(w, nx, nv, dtype)


@pytest.mark.parametrize("backend, dtype", list(_cases()))
def test_em_denoise_and_pf_drift_with_time_dependent_beta(backend, dtype):
    _skip(backend, dtype)
    u, y, z = _inputs(dtype, seed=5)
    x, v = _xv(u)
    ts = torch.tensor(TS, dtype=torch.float64)
    for step in (0, 3):
        t0, h = TS[step], TS[step] - TS[step + 1]
        w = u.clone()
        cf.em_step_(w, y, ts, SDE, step=step, eps=z[:, 0].contiguous(), backend=backend)
        _close(w, *R.em_step(SDE, t0, h, x, v, y.double(), z[:, 0].double()), dtype)
        w = u.clone()
        cf.em_step_(w, y, ts, SDE, step=step, denoise=True, backend=backend)
        _close(w, *R.em_step(SDE, t0, h, x, v, y.double()), dtype)
        drift = cf.pf_drift(u, y, TS[step], SDE, backend=backend)
        dx, dv = R.reverse_drift(SDE, TS[step], x, v, y.double(), prob_flow=True)
        _close(drift, -dx, -dv, dtype)  # pf_drift is du/dt in forward time


# ---- sampler level: replay cf.sample call by call ------------------------------------------------------
class Recorder:
    """A score function that records (u, t, score) of every call (float64 copies)."""

    def __init__(self, score):
        self.score = score
        self.calls = []

    def __call__(self, u, t):
        y = self.score(u, t)
        self.calls.append((u.detach().double().clone(), float(t[0]), y.detach().double().clone()))
        return y


def _gaussian_score(p, var0=0.3):
    """Exact velocity score of the CLD marginal for data x0 ~ N(0, var0 I): a linear function of u."""

    def score(u, t):
        d = u.shape[1] // 2
        x, v = u[:, :d].double(), u[:, d:].double()
        a = R.mean_matrix(p, t.double())
        s_xx, s_xv, s_vv = R.covariance(p, t.double())
        c_xx = a[:, 0, 0] ** 2 * var0 + s_xx
        c_xv = a[:, 0, 0] * a[:, 1, 0] * var0 + s_xv
        c_vv = a[:, 1, 0] ** 2 * var0 + s_vv
        det = c_xx * c_vv - c_xv ** 2
        sv = (c_xv[:, None] * x - c_xx[:, None] * v) / det[:, None]
        return sv.to(u.dtype)

    return score


def _quadratic_grid(n, eps):
    s = [(1 - eps) * i / n for i in range(n + 1)]
    s = [(1 - eps) * (1 - (si / (1 - eps)) ** 2) for si in reversed(s)]
    return [1.0 - si for si in s]


def _linear_grid(n, eps):
    return [1.0 - (1 - eps) * i / n for i in range(n + 1)]


def _prior_and_seed(shape, seed, m):
    """The draws cf.sample makes from its generator: the prior (x ~ N(0, I), v ~ N(0, M I)), then a Philox seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((shape[0], 2 * shape[1]), generator=g, dtype=torch.float64)
    u[:, shape[1]:] *= math.sqrt(m)
    return u, torch.randint(0, philox.SEED_BOUND, (1,), generator=g)


def _noise(seed, step, tag, b, d):
    z = philox.philox_normals(b * d, seed, step, tag).double()
    return [z[j].view(b, d) for j in range(4)]


B, D, EPS = 64, 3, 1e-3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sscs_sampler_replays_reference_steps(backend):
    if backend not in cf.backends():
        pytest.skip(f"{backend} not available")
    steps = 9
    rec = Recorder(_gaussian_score(SDE))
    res = cf.sample(rec, (B, D), SDE, steps=steps, method="sscs", dtype=torch.float64, backend=backend,
                    generator=torch.Generator().manual_seed(4))
    n = steps - 1
    # in-kernel normals are float32 (log, cos, sin of the backend's libm): 1e-10 only for the torch backend
    tol = dict(rtol=1e-10, atol=1e-10) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    ts = _quadratic_grid(n, EPS)
    assert [c[1] for c in rec.calls] == pytest.approx(ts[:-1] + [EPS], rel=1e-12)
    u0, seed = _prior_and_seed((B, D), 4, SDE.M)
    z = _noise(seed, 0, philox.TAG_HALF_STEP, B, D)
    x, v = R.half_step(SDE, ts[0], ts[0] - 0.5 * (ts[0] - ts[1]), u0[:, :D], u0[:, D:], z[0], z[1])
    torch.testing.assert_close(rec.calls[0][0], torch.cat([x, v], 1), **tol)
    for i in range(n):
        u, t, y = rec.calls[i]
        z = _noise(seed, i, philox.TAG_SSCS, B, D)
        x, v = R.sscs_step(SDE, ts[i], ts[i + 1], u[:, :D], u[:, D:], y, (z[0], z[1]))
        if i + 1 < n:
            t1, t2 = ts[i + 1], ts[i + 2]
            x, v = R.half_step(SDE, t1, t1 - 0.5 * (t1 - t2), x, v, z[2], z[3])
        torch.testing.assert_close(rec.calls[i + 1][0], torch.cat([x, v], 1), **tol, msg=f"state after step {i}")
    u, t, y = rec.calls[-1]
    x, v = R.em_step(SDE, EPS, EPS, u[:, :D], u[:, D:], y)  # the noise-free denoising step
    torch.testing.assert_close(res.u, torch.cat([x, v], 1), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(res.u, u, rtol=1e-3, atol=1e-3)  # the denoising step moves the state


def test_em_sampler_replays_reference_steps():
    steps = 7
    rec = Recorder(_gaussian_score(SDE))
    res = cf.sample(rec, (B, D), SDE, steps=steps, method="em", dtype=torch.float64, backend="torch",
                    generator=torch.Generator().manual_seed(5))
    n = steps - 1
    ts = _linear_grid(n, EPS)
    u0, seed = _prior_and_seed((B, D), 5, SDE.M)
    torch.testing.assert_close(rec.calls[0][0], u0, rtol=0, atol=0)
    for i in range(n):
        u, t, y = rec.calls[i]
        z = _noise(seed, i, philox.TAG_AFFINE, B, D)
        x, v = R.em_step(SDE, ts[i], ts[i] - ts[i + 1], u[:, :D], u[:, D:], y, z[0])
        torch.testing.assert_close(rec.calls[i + 1][0], torch.cat([x, v], 1), rtol=1e-10, atol=1e-10)
    u, t, y = rec.calls[-1]
    x, v = R.em_step(SDE, EPS, EPS, u[:, :D], u[:, D:], y)
    torch.testing.assert_close(res.u, torch.cat([x, v], 1), rtol=1e-10, atol=1e-10)


def test_ode_and_gddim_final_denoising_steps():
    """ODE: the last evaluation at t = eps feeds a noise-free EM step; gDDIM: x <- E[x0 | u] (Tweedie)."""
    rec = Recorder(_gaussian_score(SDE))
    res = cf.sample(rec, (B, D), SDE, method="ode", dtype=torch.float64, rtol=1e-4, atol=1e-4,
                    generator=torch.Generator().manual_seed(6))
    u, t, y = rec.calls[-1]
    assert t == pytest.approx(EPS)
    x, v = R.em_step(SDE, EPS, EPS, u[:, :D], u[:, D:], y)
    torch.testing.assert_close(res.u, torch.cat([x, v], 1), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(res.u, u, rtol=1e-3, atol=1e-3)

    rec = Recorder(_gaussian_score(SDE))
    res = cf.sample(rec, (B, D), SDE, steps=6, method="gddim", dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    u, t, y = rec.calls[-1]
    assert t == pytest.approx(EPS)
    x0 = R.posterior_mean_x0(SDE, EPS, u[:, :D], u[:, D:], y)
    torch.testing.assert_close(res.u, torch.cat([x0, u[:, D:]], 1), rtol=1e-8, atol=1e-8)


# ---- VP-SDE --------------------------------------------------------------------------------------------
def test_vpsde_reverse_coefficients_are_the_reverse_sde():
    vp = cf.VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([1e-3, 0.3, 0.8, 1.0], dtype=torch.float64)
    h = torch.tensor([1e-3, 0.05, 0.1, 0.02], dtype=torch.float64)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    for kind in ("em", "denoise"):
        c = vp.reverse_coefficients(t, h, kind)
        z = one if kind == "em" else None
        torch.testing.assert_close(c[:, 0], R.vp_em_step(0.1, 20.0, t, h, one, zero), rtol=1e-14, atol=0)
        torch.testing.assert_close(c[:, 1], R.vp_em_step(0.1, 20.0, t, h, zero, one), rtol=1e-14, atol=0)
        noise = R.vp_em_step(0.1, 20.0, t, h, zero, zero, z) if z is not None else zero
        torch.testing.assert_close(c[:, 2], noise, rtol=1e-14, atol=0)
    c = vp.reverse_coefficients(t, h, "pf_drift")
    torch.testing.assert_close(c[:, 0], R.vp_pf_drift(0.1, 20.0, t, one, zero), rtol=1e-14, atol=0)
    torch.testing.assert_close(c[:, 1], R.vp_pf_drift(0.1, 20.0, t, zero, one), rtol=1e-14, atol=0)
    assert torch.all(c[:, 2] == 0)


@pytest.mark.parametrize("method", ["em", "ode"])
def test_vpsde_sampler_replays_reference_steps(method):
    vp = cf.VPSDE()
    var0 = 0.3

    def exact(x, t):
        b = 0.1 * t.double() + 0.5 * 19.9 * t.double() ** 2
        var = torch.exp(-b) * var0 + (1 - torch.exp(-b))
        return (-x.double() / var[:, None]).to(x.dtype)

    rec = Recorder(exact)
    kw = dict(steps=6) if method == "em" else dict(rtol=1e-4, atol=1e-4)
    res = cf.sample(rec, (B, D), vp, method=method, dtype=torch.float64, generator=torch.Generator().manual_seed(8), **kw)
    if method == "em":
        n = 5
        ts = _linear_grid(n, EPS)
        g = torch.Generator().manual_seed(8)
        x0 = torch.randn((B, D), generator=g, dtype=torch.float64)
        seed = torch.randint(0, philox.SEED_BOUND, (1,), generator=g)
        torch.testing.assert_close(rec.calls[0][0], x0, rtol=0, atol=0)
        for i in range(n):
            x, t, s = rec.calls[i]
            z = _noise(seed, i, philox.TAG_AFFINE, B, D)[0]
            want = R.vp_em_step(0.1, 20.0, ts[i], ts[i] - ts[i + 1], x, s, z)
            torch.testing.assert_close(rec.calls[i + 1][0], want, rtol=1e-10, atol=1e-10)
    x, t, s = rec.calls[-1]
    assert t == pytest.approx(EPS)
    torch.testing.assert_close(res.u, R.vp_em_step(0.1, 20.0, EPS, EPS, x, s), rtol=1e-10, atol=1e-10)
