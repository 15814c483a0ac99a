"""cld_fast.samplers.core: the registry, option declarations and one sampler file reaching every adapter."""
import os

import numpy as np
import pytest
import torch

import cld_fast as cf
from cld_fast import kdiffusion as kd
from cld_fast.samplers import SAMPLERS, Option, Stepper, register_sampler
from cld_fast.sde import time_grid
from cld_fast.toy import GaussianMixture2D

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_cld_sgm")


class DampedEuler(Stepper):
    """A toy sampler, as a user would write it in one file: a noise-free reverse Euler step whose
    score part is scaled by ``strength`` (strength 2 is the reverse SDE drift without noise)."""

    options = (Option("strength", float, 1.0, "scale of the score term", positive=True),)

    def step(self, u, y):
        t = self.plan.grid.index_select(0, self.counter)
        h = t - self.plan.grid.index_select(0, self.counter + 1)
        beta = self.sde.beta(t).to(u.dtype)
        x, v = self.sde.split_state(u)
        g = self.sde.Gamma
        dx = -self.sde.m_inv * v * beta
        dv = (x - g * self.sde.m_inv * v + self.opts["strength"] * g * (y + self.sde.m_inv * v)) * beta
        u.add_(torch.cat([dx, dv], 1) * h.to(u.dtype))
        self.counter.add_(1)


@pytest.fixture
def toy_sampler():
    register_sampler("toy", stepper=DampedEuler, sdes=(cf.CLD,), summary="a toy sampler for the registry test")
    try:
        yield "toy"
    finally:
        del SAMPLERS["toy"]


def test_one_file_reaches_every_adapter(toy_sampler, sde, tmp_path):
    score = GaussianMixture2D().cld_score(sde)
    shape = (16, 2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ref = cf.sample(score, shape, sde, steps=6, method="toy", strength=1.5, generator=g())
    assert ref.nfe == 6 and torch.isfinite(ref.u).all()
    with pytest.raises(ValueError, match="strength"):
        cf.sample(score, shape, sde, steps=6, method="toy", strength=-1.0)
    with pytest.raises(ValueError, match=r"strength= is an option of \['toy'\]"):
        cf.sample(score, shape, sde, steps=6, method="sscs", strength=1.5)

    sched = cf.Scheduler(sde, method="toy", steps=6, strength=1.5)  # the generic scheduler
    u = sched.init_noise(shape, g())
    for t in sched.timesteps:
        u = sched.step(score(u, t.expand(shape[0])), t, u)
    assert torch.equal(u, ref.u)

    u0 = sde.prior_sampling(shape, generator=g())
    got = kd.sample_toy(score, u0, time_grid(5, 1e-3, "linear"), sde=sde, disable=True, generator=g(), strength=1.5)
    assert torch.equal(got, cf.sample(score, None, sde, method="toy", u=u0, timesteps=time_grid(5, 1e-3, "linear"),
                                      strength=1.5).u)

    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from cld_fast.diffusers_scheduler import CLDScheduler

    dsched = CLDScheduler(method="toy", num_channels=2, spatial_dims=0, mixed=False, options={"strength": 1.5})
    dsched.set_timesteps(6, generator=g())
    state = torch.randn((16, 4), generator=g()) * dsched.init_noise_sigma
    for t in dsched.timesteps:
        state = dsched.step(score(state, t.expand(16)), t, state).prev_sample
    assert torch.equal(state, cf.sample(score, shape, sde, steps=6, method="toy", strength=1.5, generator=g()).u)

    from cld_fast.cli import main

    path = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    config = os.path.join(FIXTURES, "official_small_config.json")
    assert main(["sample", path, "--config", config, "--method", "toy", "--strength", "2", "--steps", "2", "--n", "1",
                 "--out", str(tmp_path), "--name", "toy", "--device", "cpu"]) == 0
    assert np.isfinite(np.load(tmp_path / "toy.npz")["x"]).all()


def test_options_are_declared_once_and_checked(sde):
    score = GaussianMixture2D().cld_score(sde)
    assert [o.name for o in SAMPLERS["gddim"].options] == ["order", "predict", "first_order_below"]
    with pytest.raises(ValueError, match="order must be one of"):
        cf.sample(score, (4, 2), sde, method="gddim", steps=4, order=4)
    with pytest.raises(TypeError, match="unknown argument colour="):
        cf.sample(score, (4, 2), sde, steps=4, colour=1)
    with pytest.raises(ValueError, match="one name, one meaning"):
        register_sampler("clash", stepper=type("Clash", (DampedEuler,), {"options": (Option("order", str, "a", "x"),)}),
                         sdes=(cf.CLD,))
    assert "clash" not in SAMPLERS
    with pytest.raises(ValueError, match="sdes"):
        register_sampler("nosde", stepper=DampedEuler)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ode", rtol=float("inf")), "rtol must be a finite number > 0"),
    (dict(method="ode", atol=float("nan")), "atol must be a finite number > 0"),
    (dict(method="ode", rtol=0.0), "rtol"),
    (dict(method="ode", max_nfe=5), "max_nfe must be an int >= 8"),
    (dict(method="sscs", max_nfe=50), r"max_nfe= is an option of \['ode'\]"),
])
def test_options_that_can_only_give_garbage_are_refused(sde, kwargs, match):
    score = GaussianMixture2D().cld_score(sde)
    with pytest.raises(ValueError, match=match):
        cf.sample(score, (4, 2), sde, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="meta"), "device 'meta' holds no values"),
    (dict(device="cuda:0"), "no CUDA device is available") if not torch.cuda.is_available() else
    (dict(device="meta"), "meta"),
    (dict(device="not-a-device"), "device must be"),
    (dict(timesteps=[1.0, "0.5", 0.1]), "timesteps must be"),
])
def test_devices_and_grids_that_cannot_work_are_refused_by_name(sde, kwargs, match):
    score = GaussianMixture2D().cld_score(sde)
    with pytest.raises((ValueError, TypeError), match=match):
        cf.sample(score, (4, 2), sde, steps=3, **kwargs)


def test_time_grid_takes_numbers_only():
    with pytest.raises(ValueError, match="eps must be a number"):
        time_grid(5, "1e-3")
    with pytest.raises(ValueError, match="n must be an int"):
        time_grid("5", 1e-3)
