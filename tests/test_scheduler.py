"""cf.SSCSScheduler: a user's own loop gives cf.sample's samples bit for bit."""
import pytest
import torch

import cld_fast as cf
from cld_fast.sde import time_grid
from cld_fast.toy import GaussianMixture2D

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def score(sde):
    return GaussianMixture2D().cld_score(sde)


def _loop(sched, score_fn, shape, seed):
    u = sched.init_noise(shape, torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        out = score_fn(u, t.expand(shape[0]))
        u = sched.step(out, t, u)
    return u


@pytest.mark.parametrize("steps,denoise,striding", [(20, True, "linear"), (9, False, "quadratic"), (2, True, "linear"),
                                                    (1, True, "linear"), (1, False, "linear")])
def test_loop_equals_sample_bit_for_bit(sde, score, steps, denoise, striding):
    shape = (256, 2)
    res = cf.sample(score, shape, sde, steps=steps, denoise=denoise, striding=striding,
                    generator=torch.Generator().manual_seed(3))
    sched = cf.SSCSScheduler(sde, steps=steps, denoise=denoise, striding=striding)
    assert len(sched.timesteps) == steps == sched.num_inference_steps
    u = _loop(sched, score, shape, 3)
    assert torch.equal(u, res.u)


def test_timesteps_are_the_score_times(sde, score):
    sched = cf.SSCSScheduler(sde, steps=7, striding="quadratic", eps=2e-3)
    calls = []
    cf.sample(score, (8, 2), sde, steps=7, striding="quadratic", eps=2e-3, callback=lambda i, t, u: calls.append(t))
    torch.testing.assert_close(sched.timesteps, torch.tensor(calls, dtype=torch.float32))
    grid = time_grid(6, 2e-3, "quadratic")
    torch.testing.assert_close(sched.timesteps[:-1].double(), grid[:-1], rtol=1e-6, atol=0)
    assert sched.timesteps.dtype == torch.float32


def test_mixed_network_output_matches_sample_with_score_fn(sde, toy_score_net):
    Model = toy_score_net(width=32, activation=torch.nn.SiLU)

    model = Model().eval()
    shape = (128, 2)
    res = cf.sample(cf.score_fn(model, sde), shape, sde, steps=10, generator=torch.Generator().manual_seed(4))
    sched = cf.SSCSScheduler(sde, steps=10, mixed=True)
    with torch.no_grad():
        u = _loop(sched, model, shape, 4)
    assert torch.equal(u, res.u)


def test_set_timesteps_float64_and_restart(sde, score):
    sched = cf.SSCSScheduler(sde, steps=4)
    sched.set_timesteps(6, dtype=torch.float64)
    assert sched.timesteps.dtype == torch.float64 and len(sched.timesteps) == 6
    a = _loop(sched, score, (32, 2), 1)
    b = _loop(sched, score, (32, 2), 1)  # a new run restarts the counter
    assert torch.equal(a, b) and a.dtype == torch.float64
    ref = cf.sample(score, (32, 2), sde, steps=6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, ref.u)


def test_scheduler_errors(sde, score):
    with pytest.raises(TypeError):
        cf.SSCSScheduler(cf.VPSDE())
    with pytest.raises(ValueError):
        cf.SSCSScheduler(sde, steps=0)
    with pytest.raises(ValueError):
        cf.SSCSScheduler(sde, eps=0.0)
    with pytest.raises(ValueError):
        cf.SSCSScheduler(sde, striding="bogus")
    sched = cf.SSCSScheduler(sde, steps=2)
    u = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="init_noise"):
        sched.step(torch.zeros(4, 2), sched.timesteps[0], u)
    u = sched.init_noise((4, 2))
    with pytest.raises(ValueError, match="data shape"):
        sched.step(torch.zeros(4, 4), sched.timesteps[0], u)
    with pytest.raises(ValueError, match="t ="):
        sched.step(torch.zeros(4, 2), 0.5, u)
    for t in sched.timesteps:
        sched.step(score(u, t.expand(4)), t, u)
    with pytest.raises(RuntimeError, match="all 2 steps"):
        sched.step(torch.zeros(4, 2), sched.timesteps[-1], u)


@pytest.mark.parametrize("steps,denoise,order,predict", [(12, True, 2, "eps"), (7, False, 3, "x0"), (2, True, 1, "eps"),
                                                         (1, True, 2, "eps")])
def test_gddim_loop_equals_sample_bit_for_bit(sde, score, steps, denoise, order, predict):
    shape = (128, 2)
    res = cf.sample(score, shape, sde, steps=steps, denoise=denoise, method="gddim", order=order, predict=predict,
                    generator=torch.Generator().manual_seed(5))
    sched = cf.GDDIMScheduler(sde, steps=steps, denoise=denoise, order=order, predict=predict)
    assert len(sched.timesteps) == steps
    u = _loop(sched, score, shape, 5)
    assert torch.equal(u, res.u)


def test_default_striding_is_the_samplers():
    from cld_fast.sampling import SAMPLERS

    sde = cf.CLD()
    assert cf.SSCSScheduler(sde).striding == SAMPLERS["sscs"].default_striding == "quadratic"
    assert cf.GDDIMScheduler(sde).striding == SAMPLERS["gddim"].default_striding == "polynomial"


def test_scheduler_fed_the_wrappers_score_agrees_to_float32_rounding():
    """The sampling page's claim next to the scheduler loop: with a cf.score_fn wrapper, stepping with the
    wrapper's score (mixed=False) instead of the raw output agrees with cf.sample to ~6e-7, not bitwise."""
    import cld_fast as cf
    from cld_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("toy2d").eval()
    sde = cf.CLD()
    score = cf.score_fn(net, sde)
    sched = cf.SSCSScheduler(sde, steps=50)
    u = sched.init_noise((512, 2), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        u = sched.step(score(u, t.expand(512)), t, u)
    ref = cf.sample(score, (512, 2), sde, steps=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u, ref.u, rtol=0, atol=5e-6)


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_classifier_free_pair_equals_sample_with_guidance_bit_for_bit(sde, method):
    gm = GaussianMixture2D()
    cscore, shape, weight = gm.cld_class_score(sde), (64, 2), 1.5
    labels = torch.arange(shape[0]) % cscore.num_classes
    res = cf.sample(cscore, shape, sde, method=method, steps=8, generator=torch.Generator().manual_seed(5),
                    guidance=cf.ClassifierFree(labels, weight))
    sched = cf.Scheduler(sde, method=method, steps=8)
    u = sched.init_noise(shape, torch.Generator().manual_seed(5))
    both = torch.cat([labels, torch.full_like(labels, cscore.num_classes)])
    for t in sched.timesteps:
        tt = t.expand(2 * shape[0])
        out = cscore(torch.cat([u, u]), tt, class_labels=both)
        u = sched.step(out[:shape[0]], t, u, score_uncond=out[shape[0]:], guidance_weight=weight)
    assert torch.equal(u, res.u)
    plain = cf.sample(cscore, shape, sde, method=method, steps=8, generator=torch.Generator().manual_seed(5),
                      guidance=cf.ClassifierFree(labels, 0.0))
    assert not torch.equal(u, plain.u)


def test_classifier_free_pair_errors(sde, score):
    sched = cf.SSCSScheduler(sde, steps=3)
    u = sched.init_noise((4, 2), torch.Generator().manual_seed(0))
    y = score(u, sched.timesteps[0].expand(4))
    with pytest.raises(ValueError, match="score_uncond must have score's shape"):
        sched.step(y, sched.timesteps[0], u, score_uncond=y[:2])
    with pytest.raises(ValueError, match="guidance_weight must be a finite number >= 0"):
        sched.step(y, sched.timesteps[0], u, score_uncond=y, guidance_weight=-1.0)
    with pytest.raises(TypeError, match="score_uncond must be a torch.Tensor"):
        sched.step(y, sched.timesteps[0], u, score_uncond=[1.0])


def test_gddim_scheduler_defaults_are_the_samplers(sde, score):
    shape = (64, 2)
    res = cf.sample(score, shape, sde, method="gddim", steps=8, generator=torch.Generator().manual_seed(2))
    sched = cf.GDDIMScheduler(sde, steps=8)
    spec = cf.SAMPLERS["gddim"]
    assert {o.name: getattr(sched, o.name) for o in spec.options} == {o.name: o.default for o in spec.options}
    assert torch.equal(_loop(sched, score, shape, 2), res.u)
