"""cf.from_official: the official CLD-SGM config (attribute object or dict) + model/checkpoint -> cf.sample inputs.

References are written here from the official math in float64: the official score function is
``-v / s_vv_hsm(t) * [mixed] + out * noise_multiplier(t)`` with noise_multiplier = -1 / l22 of the
configured objective's perturbation covariance (HSM: initial covariance diag(0, gamma M); DSM: 0).
"""
import math
import types

import pytest
import torch

import cld_fast as cf
from cld_fast.models import build_model, get_config
from cld_fast.official import flatten_config, sde_settings

pytestmark = pytest.mark.usefixtures("one_thread")

SDE_KEYS = dict(sde="cld", beta_type="linear", beta0=3.0, beta1=2.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6,
                mixed_score=True, cld_objective="hsm")
SAMPLING_KEYS = dict(sampling_batch_size=3, sampling_eps=1e-3, likelihood_eps=1e-5, n_discrete_steps=4,
                     sampling_method="sscs", striding="quadratic", denoising=True)


class ConfigDict:
    """A stand-in for an ml_collections ConfigDict: attribute access, nested groups, ``to_dict()``."""

    def __init__(self, **groups):
        for k, v in groups.items():
            setattr(self, k, ConfigDict(**v) if isinstance(v, dict) else v)

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in vars(self).items()}


def tiny_flat(**extra):
    return {**get_config("tiny"), **SDE_KEYS, **SAMPLING_KEYS, **extra}


def tiny_model_keys():
    return {k: v for k, v in get_config("tiny").items() if k not in SDE_KEYS and k not in ("loss_eps", "weighting")}


def official_reference_score(out, u, t, beta0, beta1, m_inv, gamma, eps, mixed, objective):
    """The official score in float64 from the CLD perturbation covariance (SPEC formulas)."""
    t = t.double()
    g = math.sqrt(m_inv) / 2.0
    Gamma = 2.0 / math.sqrt(m_inv)
    b = beta0 * t + 0.5 * beta1 * t * t
    m = torch.exp(-4.0 * g * b)

    def cov(s0x, s0v):
        s_xx = m * (s0x + 1 / m - 1 + 4 * g * b * (s0x - 1) + 4 * g ** 2 * b ** 2 * (s0x - 2)
                    + 16 * g ** 4 * b ** 2 * s0v) + eps
        s_xv = m * (-s0x * b + 4 * g ** 2 * b * s0v - 2 * g * b ** 2 * (s0x - 2) - 8 * g ** 3 * b ** 2 * s0v)
        s_vv = m * (Gamma ** 2 * (1 / m - 1) / 4 + Gamma * b - 4 * g * b * s0v + 4 * g ** 2 * b ** 2 * s0v + s0v
                    + b ** 2 * (s0x - 2)) + eps
        return s_xx, s_xv, s_vv

    _, _, s_vv_hsm = cov(0.0, gamma / m_inv)
    s_xx, s_xv, s_vv = cov(0.0, gamma / m_inv) if objective == "hsm" else cov(0.0, 0.0)
    l22 = torch.sqrt(s_vv - s_xv ** 2 / s_xx)
    shape = (-1,) + (1,) * (u.dim() - 1)
    v = torch.chunk(u.double(), 2, dim=1)[1]
    score = -out.double() / l22.view(shape)
    if mixed:
        score = score - v / s_vv_hsm.view(shape)
    return score


def _net(seed=0, cfg=None):
    torch.manual_seed(seed)
    return build_model(cfg or tiny_flat()).eval()


# ------------------------------------------------------------------------------------------------
# config reading
# ------------------------------------------------------------------------------------------------
def test_flat_nested_attribute_and_dict_configs_read_the_same():
    flat = {**tiny_model_keys(), **SDE_KEYS, **SAMPLING_KEYS}
    nested = dict(model=tiny_model_keys(),
                  sde={k: v for k, v in SDE_KEYS.items()}, sampling=dict(SAMPLING_KEYS))
    forms = [flat, types.SimpleNamespace(**flat), ConfigDict(**nested), nested]
    for form in forms:
        assert flatten_config(form) == flat
    # ml_collections style: training.objective is the official cld_objective
    cfg = ConfigDict(model=dict(image_size=8), training=dict(objective="dsm"))
    assert flatten_config(cfg)["cld_objective"] == "dsm"
    with pytest.raises(ValueError, match="image_size"):
        flatten_config(dict(model=dict(image_size=8), data=dict(image_size=16)))
    with pytest.raises(TypeError, match="config must be"):
        flatten_config(42)


def test_sde_settings_parse_official_values_and_defaults():
    s = sde_settings({"numerical_eps": "1e-6", "beta0": "0.1", "beta1": 6.9, "mixed_score": "false",
                      "cld_objective": "DSM"})
    assert s["numerical_eps"] == 1e-6 and s["beta0"] == 0.1 and s["beta1"] == 6.9
    assert s["mixed_score"] is False and s["cld_objective"] == "dsm"
    assert s["m_inv"] == 4.0 and s["gamma"] == 0.04  # official CIFAR-10 defaults
    assert s["from_config"] == ["beta0", "beta1", "cld_objective", "mixed_score", "numerical_eps"]
    assert sde_settings({}, numerical_eps=1e-7, beta0=None)["numerical_eps"] == 1e-7
    c = sde_settings(get_config("celebahq256"))
    assert (c["beta0"], c["beta1"], c["numerical_eps"]) == (0.1, 6.9, 1e-6)
    assert sde_settings(get_config("cifar10"))["numerical_eps"] == 1e-9
    assert sde_settings(get_config("toy2d"))["numerical_eps"] == 1e-6
    with pytest.raises(NotImplementedError, match="sde"):
        sde_settings({"sde": "vpsde"})
    with pytest.raises(NotImplementedError, match="beta_type"):
        sde_settings({"beta_type": "cosine"})
    with pytest.raises(ValueError, match="cld_objective"):
        sde_settings({"cld_objective": "realdsm"})
    with pytest.raises(ValueError, match="gamma"):
        sde_settings({"gamma": "much"})
    with pytest.raises(TypeError, match="unknown SDE setting"):
        sde_settings({}, beta2=1.0)


# ------------------------------------------------------------------------------------------------
# from_official
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["namespace", "dict", "nested"])
def test_from_official_with_a_model_matches_the_official_score(form):
    flat = tiny_flat()
    config = {"namespace": types.SimpleNamespace(**flat), "dict": flat,
              "nested": ConfigDict(model=tiny_model_keys(), sde=SDE_KEYS, sampling=SAMPLING_KEYS)}[form]
    net = _net()
    run = cf.from_official(config, net)
    assert run.model is net
    assert run.sde == cf.CLD(beta0=3.0, beta1=2.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
    assert run.shape == (3, 3, 8, 8) and run.eps == 1e-3 and run.likelihood_eps == 1e-5
    assert (run.steps, run.method, run.striding, run.denoise) == (4, "sscs", "quadratic", True)
    assert run.mixed is True and run.objective == "hsm"

    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.9], dtype=torch.float64)
    with torch.no_grad():
        out = net(u.float(), t.float())
    ref = official_reference_score(out, u, t, 3.0, 2.0, 4.0, 0.04, 1e-6, True, "hsm")
    got = run.score_fn(u, t)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-10, err  # float64 state; the network output is the same float32 tensor


def test_from_official_checkpoint_path_loads_ema_weights(tmp_path):
    flat = tiny_flat()
    net = _net(1)
    shadow = [p.detach() * 0.5 for p in net.parameters() if p.requires_grad]
    ckpt = {"model": {"module." + k: v for k, v in net.state_dict().items()},
            "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow}, "step": 10}
    torch.save(ckpt, tmp_path / "checkpoint_10.pth")
    run = cf.from_official(types.SimpleNamespace(**flat), str(tmp_path / "checkpoint_10.pth"))
    for p, s in zip([p for p in run.model.parameters() if p.requires_grad], shadow):
        assert torch.equal(p, s)
    raw = cf.from_official(flat, ckpt, use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(), net.state_dict().values()))
    assert not run.model.training


def test_from_official_unwraps_data_parallel():
    net = _net()
    run = cf.from_official(tiny_flat(), torch.nn.DataParallel(net))
    assert run.model is net


def test_run_sample_is_cf_sample_with_the_official_settings():
    run = cf.from_official(tiny_flat(), _net())
    res = run.sample(generator=torch.Generator().manual_seed(4))
    ref = cf.sample(run.score_fn, (3, 3, 8, 8), run.sde, steps=4, method="sscs", eps=1e-3, striding="quadratic",
                    denoise=True, generator=torch.Generator().manual_seed(4), sscs_official_half_steps=True)
    assert res.x.shape == (3, 3, 8, 8) and res.nfe == ref.nfe == 4
    assert torch.equal(res.x, ref.x) and torch.equal(res.v, ref.v)
    assert run.sample(steps=2, method="em", generator=torch.Generator().manual_seed(4)).nfe == 2
    assert run.sample_kwargs(eps=1e-2)["eps"] == 1e-2
    assert run.sample_kwargs()["sscs_official_half_steps"] is True  # the official SSCS, also for beta1 != 0
    assert "sscs_official_half_steps" not in run.sample_kwargs(method="em")


def test_run_likelihood_is_cf_likelihood_with_likelihood_eps():
    flat = dict(get_config("toy2d"), is_image=False, data_dim=2, sampling_batch_size=5, likelihood_eps=1e-4)
    torch.manual_seed(0)
    net = build_model(flat).eval()
    run = cf.from_official(flat, net)
    assert run.shape == (5, 2) and run.sde.numerical_eps == 1e-6
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    a = run.likelihood(x, generator=torch.Generator().manual_seed(3), rtol=1e-3, atol=1e-3)
    b = cf.likelihood(run.score_fn, x, run.sde, eps=1e-4, generator=torch.Generator().manual_seed(3),
                      rtol=1e-3, atol=1e-3)
    assert torch.isfinite(a.bpd).all() and torch.equal(a.bpd, b.bpd)


@pytest.mark.parametrize("objective,mixed", [("dsm", True), ("hsm", False), ("dsm", False)])
def test_dsm_and_non_mixed_follow_the_official_score(objective, mixed):
    flat = tiny_flat(cld_objective=objective, mixed_score=mixed)
    net = _net()
    run = cf.from_official(flat, net)
    u = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    with torch.no_grad():
        out = net(u.float(), t.float())
    ref = official_reference_score(out, u, t, 3.0, 2.0, 4.0, 0.04, 1e-6, mixed, objective)
    assert ((run.score_fn(u, t) - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_from_official_bad_inputs_are_clear():
    with pytest.raises(TypeError, match="model_or_checkpoint"):
        cf.from_official(tiny_flat(), 42)
    with pytest.raises(TypeError, match="config must be"):
        cf.from_official(3.5, _net())
    with pytest.raises(NotImplementedError, match="striding"):
        cf.from_official(tiny_flat(striding="logarithmic"), _net())
    with pytest.raises(ValueError, match="batch_size"):
        cf.from_official(tiny_flat(), _net(), batch_size=0)
    with pytest.raises(ValueError, match="denoising"):
        cf.from_official(tiny_flat(denoising="maybe"), _net())


# ------------------------------------------------------------------------------------------------
# a key the config lacks takes the official value; what cld_fast cannot reproduce is refused by name
# ------------------------------------------------------------------------------------------------
def _toy_flat(**extra):
    return dict(get_config("toy2d"), is_image=False, sampling_batch_size=20, **extra)


def _toy_run(**extra):
    flat = _toy_flat(**extra)
    torch.manual_seed(0)
    return cf.from_official(flat, build_model(flat).eval())


def test_absent_striding_is_the_official_linear_grid():
    run = _toy_run(sampling_method="sscs", n_discrete_steps=5)
    assert run.striding == "linear" and run.sources["striding"] == "default"
    ref = cf.sample(run.score_fn, (20, 2), run.sde, steps=5, method="sscs", striding="linear",
                    generator=torch.Generator().manual_seed(1))
    res = run.sample(generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.x, ref.x) and torch.equal(res.v, ref.v)


def test_absent_sampling_keys_are_the_official_ode_with_its_tolerances():
    run = _toy_run()
    assert (run.method, run.striding, run.eps, run.denoise, run.rtol, run.atol) == ("ode", "linear", 1e-3, True,
                                                                                      1e-5, 1e-5)
    assert run.sample_kwargs()["method"] == "ode" and run.sample_kwargs()["rtol"] == 1e-5
    assert "rtol" not in run.sample_kwargs(method="em") and run.sample_kwargs(rtol=1e-3)["rtol"] == 1e-3


def test_sampling_rtol_and_atol_reach_the_ode_sampler():
    run = _toy_run(sampling_rtol=1e-2, sampling_atol="1e-3")
    assert (run.rtol, run.atol) == (1e-2, 1e-3)
    res = run.sample(generator=torch.Generator().manual_seed(2))
    ref = cf.sample(run.score_fn, (20, 2), run.sde, method="ode", rtol=1e-2, atol=1e-3,
                    generator=torch.Generator().manual_seed(2))
    tight = cf.sample(run.score_fn, (20, 2), run.sde, method="ode", generator=torch.Generator().manual_seed(2))
    assert torch.equal(res.x, ref.x) and res.nfe == ref.nfe < tight.nfe
    assert run.sample(method="em", steps=3).nfe == 3  # the tolerances do not bother a fixed-step sampler


def test_sscs_num_stab_other_than_zero_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="sscs_num_stab=0.001.*half-step noise"):
        _toy_run(sampling_method="sscs", sscs_num_stab=1e-3)
    assert _toy_run(sampling_method="sscs", sscs_num_stab=0.0, n_discrete_steps=3).sample().nfe == 3
    run = _toy_run(sscs_num_stab="1e-3")  # the ODE does not use it ...
    with pytest.raises(NotImplementedError, match="sscs_num_stab"):
        run.sample(method="sscs", steps=3)  # ... SSCS would


def test_ode_solvers_other_than_dormand_prince_are_refused_by_name():
    _toy_run(sampling_solver="scipy_solver", sampling_solver_options='{"solver": "RK45"}')
    _toy_run(sampling_solver="dopri5")
    with pytest.raises(NotImplementedError, match="sampling_solver='scipy_solver' \\(solver 'LSODA'\\)"):
        _toy_run(sampling_solver_options={"solver": "LSODA"})
    with pytest.raises(NotImplementedError, match="sampling_solver='euler'"):
        _toy_run(sampling_solver="euler")
    _toy_run(sampling_method="em", sampling_solver="euler")  # only the ODE uses it


def test_denoising_false_is_honoured():
    run = _toy_run(sampling_method="em", n_discrete_steps=4, denoising="false")
    assert run.denoise is False
    res = run.sample(generator=torch.Generator().manual_seed(3))
    ref = cf.sample(run.score_fn, (20, 2), run.sde, steps=4, method="em", striding="linear", denoise=False,
                    generator=torch.Generator().manual_seed(3))
    with_denoise = cf.sample(run.score_fn, (20, 2), run.sde, steps=4, method="em", striding="linear",
                             generator=torch.Generator().manual_seed(3))
    assert res.nfe == 4 and torch.equal(res.x, ref.x) and not torch.equal(res.x, with_denoise.x)


def test_likelihood_settings_reach_cf_likelihood():
    run = _toy_run(likelihood_rtol=1e-2, likelihood_atol=1e-2, likelihood_hutchinson_type="gaussian")
    assert run.likelihood_options == {"rtol": 1e-2, "atol": 1e-2, "probe": "gaussian"}
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    a = run.likelihood(x, generator=torch.Generator().manual_seed(3))
    b = cf.likelihood(run.score_fn, x, run.sde, eps=1e-5, rtol=1e-2, atol=1e-2, probe="gaussian",
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.bpd, b.bpd)
    with pytest.raises(ValueError, match="likelihood_hutchinson_type"):
        _toy_run(likelihood_hutchinson_type="sphere")


# The official configs/default_celeba_post_paper.txt + specific_celeba_post_paper.txt (nv-tlabs/CLD-SGM),
# network, SDE, objective and sampling keys, written out here.
OFFICIAL_CELEBA_POST_PAPER = dict(
    is_image=True, image_size=256, image_channels=3, sampling_method="ode", sampling_eps=1e-3, denoising=True,
    name="ncsnpp", normalization="GroupNorm", nonlinearity="swish", n_channels=128, ch_mult="1,1,2,2,2,2,2",
    attn_resolutions="16", resamp_with_conv=True, use_fir=False, fir_kernel="1,3,3,1", skip_rescale=True,
    resblock_type="biggan", progressive="none", progressive_input="none", progressive_combine="sum",
    attention_type="ddpm", init_scale=0.0, fourier_scale=16, conv_size=3, embedding_type="positional",
    mixed_score=True, n_resblocks=4, numerical_eps=1e-6, sde="cld", beta_type="linear", beta0=0.1, beta1=6.9,
    m_inv=4.0, gamma=0.04, dropout=0.1, cld_objective="hsm", loss_eps=1e-3, weighting="reweightedv2")


def test_celebahq256_preset_is_the_official_post_paper_config():
    preset = get_config("celebahq256")
    given = {k: preset[k] for k in OFFICIAL_CELEBA_POST_PAPER if k in preset}
    assert given == {k: OFFICIAL_CELEBA_POST_PAPER[k] for k in given}
    # the keys the preset leaves out are the official defaults from_official fills in
    assert set(OFFICIAL_CELEBA_POST_PAPER) - set(given) == {"is_image", "sampling_method", "sampling_eps", "denoising"}
    flat = dict(preset, n_channels=8, image_size=16, ch_mult="1,2", n_resblocks=1, attn_resolutions="4")
    torch.manual_seed(0)
    run = cf.from_official(flat, build_model(flat))
    assert (run.method, run.eps, run.denoise, run.shape[1:]) == ("ode", 1e-3, True, (3, 16, 16))
    assert run.sde == cf.CLD(beta0=0.1, beta1=6.9, numerical_eps=1e-6)


def test_dropin_page_from_official_snippet_gives_the_official_settings():
    import pathlib
    import re

    page = (pathlib.Path(__file__).parent.parent / "docs" / "dropin.md").read_text()
    section = page.split("## From the official code in one line", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "from_official" in b]
    assert blocks, "docs/dropin.md: no from_official snippet in 'From the official code in one line'"
    scope = {}
    exec(compile(blocks[0], "docs/dropin.md:from_official", "exec"), scope)
    assert scope["res"].x.shape == (4, 3, 8, 8) and scope["res"].nfe == 20
    assert scope["run"].sde == cf.CLD(numerical_eps=1e-9)  # the tiny preset's SDE keys: official CIFAR-10
