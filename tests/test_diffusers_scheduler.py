"""cld_fast.diffusers_scheduler: diffusers' scheduler contract around every fixed-step sampler.

Runs where diffusers is installed (the "test" extra installs it; tested with 0.42.1), else skips.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'cld_fast[diffusers]')")

import cld_fast as cf  # noqa: E402
from cld_fast.diffusers_scheduler import (CLDEMScheduler, CLDGDDIMScheduler, CLDPipeline, CLDScheduler,  # noqa: E402
                                          CLDSSCSScheduler)

pytestmark = pytest.mark.usefixtures("one_thread")

C, B, STEPS = 1, 3, 6
SHAPE = (B, C, 8, 8)
SCHEDULERS = {"sscs": CLDSSCSScheduler, "em": CLDEMScheduler, "gddim": CLDGDDIMScheduler}
# the diffusers SSCS scheduler starts from the prior draw as an opened state (exact in distribution)
REFERENCE_OPTIONS = {"sscs": {"first_half_step": False}, "em": {}, "gddim": {}}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2 * C, out_channels=C, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.eval()


def _loop(sched, unet, seed, steps=STEPS, step_generator=False, guidance=None):
    """A plain diffusers denoising loop; ``guidance``: classifier-free guidance with the batch doubled
    before the network (both halves see the same state; the outputs are combined with this weight)."""
    g = torch.Generator().manual_seed(seed)
    if not step_generator:
        sched.set_timesteps(steps, generator=g)
    else:
        sched.set_timesteps(steps)
    sample = torch.randn((B, 2 * C, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            if guidance is None:
                out = unet(sched.scale_model_input(sample, t), t).sample
            else:
                both = unet(sched.scale_model_input(torch.cat([sample] * 2), t), t).sample
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            step_gen = (g if step_generator is True else step_generator) if step_generator else None
            sample = sched.step(out, t, sample, generator=step_gen).prev_sample
    return sample


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_unet_loop_equals_cf_sample_bit_for_bit(sde, unet, method):
    got = _loop(SCHEDULERS[method](num_channels=C), unet, seed=11)
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, steps=STEPS, method=method,
                    generator=torch.Generator().manual_seed(11), **REFERENCE_OPTIONS[method])
    assert got.shape == (B, 2 * C, 8, 8)
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref.u)


@pytest.mark.parametrize("method", ["sscs", "em"])
def test_seed_from_the_step_generator(sde, unet, method):
    got = _loop(SCHEDULERS[method](num_channels=C), unet, seed=5, step_generator=True)
    again = _loop(SCHEDULERS[method](num_channels=C), unet, seed=5, step_generator=True)
    other = _loop(SCHEDULERS[method](num_channels=C), unet, seed=6, step_generator=True)
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, steps=STEPS, method=method,
                    generator=torch.Generator().manual_seed(5), **REFERENCE_OPTIONS[method])
    assert torch.equal(got, ref.u) and torch.equal(got, again)
    assert not torch.equal(got, other)


@pytest.mark.parametrize("method", ["sscs", "em"])
def test_per_sample_generator_lists_are_reproducible(unet, method):
    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return _loop(SCHEDULERS[method](num_channels=C), unet, seed=1, step_generator=gens)

    a, b, c = run([1, 2, 3]), run([1, 2, 3]), run([1, 2, 4])
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TypeError, match="generator"):
        SCHEDULERS[method](num_channels=C).set_timesteps(3, generator=["seed"])


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_guidance_batch_doubling_gives_both_halves_the_same_state(unet, method):
    """Weight 1 of classifier-free guidance on a doubled batch is the plain loop, bit for bit: the network
    sees two identical halves at every step, SSCS's first step included."""
    sched = SCHEDULERS[method](num_channels=C)
    seen = []
    hook = unet.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        guided = _loop(sched, unet, seed=4, guidance=1.0)
    finally:
        hook.remove()
    for x in seen:
        first, second = x.chunk(2)
        assert torch.equal(first, second)
    torch.testing.assert_close(guided, _loop(SCHEDULERS[method](num_channels=C), unet, seed=4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_guidance_pair_fused_in_the_step_matches_the_combined_output(unet, method):
    """step(cond, t, u, model_output_uncond=uncond, guidance_scale=s) equals stepping
    uncond + s (cond - uncond) to float32 rounding, and differs from the unguided loop."""
    def run(fused, scale):
        sched = SCHEDULERS[method](num_channels=C)
        g = torch.Generator().manual_seed(9)
        sched.set_timesteps(STEPS, generator=g)
        sample = torch.randn((B, 2 * C, 8, 8), generator=g) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                cond, uncond = unet(torch.cat([sample, 0.5 * sample]), t).sample.chunk(2)
                if fused:
                    sample = sched.step(cond, t, sample, model_output_uncond=uncond, guidance_scale=scale).prev_sample
                else:
                    sample = sched.step(uncond + scale * (cond - uncond), t, sample).prev_sample
        return sample

    fused = run(True, 3.0)
    torch.testing.assert_close(fused, run(False, 3.0), rtol=1e-4, atol=1e-4)
    assert (fused - run(True, 1.0)).abs().max() > 1e-2
    sched = SCHEDULERS[method](num_channels=C)
    sched.set_timesteps(STEPS)
    x = torch.zeros(B, 2 * C, 8, 8)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
        sched.step(x[:, :C], sched.timesteps[0], x, model_output_uncond=x[:, :C], guidance_scale=0.5)
    with pytest.raises(ValueError, match="model_output_uncond must have model_output's shape"):
        sched.step(x[:, :C], sched.timesteps[0], x, model_output_uncond=x[:1, :C])


def test_scale_model_input_is_the_identity(unet):
    sched = CLDSSCSScheduler(num_channels=C)
    sched.set_timesteps(3)
    u = torch.randn(B, 2 * C, 8, 8)
    assert sched.scale_model_input(u, sched.timesteps[0]) is u


def test_prior_is_invariant_under_the_opening_half_step():
    """Why the diffusers SSCS may skip the opening half step: the prior covariance diag(1, M) is a fixed
    point of the linear half step's mean map K and noise covariance Sigma_h (float64, from the SPEC
    formulas, for a grid of spans and CLD parameters)."""
    for sde in (cf.CLD(), cf.CLD(beta0=1.0, beta1=7.0, m_inv=9.0), cf.CLD(m_inv=1.0, gamma=0.1)):
        g = math.sqrt(sde.m_inv) / 2
        for bd in (-1e-3, -0.05, -0.7, -3.0):  # B(t - h) - B(t)
            k, k4 = math.exp(2 * g * bd), math.exp(4 * g * bd)
            K = torch.tensor([[k * (1 - 2 * g * bd), k * 4 * g * g * bd], [-k * bd, k * (1 + 2 * g * bd)]],
                             dtype=torch.float64)
            sig = torch.tensor([[k4 * (1 / k4 - 1 + 4 * g * bd - 8 * g * g * bd * bd), -k4 * 4 * g * bd * bd],
                                [-k4 * 4 * g * bd * bd,
                                 k4 * (-sde.Gamma ** 2 * (1 - 1 / k4) / 4 - sde.Gamma * bd - 2 * bd * bd)]],
                               dtype=torch.float64)
            prior = torch.diag(torch.tensor([1.0, sde.M], dtype=torch.float64))
            torch.testing.assert_close(K @ prior @ K.T + sig, prior, rtol=1e-10, atol=1e-12)


def test_mixed_false_takes_the_score(sde, unet):
    score = cf.score_fn(unet, sde)
    sched = CLDSSCSScheduler(num_channels=C, mixed=False)
    g = torch.Generator().manual_seed(9)
    sched.set_timesteps(STEPS, generator=g)
    sample = torch.randn((B, 2 * C, 8, 8), generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        sample = sched.step(score(sample, t.expand(B)), t, sample).prev_sample
    ref = cf.sample(score, SHAPE, sde, steps=STEPS, generator=torch.Generator().manual_seed(9), first_half_step=False)
    torch.testing.assert_close(sample, ref.u, rtol=1e-5, atol=1e-5)


def test_half_precision_states_are_stepped(unet):
    sched = CLDEMScheduler(num_channels=C)
    sched.set_timesteps(3, generator=torch.Generator().manual_seed(0))
    u = (torch.randn(B, 2 * C, 8, 8) * sched.init_noise_sigma).half()
    out = sched.step(torch.zeros(SHAPE, dtype=torch.float16), sched.timesteps[0], u).prev_sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_stock_ddpm_pipeline_is_refused_and_cld_pipeline_works(unet):
    sched = CLDSSCSScheduler(num_channels=C)
    with pytest.raises(TypeError, match="CLDPipeline"):
        diffusers.DDPMPipeline(unet=unet, scheduler=sched)(batch_size=1, num_inference_steps=3, output_type="np")
    pipe = CLDPipeline(unet=unet, scheduler=CLDSSCSScheduler(num_channels=C))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, C)
    again = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (images.images == again.images).all()


def test_add_noise_with_integer_timesteps_and_the_hsm_training_target(sde):
    sched = CLDSSCSScheduler(num_channels=2, num_train_timesteps=10)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn((4, 2, 3, 3), generator=g)
    noise = torch.randn((4, 4, 3, 3), generator=g)
    k = torch.tensor([0, 3, 7, 9])
    u = sched.add_noise(x0, noise, k)
    assert torch.equal(u, sched.add_noise(x0, noise, (k.double() + 1) / 10))
    out = torch.randn((4, 2, 3, 3), generator=g)
    target = sched.training_target(u, noise, k)
    t = (k.double() + 1) / 10
    u_ref, handle = cf.perturb(x0, t, sched.sde, eps=noise.reshape(4, 2, -1))
    assert torch.equal(u_ref, u)
    ref = cf.hsm_loss(out, u_ref, t, sched.sde, handle)
    torch.testing.assert_close(((out - target) ** 2).flatten(1).sum(1).mean(), ref, rtol=1e-4, atol=1e-4)


def test_any_registered_fixed_step_sampler_has_a_scheduler(unet):
    sched = CLDScheduler(method="gddim", num_channels=C, options={"order": 3})
    assert sched.method == "gddim" and sched.options["order"] == 3
    with pytest.raises(ValueError, match="order"):
        CLDScheduler(method="gddim", num_channels=C, options={"order": 5})
    with pytest.raises(ValueError, match="fixed-step"):
        CLDScheduler(method="ode", num_channels=C)


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
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
    ref = cf.sample(cf.score_fn(unet, sde), SHAPE, sde, timesteps=ts, generator=torch.Generator().manual_seed(8),
                    first_half_step=False)
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
    with pytest.raises(ValueError, match="num_channels"):
        sched.step(out, 1.0, torch.zeros(B, 4, 8, 8))
    with pytest.raises(ValueError, match="data shape"):
        sched.step(torch.zeros(B, 2 * C, 8, 8), sched.timesteps[0], u)
    with pytest.raises(ValueError, match="evaluates the score at t = 1"):
        sched.step(out, 0.5, u)
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
