"""cf.sample(u=..., timesteps=...), k-diffusion-style dict callbacks, and the raw-network guard."""
import pytest
import torch

import cld_fast as cf
from cld_fast.sde import time_grid
from cld_fast.toy import GaussianMixture2D

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (64, 2)


@pytest.fixture(scope="module")
def score(sde):
    return GaussianMixture2D().cld_score(sde)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- u= --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sscs", "em", "gddim", "ode"])
def test_u_from_the_prior_reproduces_the_run_bit_for_bit(sde, score, method):
    res = cf.sample(score, SHAPE, sde, steps=8, method=method, generator=_gen(5))
    g = _gen(5)
    u0 = sde.prior_sampling(SHAPE, generator=g)
    keep = u0.clone()
    res_u = cf.sample(score, None, sde, steps=8, method=method, generator=g, u=u0)
    assert torch.equal(res_u.u, res.u)
    assert res_u.nfe == res.nfe
    assert torch.equal(u0, keep)  # the caller's state is not modified


def test_u_vpsde_em_bit_for_bit():
    vp = cf.VPSDE()
    score = lambda x, t: -x  # noqa: E731 - the N(0, I) score
    res = cf.sample(score, SHAPE, vp, steps=6, method="em", generator=_gen(2))
    g = _gen(2)
    x0 = vp.prior_sampling(SHAPE, generator=g)
    assert torch.equal(cf.sample(score, SHAPE, vp, steps=6, method="em", generator=g, u=x0).u, res.u)


def test_u_dtype_and_device_follow_arguments(sde, score):
    u0 = sde.prior_sampling(SHAPE, generator=_gen(1), dtype=torch.float64)
    res = cf.sample(score, None, sde, steps=3, u=u0, dtype=torch.float64, generator=_gen(1))
    assert res.u.dtype == torch.float64 and res.x.shape == SHAPE
    res32 = cf.sample(score, None, sde, steps=3, u=u0, generator=_gen(1))
    assert res32.u.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(u=torch.zeros(4, 3)), "odd dim 1"),
    (dict(u=torch.zeros(4, 4), shape=(4, 3)), "does not match u"),
    (dict(u=torch.full((4, 4), float("nan"))), "u contains NaN"),
    (dict(u=torch.zeros(4)), "u"),
])
def test_u_bad_input(sde, score, kwargs, match):
    shape = kwargs.pop("shape", None)
    with pytest.raises((ValueError, TypeError), match=match):
        cf.sample(score, shape, sde, steps=3, **kwargs)


def test_shape_none_without_u_is_rejected(sde, score):
    with pytest.raises(TypeError, match="shape must be a tuple"):
        cf.sample(score, None, sde, steps=3)


# ---- timesteps= ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,striding", [("sscs", "quadratic"), ("em", "linear"), ("gddim", "polynomial")])
@pytest.mark.parametrize("denoise", [True, False])
def test_timesteps_equal_to_the_default_grid_give_the_same_samples(sde, score, method, striding, denoise):
    steps = 9
    n = steps - 1 if denoise else steps
    res = cf.sample(score, SHAPE, sde, steps=steps, method=method, denoise=denoise, generator=_gen(3))
    ts = time_grid(n, 1e-3, striding)
    res_ts = cf.sample(score, SHAPE, sde, method=method, timesteps=ts, denoise=denoise, generator=_gen(3))
    assert res_ts.nfe == res.nfe == steps
    assert torch.equal(res_ts.u, res.u)
    as_list = cf.sample(score, SHAPE, sde, method=method, timesteps=ts.tolist(), denoise=denoise, generator=_gen(3))
    assert torch.equal(as_list.u, res.u)


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_custom_grid_is_where_the_score_is_evaluated(sde, score, method):
    ts = [1.0, 0.6, 0.35, 0.2, 0.02]
    seen = []

    def spy(u, t):
        seen.append(float(t[0]))
        return score(u, t)

    res = cf.sample(spy, SHAPE, sde, method=method, timesteps=ts, generator=_gen(0))
    assert res.nfe == 5
    assert seen == torch.tensor(ts, dtype=torch.float32).tolist()  # the score sees float32 times
    default = cf.sample(score, SHAPE, sde, steps=5, method=method, generator=_gen(0))
    assert not torch.allclose(res.u, default.u)


def test_gddim_grid_split_in_two_runs_equals_one_run(sde, score):
    """Deterministic order-1 gDDIM: [1 .. 0.3] then, from that state, [0.3 .. eps] is the whole run."""
    full = [1.0, 0.7, 0.45, 0.3, 0.12, 0.03, 1e-3]
    one = cf.sample(score, SHAPE, sde, method="gddim", order=1, timesteps=full, generator=_gen(4))
    first = cf.sample(score, SHAPE, sde, method="gddim", order=1, timesteps=full[:4], denoise=False,
                      generator=_gen(4))
    second = cf.sample(score, None, sde, method="gddim", order=1, timesteps=full[3:], u=first.u)
    assert first.nfe + second.nfe == one.nfe == len(full)
    # float32 state, per-run float64 tables: equal to float32 rounding over 7 steps
    torch.testing.assert_close(second.u, one.u, rtol=1e-5, atol=2e-5)


def test_ode_timesteps_start_and_end(sde, score):
    tol = dict(rtol=1e-7, atol=1e-7)
    whole = cf.sample(score, SHAPE, sde, method="ode", generator=_gen(6), denoise=False, **tol)
    ts_seen = []
    first = cf.sample(score, SHAPE, sde, method="ode", timesteps=[1.0, 0.4], denoise=False, generator=_gen(6),
                      callback=lambda i, t, u: ts_seen.append(t), **tol)
    assert min(ts_seen) == pytest.approx(0.4) and max(ts_seen) < 1.0
    second = cf.sample(score, None, sde, method="ode", timesteps=torch.tensor([0.4, 1e-3]), u=first.u, denoise=False,
                       **tol)
    torch.testing.assert_close(second.u, whole.u, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("timesteps,kwargs,match", [
    ([1.0, 0.5, 0.5, 0.1], {}, "strictly decreasing"),
    ([1.0, 0.2, 0.5], {}, "strictly decreasing"),
    ([1.0, 0.5, 0.0], {}, r"\(0, 1\]"),
    ([1.5, 0.5, 0.1], {}, r"\(0, 1\]"),
    ([1.0, float("nan")], {}, r"\(0, 1\]"),
    ([1.0], {}, "at least 2"),
    (torch.ones(2, 2), {}, "1-D"),
    ("1, 0.5", {}, "1-D tensor or a list"),
    ([1.0, "0.5"], {}, "list of floats"),
    ([0.8, 0.1], {}, "start at 1"),
    ([1.0, 0.5, 0.1], dict(striding="linear"), "exclusive"),
    ([1.0, 0.5, 0.1], dict(steps=5), "disagrees"),
    ([1.0, 0.5, 0.1], dict(eps=1e-3), "disagrees"),
    ([1.0, 0.5, 0.1], dict(method="ode"), r"\[t_start, t_end\]"),
])
def test_timesteps_bad_input(sde, score, timesteps, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cf.sample(score, SHAPE, sde, timesteps=timesteps, **kwargs)


def test_timesteps_with_agreeing_steps_and_eps_are_accepted(sde, score):
    res = cf.sample(score, SHAPE, sde, timesteps=[1.0, 0.5, 0.1], steps=3, eps=0.1, generator=_gen(0))
    assert res.nfe == 3


# ---- k-diffusion-style dict callbacks -------------------------------------------------------------
@pytest.mark.parametrize("method", ["sscs", "gddim", "ode"])
def test_dict_callback_gets_exactly_x_i_t(sde, score, method):
    as_args, as_dict = [], []
    cf.sample(score, SHAPE, sde, steps=5, method=method, generator=_gen(0),
              callback=lambda i, t, u: as_args.append((i, t, u.clone())))

    def cb(info):
        as_dict.append(dict(info, x=info["x"].clone()))

    cf.sample(score, SHAPE, sde, steps=5, method=method, generator=_gen(0), callback=cb)
    assert len(as_dict) == len(as_args) > 0
    for d, (i, t, u) in zip(as_dict, as_args):
        assert set(d) == {"x", "i", "t"}
        assert d["i"] == i and d["t"] == t and torch.equal(d["x"], u)
        assert d["x"].shape == (SHAPE[0], 2 * SHAPE[1])


def test_callback_with_a_wrong_signature_is_rejected(sde, score):
    with pytest.raises(TypeError, match="callback must accept"):
        cf.sample(score, SHAPE, sde, steps=3, callback=lambda a, b: None)
    with pytest.raises(TypeError, match="callback must be callable"):
        cf.sample(score, SHAPE, sde, steps=3, callback=3)


# ---- a raw network is not a score -------------------------------------------------------------
def test_raw_module_is_rejected_with_a_hint(sde, toy_score_net):
    model = toy_score_net()()
    with pytest.raises(TypeError, match=r"raw network \(Model\).*cf\.score_fn\(model, sde\)"):
        cf.sample(model, SHAPE, sde, steps=3)
    with pytest.raises(TypeError, match="cf.score_fn"):
        cf.likelihood(model, torch.zeros(SHAPE), sde)
    res = cf.sample(cf.score_fn(model, sde), SHAPE, sde, steps=3, generator=_gen(0))  # the wrapped network runs
    assert res.x.shape == SHAPE


def test_a_registered_sampler_without_custom_grid_refuses_timesteps(sde, score):
    from cld_fast.sampling import SAMPLERS, register_sampler

    def loop(run):  # a fixed-step loop that knows nothing of run.timesteps
        return run.steps

    register_sampler("_no_grid", loop, sdes=(cf.CLD,))
    try:
        assert cf.sample(score, SHAPE, sde, steps=3, method="_no_grid").nfe == 3
        with pytest.raises(ValueError, match="does not take a custom grid"):
            cf.sample(score, SHAPE, sde, method="_no_grid", timesteps=[1.0, 0.5, 0.1])
    finally:
        del SAMPLERS["_no_grid"]
    assert all(SAMPLERS[m].custom_grid for m in ("sscs", "em", "gddim", "ode"))
