"""cld_fast.kdiffusion: k-diffusion-style functions are thin wrappers over cf.sample(u=, timesteps=)."""
import functools

import pytest
import torch

import cld_fast as cf
from cld_fast import kdiffusion as kd
from cld_fast.sde import time_grid
from cld_fast.toy import GaussianMixture2D

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (32, 2)
TS = time_grid(6, 1e-3, "quadratic")


@pytest.fixture(scope="module")
def score(sde):
    return GaussianMixture2D().cld_score(sde)


def _start(sde, seed=0, dtype=torch.float32):
    return sde.prior_sampling(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("fn,method,ts", [(kd.sample_sscs, "sscs", TS), (kd.sample_em, "em", TS),
                                          (kd.sample_gddim, "gddim", TS), (kd.sample_ode, "ode", [1.0, 1e-3])])
def test_same_samples_as_cf_sample(sde, score, fn, method, ts):
    u0 = _start(sde)
    stochastic = method in ("sscs", "em")
    extra = dict(generator=torch.Generator().manual_seed(7)) if stochastic else {}
    got = fn(score, u0, ts, sde=sde, disable=True, **extra)
    extra = dict(generator=torch.Generator().manual_seed(7)) if stochastic else {}
    ref = cf.sample(score, None, sde, method=method, u=u0, timesteps=ts, **extra)
    assert torch.equal(got, ref.u)
    assert got.shape == (SHAPE[0], 2 * SHAPE[1]) and got.dtype == u0.dtype


def test_float64_state_stays_float64(sde, score):
    u0 = _start(sde, dtype=torch.float64)
    assert kd.sample_gddim(score, u0, TS, sde=sde, disable=True).dtype == torch.float64


def test_extra_args_reach_the_model(sde, score):
    calls = []

    def model(u, t, scale=1.0):
        calls.append(scale)
        return scale * score(u, t)

    u0 = _start(sde)
    got = kd.sample_gddim(model, u0, TS, extra_args={"scale": 0.5}, sde=sde, disable=True)
    ref = kd.sample_gddim(lambda u, t: 0.5 * score(u, t), u0, TS, sde=sde, disable=True)
    assert calls == [0.5] * len(TS) and torch.equal(got, ref)
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        kd.sample_gddim(model, u0, TS, extra_args=[0.5], sde=sde, disable=True)


def test_score_fn_wrapper_with_extra_args_keeps_the_fused_path(sde, toy_score_net):
    Model = toy_score_net()

    class Labelled(Model):
        def forward(self, u, t, shift=0.0):
            return super().forward(u, t) + shift

    net = Labelled().eval()
    u0 = _start(sde)
    got = kd.sample_sscs(cf.score_fn(net, sde), u0, TS, extra_args={"shift": 0.25}, disable=True,
                         generator=torch.Generator().manual_seed(2))  # sde taken from the wrapper
    wrapped = cf.score_fn(functools.partial(net, shift=0.25), sde)
    ref = cf.sample(wrapped, None, sde, u=u0, timesteps=TS, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, ref.u)


def test_callback_dict_and_progress_bar(sde, score, capsys):
    seen = []
    kd.sample_sscs(score, _start(sde), TS, callback=lambda d: seen.append((d["i"], d["t"], sorted(d))), sde=sde,
                   disable=False, generator=torch.Generator().manual_seed(0))
    assert [s[0] for s in seen] == list(range(len(TS)))
    assert [s[1] for s in seen] == pytest.approx(TS.tolist(), rel=1e-6)
    assert all(s[2] == ["denoised", "i", "sigma", "t", "x"] for s in seen)
    assert "sscs" in capsys.readouterr().err  # the tqdm bar
    kd.sample_sscs(score, _start(sde), TS, sde=sde, disable=True, generator=torch.Generator().manual_seed(0))
    assert capsys.readouterr().err == ""


def test_bad_input(sde, score, toy_score_net):
    u0 = _start(sde)
    with pytest.raises(TypeError, match="sde= .* is required"):
        kd.sample_sscs(score, u0, TS, disable=True)
    with pytest.raises(TypeError, match="raw network"):
        kd.sample_sscs(toy_score_net()(), u0, TS, sde=sde, disable=True)
    with pytest.raises(TypeError, match="float32 or float64"):
        kd.sample_sscs(score, u0.half(), TS, sde=sde, disable=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        kd.sample_em(score, u0, TS.flip(0), sde=sde, disable=True)
    with pytest.raises(ValueError, match=r"\[t_start, t_end\]"):
        kd.sample_ode(score, u0, TS, sde=sde, disable=True)


def test_exported_from_the_package():
    assert cf.kdiffusion.sample_sscs is kd.sample_sscs


def test_callback_denoised_is_the_tweedie_estimate_and_sigma_the_x_std(sde):
    """Point-mass data x0 = 0.3: E[x0 | u] = 0.3 exactly for every state, so ``denoised`` must be 0.3
    (with the exact score, through a plain callable and through a mixed-score network wrapper)."""
    x0 = 0.3

    def exact(u, t):  # grad_v log N(u; a x0, Sigma) for v0 marginalised
        k = sde.perturbation_kernel(t.double(), "hsm")
        x, v = u.double().chunk(2, dim=1)
        rx, rv = x - k.a_xx[:, None] * x0, v - k.a_vx[:, None] * x0
        det = k.s_xx * k.s_vv - k.s_xv ** 2
        return ((k.s_xv[:, None] * rx - k.s_xx[:, None] * rv) / det[:, None]).to(u.dtype)

    seen = []
    kd.sample_em(exact, _start(sde, dtype=torch.float64), TS, sde=sde, disable=True, callback=seen.append,
                 generator=torch.Generator().manual_seed(1))
    for info in seen:
        torch.testing.assert_close(info["denoised"], torch.full_like(info["denoised"], x0), rtol=0, atol=1e-6)
        want = float(sde.perturbation_kernel(torch.tensor([info["t"]], dtype=torch.float64)).l11[0])
        assert info["sigma"] == pytest.approx(want, rel=1e-12)

    class MixedNet(torch.nn.Module):  # out such that -v/s_vv - out/l22 is the exact score
        def forward(self, u, t):
            k = sde.perturbation_kernel(t.double(), "hsm")
            v = u.double().chunk(2, dim=1)[1]
            return (-(exact(u.double(), t) + v / k.s_vv[:, None]) * k.l22[:, None]).float()

    seen.clear()
    kd.sample_em(cf.score_fn(MixedNet(), sde), _start(sde), TS, disable=True, callback=seen.append,
                 generator=torch.Generator().manual_seed(1))
    for info in seen:
        torch.testing.assert_close(info["denoised"], torch.full_like(info["denoised"], x0), rtol=0, atol=2e-3)


def test_extra_args_keep_the_wrappers_output_convention(sde, toy_score_net):
    """An output="eps" network stays one when extra_args rebuild the wrapper."""
    Model = toy_score_net()

    class Labelled(Model):
        def forward(self, u, t, shift=0.0):
            return super().forward(u, t) + shift

    net = Labelled().eval()
    u0 = _start(sde)
    got = kd.sample_em(cf.score_fn(net, sde, output="eps"), u0, TS, extra_args={"shift": 0.25}, disable=True,
                       generator=torch.Generator().manual_seed(2))
    ref = cf.sample(cf.score_fn(functools.partial(net, shift=0.25), sde, output="eps"), None, sde, method="em",
                    u=u0, timesteps=TS, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, ref.u)


def test_every_wrapper_takes_x_and_a_generator_and_its_sampler_options(sde, score):
    u0 = _start(sde)
    for fn in (kd.sample_sscs, kd.sample_em, kd.sample_gddim):
        fn(score, x=u0, ts=TS, sde=sde, disable=True, generator=torch.Generator().manual_seed(0))
    kd.sample_ode(score, u0, [1.0, 1e-3], sde=sde, disable=True, generator=torch.Generator(), rtol=1e-3, atol=1e-3)
    a = kd.sample_gddim(score, u0, TS, sde=sde, disable=True, order=3, predict="x0")
    b = cf.sample(score, None, sde, method="gddim", u=u0, timesteps=TS, order=3, predict="x0")
    assert torch.equal(a, b.u)
    with pytest.raises(ValueError, match="order"):
        kd.sample_sscs(score, u0, TS, sde=sde, disable=True, order=2)


@pytest.mark.parametrize("fn,method", [(kd.sample_sscs, "sscs"), (kd.sample_em, "em"), (kd.sample_gddim, "gddim")])
def test_condition_and_guidance_are_cf_samples(sde, fn, method):
    gm = GaussianMixture2D()
    cscore = gm.cld_class_score(sde)
    labels = torch.arange(SHAPE[0]) % cscore.num_classes
    x_obs, mask = torch.full((SHAPE[0], 2), 0.7), torch.tensor([[True, False]])
    for kw in (dict(guidance=cf.ClassifierFree(labels, 1.5)), dict(condition=cf.Inpaint(x_obs, mask))):
        u0 = _start(sde, seed=3)
        got = fn(cscore, u0, TS, sde=sde, disable=True, generator=torch.Generator().manual_seed(7), **kw)
        ref = cf.sample(cscore, None, sde, method=method, u=u0, timesteps=TS,
                        generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(got, ref.u)
    assert torch.equal(got[:, 0], x_obs[:, 0])


def test_callback_denoised_follows_the_guided_score(sde):
    """With classifier-free guidance the callback's ``denoised`` is the Tweedie estimate of the combined
    score (1 + w) s(u, t, y) - w s(u, t, none) at the step's state, one row per sample."""
    gm = GaussianMixture2D()
    cscore, w = gm.cld_class_score(sde), 2.0
    labels = torch.arange(SHAPE[0]) % cscore.num_classes
    none = torch.full_like(labels, cscore.num_classes)
    seen, states = [], []

    def record(info):
        seen.append(info)

    def scored(u, t, class_labels=None):
        states.append((u[:SHAPE[0]].clone(), t[:SHAPE[0]].clone()))
        return cscore(u, t, class_labels=class_labels)

    scored.num_classes = cscore.num_classes
    kd.sample_em(scored, _start(sde), TS, sde=sde, disable=True, callback=record,
                 generator=torch.Generator().manual_seed(1), guidance=cf.ClassifierFree(labels, w))
    assert len(seen) == len(states) == len(TS)
    for info, (u, t) in zip(seen, states):
        y = (1 + w) * cscore(u, t, class_labels=labels) - w * cscore(u, t, class_labels=none)
        kc = sde.tweedie_coefficients(float(info["t"]), False).to(u.dtype)
        x, v = u.chunk(2, dim=1)
        assert info["denoised"].shape == (SHAPE[0], SHAPE[1])
        want = kc[0] * x + kc[1] * v + kc[2] * y  # float32 rounding of terms up to |kc[2] y|
        scale = float((kc[2] * y).abs().max()) + 1.0
        torch.testing.assert_close(info["denoised"], want, rtol=0, atol=1e-5 * scale)


def test_callback_denoised_follows_the_classifier_guided_score(sde):
    from cld_fast.guidance import classifier_gradient

    gm = GaussianMixture2D()
    score, clf, scale = gm.cld_score(sde), gm.cld_classifier(sde), 2.0
    labels = torch.arange(SHAPE[0]) % gm.cld_class_score(sde).num_classes
    seen, states = [], []

    def scored(u, t):
        states.append((u.clone(), t.clone()))
        return score(u, t)

    kd.sample_em(scored, _start(sde), TS, sde=sde, disable=True, callback=seen.append,
                 generator=torch.Generator().manual_seed(1), guidance=cf.ClassifierGuidance(clf, labels, scale))
    for info, (u, t) in zip(seen, states):
        y = score(u, t) + scale * classifier_gradient(clf, labels, u, t, sde)
        kc = sde.tweedie_coefficients(float(info["t"]), False).to(u.dtype)
        x, v = u.chunk(2, dim=1)
        want = kc[0] * x + kc[1] * v + kc[2] * y
        scale_y = float((kc[2] * y).abs().max()) + 1.0
        torch.testing.assert_close(info["denoised"], want, rtol=0, atol=1e-5 * scale_y)
