"""cld_fast.diffusers_scheduler: diffusers' scheduler contract around the fused SSCS / EM steps.

Runs where diffusers is installed (the "test" extra installs it; tested with 0.42.1), else skips.
"""
import json
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'cld_fast[diffusers]')")

import cld_fast as cf  # noqa: E402
from cld_fast.diffusers_scheduler import CLDEMScheduler, CLDSSCSScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

C, B, STEPS = 1, 3, 6
SHAPE = (B, C, 8, 8)
SCHEDULERS = {"sscs": CLDSSCSScheduler, "em": CLDEMScheduler}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2 * C, out_channels=C, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.eval()


def _loop(sched, unet, seed, steps=STEPS, step_generator=False, feed_opened=False):
    """A plain diffusers denoising loop."""
    g = torch.Generator().manual_seed(seed)
    if not step_generator:
        sched.set_timesteps(steps, generator=g)
    else:
        sched.set_timesteps(steps)
    sample = torch.randn((B, 2 * C, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            model_input = sched.scale_model_input(sample, t)
            out = unet(model_input, t).sample
            state = model_input if feed_opened else sample
            sample = sched.step(out, t, state, generator=g if step_generator else None).prev_sample
    return sample


@pytest.mark.parametrize("method", ["sscs", "em"])
def test_unet_loop_equals_cf_sample_bit_for_bit(sde, unet, method):
    got = _loop(SCHEDULERS[method](num_channels=C), unet, seed=11)
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, steps=STEPS, method=method,
                    generator=torch.Generator().manual_seed(11))
    assert got.shape == (B, 2 * C, 8, 8)
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref.u)


def test_em_seed_from_the_step_generator(sde, unet):
    got = _loop(CLDEMScheduler(num_channels=C), unet, seed=5, step_generator=True)
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, steps=STEPS, method="em",
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, ref.u)


def test_sscs_step_accepts_the_opened_or_the_original_state(unet):
    a = _loop(CLDSSCSScheduler(num_channels=C), unet, seed=3)
    b = _loop(CLDSSCSScheduler(num_channels=C), unet, seed=3, feed_opened=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["sscs", "em"])
def test_save_pretrained_from_pretrained(tmp_path, unet, method):
    cls = SCHEDULERS[method]
    sched = cls(num_channels=C, beta0=3.0, beta1=1.5, m_inv=2.0, gamma=0.05, numerical_eps=1e-6, eps=2e-3,
                striding="linear", mixed=True)
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__ and saved["beta1"] == 1.5 and saved["numerical_eps"] == 1e-6
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.sde == sched.sde
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    assert torch.equal(_loop(loaded, unet, seed=2), _loop(sched, unet, seed=2))
    assert type(cls.from_config(sched.config)) is cls


def test_custom_timesteps_match_cf_sample(sde, unet):
    ts = [1.0, 0.55, 0.25, 0.08, 0.01]
    sched = CLDSSCSScheduler(num_channels=C)
    g = torch.Generator().manual_seed(8)
    sched.set_timesteps(timesteps=ts, generator=g)
    assert sched.num_inference_steps == len(ts) == len(sched.timesteps)
    sample = torch.randn((B, 2 * C, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(sample, t), t).sample
            sample = sched.step(out, t, sample).prev_sample
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, timesteps=ts, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sample, ref.u)


def test_init_noise_sigma_is_the_prior(sde):
    sched = CLDSSCSScheduler(num_channels=3)
    sched.set_timesteps(4)
    assert sched.init_noise_sigma.shape == (6, 1, 1)
    z = torch.randn((2, 6, 4, 4), generator=torch.Generator().manual_seed(0))
    prior = sde.prior_sampling((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(z * sched.init_noise_sigma, prior)
    vec = CLDSSCSScheduler(num_channels=2, spatial_dims=0)
    assert vec.init_noise_sigma.tolist() == [1.0, 1.0, 0.5, 0.5]  # sqrt(M) = 0.5 for m_inv = 4


def test_add_noise_against_float64_kernel(sde):
    sched = CLDSSCSScheduler(num_channels=2, numerical_eps=1e-6)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn((5, 2, 3, 3), generator=g)
    noise = torch.randn((5, 4, 3, 3), generator=g)
    t = torch.tensor([1e-3, 0.1, 0.4, 0.7, 1.0])
    u = sched.add_noise(x0, noise, t)
    k = sched.sde.perturbation_kernel(t.double(), objective="hsm")
    col = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    xd, ex, ev = x0.double(), noise[:, :2].double(), noise[:, 2:].double()
    ref_x = col(k.a_xx) * xd + col(k.l11) * ex
    ref_v = col(k.a_vx) * xd + col(k.l21) * ex + col(k.l22) * ev
    torch.testing.assert_close(u.double(), torch.cat([ref_x, ref_v], 1), rtol=1e-5, atol=1e-6)
    same_t = sched.add_noise(x0, noise, 0.4)
    torch.testing.assert_close(same_t[2], u[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise must have the state shape"):
        sched.add_noise(x0, noise[:, :2], t)


def test_contract_errors(unet):
    sched = CLDSSCSScheduler(num_channels=C)
    u = torch.zeros(B, 2 * C, 8, 8)
    out = torch.zeros(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(out, 1.0, u)
    sched.set_timesteps(3)
    with pytest.raises(RuntimeError, match="scale_model_input"):
        sched.step(out, 1.0, u)
    with pytest.raises(ValueError, match="num_channels"):
        sched.scale_model_input(torch.zeros(B, 4, 8, 8))
    opened = sched.scale_model_input(u, sched.timesteps[0])
    assert not torch.equal(opened, u) and torch.equal(u, torch.zeros_like(u))  # a new tensor; u untouched
    with pytest.raises(ValueError, match="data shape"):
        sched.step(torch.zeros(B, 2 * C, 8, 8), sched.timesteps[0], opened)
    with pytest.raises(ValueError, match="evaluates the score at t = 1"):
        sched.step(out, 0.5, opened)
    for t in sched.timesteps:
        u = sched.step(out, t, sched.scale_model_input(u, t)).prev_sample
    with pytest.raises(RuntimeError, match="all 3 steps"):
        sched.step(out, 1e-3, u)
    with pytest.raises(ValueError, match="num_inference_steps or timesteps"):
        sched.set_timesteps(3, timesteps=[1.0, 0.5])
    with pytest.raises(ValueError, match="start at 1"):
        sched.set_timesteps(timesteps=[0.9, 0.5])
    with pytest.raises(ValueError, match="striding"):
        CLDEMScheduler(striding="cubic")
    with pytest.raises(ValueError, match="num_channels"):
        CLDEMScheduler(num_channels=0)


def test_score_fn_on_a_unet(sde, unet):
    u = torch.randn((B, 2 * C, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.full((B,), 0.3)
    with torch.no_grad():
        out = unet(u, t).sample
    ref = cf.mixed_score(out, u, t, sde)
    torch.testing.assert_close(cf.score_fn(unet, sde)(u, t), ref, rtol=0, atol=0)


def test_import_cld_fast_does_not_import_diffusers():
    code = ("import sys, cld_fast as cf; cf.kdiffusion; cf.SSCSScheduler; "
            "assert 'diffusers' not in sys.modules; cf.CLDSSCSScheduler; assert 'diffusers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
