"""NCSN++ of cld_fast.models: official layout, forward/backward, precision, memory format, compile.

Relative error throughout: max|a - b| / max|b|.
"""
import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch

from cld_fast.models import NCSNpp, NCSNppConfig, build_model, get_config, load_official_checkpoint

FIX = Path(__file__).parent / "fixtures" / "official_cld_sgm"


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def cifar10_model():
    torch.manual_seed(0)
    return build_model("cifar10")


@pytest.fixture(scope="module")
def small_config():
    return json.loads((FIX / "official_small_config.json").read_text())


@pytest.fixture(scope="module")
def small_io():
    return torch.load(FIX / "official_small_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def small_net(small_config):
    return load_official_checkpoint(FIX / "official_small_checkpoint.pth", config=small_config, use_ema=True)


def test_cifar10_state_dict_matches_official_keys_and_shapes(cifar10_model):
    ref = []
    for line in (FIX / "official_cifar10_state_dict_keys.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            ref.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    mine = [(k, tuple(v.shape)) for k, v in cifar10_model.state_dict().items()]
    assert len(mine) == len(ref) == 963
    assert mine == ref  # same keys, same shapes, same order
    assert sum(p.numel() for p in cifar10_model.parameters()) == 107_593_987
    # The Fourier W is frozen (not trainable, not part of the official EMA list).
    assert not cifar10_model.all_modules[0].W.requires_grad
    assert sum(p.requires_grad for p in cifar10_model.parameters()) == 962


@pytest.mark.long
def test_cifar10_forward_backward_batch1(cifar10_model):
    net = cifar10_model.train()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 6, 32, 32, generator=g)
    t = torch.tensor([0.37])
    net.zero_grad(set_to_none=True)
    out = net(u, t)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (out.square().mean() + out.mean()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(gr is not None for gr in grads)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().max() > 0 for gr in grads)
    assert net.all_modules[0].W.grad is None
    net.zero_grad(set_to_none=True)
    net.eval()


def test_bf16_autocast_close_to_fp32(small_net, small_io):
    u, t = small_io["u"], small_io["t"]
    with torch.no_grad():
        ref = small_net(u, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = small_net(u, t)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel(out.float(), ref) < 2e-2


def test_channels_last_matches_contiguous(small_net, small_io):
    u, t = small_io["u"], small_io["t"]
    with torch.no_grad():
        ref = small_net(u, t)
        out = small_net(u.contiguous(memory_format=torch.channels_last), t)
    assert rel(out, ref) < 1e-5
    net_cl = load_official_checkpoint(FIX / "official_small_checkpoint.pth",
                                      config=json.loads((FIX / "official_small_config.json").read_text()))
    net_cl = net_cl.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out2 = net_cl(u.contiguous(memory_format=torch.channels_last), t)
    assert rel(out2, ref) < 1e-5


def test_torch_compile_smoke(small_net, small_io):
    # Dynamo capture of the whole network in one graph (aot_eager: no C++ compile, a few seconds).
    torch._dynamo.reset()
    compiled = torch.compile(small_net, backend="aot_eager", fullgraph=True)
    u, t = small_io["u"], small_io["t"]
    with torch.no_grad():
        out = compiled(u, t)
        ref = small_net(u, t)
    assert rel(out, ref) < 1e-5
    torch._dynamo.reset()


def test_time_is_log_fourier_of_forward_time(small_net, small_io):
    # The official network embeds log(t) with the Fourier projection: check module 0 sees log t.
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0]

    h = small_net.all_modules[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            small_net(small_io["u"], small_io["t"])
    finally:
        h.remove()
    assert torch.allclose(seen["x"], torch.log(small_io["t"]))


def test_scalar_t_broadcast_and_shape_errors(small_net, small_io):
    torch.manual_seed(100)  # this test draws from the global RNG
    u = small_io["u"]
    with torch.no_grad():
        a = small_net(u, torch.tensor(0.3))
        b = small_net(u, torch.full((3,), 0.3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        small_net(u[:, :3], small_io["t"])
    with pytest.raises(ValueError):
        small_net(u, torch.rand(2))


def test_presets_and_get_config_copy():
    c = get_config("cifar10")
    assert c["n_channels"] == 128 and c["ch_mult"] == "1,2,2,2" and c["n_resblocks"] == 8
    assert c["attn_resolutions"] == "16" and c["progressive_input"] == "residual"
    assert c["embedding_type"] == "fourier" and c["fourier_scale"] == 16 and c["dropout"] == 0.1
    c["n_channels"] = 1
    assert get_config("cifar10")["n_channels"] == 128  # a copy
    with pytest.raises(ValueError):
        get_config("imagenet")
    cfg = NCSNppConfig.from_dict(get_config("cifar10"))
    assert cfg.ch_mult == (1, 2, 2, 2) and cfg.fir_kernel == (1.0, 3.0, 3.0, 1.0)
    assert cfg.in_channels == 6 and cfg.out_channels == 3
    assert NCSNppConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        NCSNppConfig.from_dict({"n_chanels": 3}, strict=True)
    with pytest.raises(NotImplementedError):
        NCSNppConfig(progressive="pyramid")


def test_tiny_preset_forward():
    torch.manual_seed(101)  # this test draws from the global RNG
    net = build_model("tiny")
    assert isinstance(net, NCSNpp)
    assert sum(p.numel() for p in net.parameters()) < 100_000
    out = net(torch.randn(2, 6, 8, 8), torch.rand(2) * 0.9 + 0.1)
    assert out.shape == (2, 3, 8, 8)


# Official CelebA-HQ-256 values (configs/specific_celeba_*.txt as transcribed in the fork
# dashstander/CLD-SGM configs/celeba_cog.yaml; see models/configs.py), written out here by hand.
OFFICIAL_CELEBAHQ256 = {
    "image_size": 256, "image_channels": 3, "name": "ncsnpp", "normalization": "GroupNorm",
    "nonlinearity": "swish", "n_channels": 128, "ch_mult": "1,1,2,2,2,2,2", "attn_resolutions": "16",
    "resamp_with_conv": True, "use_fir": False, "fir_kernel": "1,3,3,1", "skip_rescale": True,
    "resblock_type": "biggan", "progressive": "none", "progressive_input": "none",
    "progressive_combine": "sum", "attention_type": "ddpm", "init_scale": 0.0, "fourier_scale": 16,
    "conv_size": 3, "embedding_type": "positional", "mixed_score": True, "n_resblocks": 4,
    "numerical_eps": 1e-6, "sde": "cld", "beta_type": "linear", "beta0": 0.1, "beta1": 6.9, "m_inv": 4.0,
    "gamma": 0.04, "dropout": 0.1, "cld_objective": "hsm", "loss_eps": 1e-3, "weighting": "reweightedv2",
}


def test_celebahq256_preset_has_the_official_values():
    cfg = get_config("celebahq256")
    assert {k: cfg.get(k) for k in OFFICIAL_CELEBAHQ256} == OFFICIAL_CELEBAHQ256
    assert get_config("celebahq")["beta1"] == 6.9  # alias


def test_celebahq256_preset_builds():
    torch.manual_seed(102)  # this test draws from the global RNG
    from cld_fast.models import layers

    cfg = get_config("celebahq256")
    # Same architecture at a reduced width, run at a reduced resolution (7 levels need H >= 64).
    small = dict(cfg, n_channels=8, image_size=64, attn_resolutions="4")
    net = build_model(small)
    assert not any(isinstance(m, layers.Combine) for m in net.modules())  # progressive_input none
    assert "all_modules.0.W" not in net.state_dict()  # positional embedding: no Fourier weights
    with torch.no_grad():
        out = net(torch.randn(1, 6, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5]))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("key,value", [("attention_type", "legacy"), ("normalization", "InstanceNorm++")])
def test_keys_the_official_ncsnpp_ignores_warn_and_change_nothing(key, value):
    with pytest.warns(UserWarning, match=f"{key} .* is ignored"):
        cfg = NCSNppConfig.from_dict(dict(get_config("tiny"), **{key: value}))
    torch.manual_seed(3)
    net = NCSNpp(cfg)
    torch.manual_seed(3)
    ref = build_model("tiny")
    assert list(net.state_dict()) == list(ref.state_dict())
    u = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(net.eval()(u, t), ref.eval()(u, t))


@pytest.mark.parametrize("rb,prog,pin,comb", [
    (rb, prog, pin, comb)
    for rb, prog, pin, comb in itertools.product(["biggan", "ddpm"], ["none", "output_skip", "residual"],
                                                 ["none", "input_skip", "residual"], ["sum", "cat"])
    if comb == "sum" or pin == "input_skip"])
def test_architecture_options_run(rb, prog, pin, comb):
    torch.manual_seed(103)  # this test draws from the global RNG
    cfg = dict(get_config("tiny"), resblock_type=rb, progressive=prog, progressive_input=pin,
               progressive_combine=comb, ch_mult="1,2,2")
    net = build_model(cfg)
    u = torch.randn(2, 6, 8, 8, requires_grad=True)
    out = net(u, torch.tensor([0.2, 0.9]))
    assert out.shape == (2, 3, 8, 8)
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("emb,fir,rwc,skip", list(itertools.product(["fourier", "positional"], [True, False],
                                                                    [True, False], [True, False])))
def test_embedding_and_resampling_options_run(emb, fir, rwc, skip):
    torch.manual_seed(104)  # this test draws from the global RNG
    cfg = dict(get_config("tiny"), embedding_type=emb, use_fir=fir, resamp_with_conv=rwc, skip_rescale=skip,
               resblock_type="ddpm", progressive="residual", progressive_input="residual")
    net = build_model(cfg)
    out = net(torch.randn(1, 6, 8, 8), torch.tensor([0.5]))
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()


def test_non_cld_input_channels():
    torch.manual_seed(105)  # this test draws from the global RNG
    net = build_model(dict(get_config("tiny"), sde="vpsde"))
    assert net(torch.randn(1, 3, 8, 8), torch.tensor([0.5])).shape == (1, 3, 8, 8)


def test_half_precision_weights_warn_about_fourier_phases():
    torch.manual_seed(106)  # this test draws from the global RNG
    from cld_fast.models.layers import GaussianFourierProjection
    GaussianFourierProjection._warned = False
    net = build_model("tiny").to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = net(torch.randn(1, 6, 8, 8, dtype=torch.bfloat16), torch.tensor([0.5]))
    assert out.dtype == torch.bfloat16
    assert any("half precision" in str(w.message) for w in rec)


# ---- configurations the network cannot run -----------------------------------------------------------


def test_build_model_rejects_image_sizes_the_network_cannot_run():
    from cld_fast.models import build_model, get_config

    for size, ch_mult, ok in ((8, "1,2", True), (9, "1,2", False), (12, "1,2,2", True), (6, "1,2,2", False),
                              (4, "1,2,2", True), (2, "1,2,2", False)):
        cfg = dict(get_config("tiny"), image_size=size, ch_mult=ch_mult)
        if ok:
            net = build_model(cfg)
            assert net(torch.randn(1, 6, size, size), torch.full((1,), 0.5)).shape == (1, 3, size, size)
        else:
            with pytest.raises(ValueError, match=f"image_size {size} cannot run through"):
                build_model(cfg)


def test_unknown_model_options_are_rejected():
    from cld_fast.config import TrainConfig

    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['hidn'\]"):
        TrainConfig(model="toy2d", model_overrides={"hidn": 3})
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['n_channel'\]"):
        TrainConfig(model="tiny", model_overrides={"n_channel": 8})
    assert TrainConfig(model="tiny", model_overrides={"n_channels": 8}).model_overrides == {"n_channels": 8}
    with pytest.raises(ValueError, match="grad_clip must be a finite number"):
        TrainConfig(grad_clip=float("nan"))


def _group_norm_reference(x, groups, weight, bias, eps=1e-6):
    """GroupNorm written out in float64: statistics over (C / groups, H, W) per sample and group."""
    b, c, h, w = x.shape
    g = x.double().reshape(b, groups, c // groups * h * w)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)


def test_official_network_group_norms_have_the_official_group_count(cifar10_model):
    # the official NCSN++ builds every GroupNorm with min(channels // 4, 32) groups
    norms = [m for m in cifar10_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and max(m.num_channels for m in norms) >= 256
    for m in norms:
        assert m.num_groups == min(m.num_channels // 4, 32), (m.num_channels, m.num_groups)
        assert m.eps == 1e-6
    # and the computation is that of 32 groups at 128 channels (not of 16, which has the same shapes)
    gn = next(m for m in norms if m.num_channels == 128)
    torch.manual_seed(7)
    x = torch.randn(2, 128, 4, 4) * torch.linspace(0.1, 3.0, 128).view(1, 128, 1, 1)
    with torch.no_grad():
        w, b = torch.randn(128), torch.randn(128)
        gn_w, gn_b = gn.weight.clone(), gn.bias.clone()
        gn.weight.copy_(w), gn.bias.copy_(b)
        try:
            got = gn(x)
        finally:
            gn.weight.copy_(gn_w), gn.bias.copy_(gn_b)
    assert rel(got, _group_norm_reference(x, 32, w, b)) < 1e-5


def test_fourier_scale_sets_the_frequencies():
    got = {}
    for scale in (1.0, 16.0, 0.25):
        torch.manual_seed(11)
        net = build_model(dict(get_config("tiny"), embedding_type="fourier", fourier_scale=scale))
        got[scale] = net.all_modules[0].W.detach().clone()
    assert torch.allclose(got[16.0], 16.0 * got[1.0]) and torch.allclose(got[0.25], 0.25 * got[1.0])
    assert 0.5 < got[1.0].std().item() < 1.5  # N(0, scale^2) frequencies


@pytest.mark.parametrize("fir", [False, True])
def test_ddpm_downsampling_without_conv_is_average_pooling(fir):
    import torch.nn.functional as F

    from cld_fast.models import layers

    torch.manual_seed(12)
    net = build_model(dict(get_config("tiny"), resblock_type="ddpm", resamp_with_conv=False, use_fir=fir,
                           progressive="none", progressive_input="none"))
    downs = [m for m in net.modules() if isinstance(m, layers.Downsample)]
    assert downs
    x = torch.randn(2, downs[0].out_ch, 8, 8)
    for m in downs:
        assert not list(m.parameters())  # no learned convolution
        if not fir:  # the official non-FIR path: 2x2 average pooling
            assert torch.equal(m(x), F.avg_pool2d(x, 2, stride=2))
        else:  # the FIR [1, 3, 3, 1] / 8 filter (both axes, zero padding 1), then every second pixel
            c = x.shape[1]
            k1 = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8.0
            k = (k1[:, None] * k1[None, :]).expand(c, 1, 4, 4)
            want = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, groups=c)[:, :, ::2, ::2]
            assert rel(m(x), want) < 1e-6


def test_downsample_without_conv_on_odd_sizes_matches_average_pooling():
    import torch.nn.functional as F

    from cld_fast.models import layers

    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(layers.Downsample(4, with_conv=False)(x), F.avg_pool2d(x, 2, stride=2))


# ---- class-conditional NCSN++ ----------------------------------------------------------------------
def _conditional(num_classes=3):
    torch.manual_seed(0)
    net = build_model(dict(get_config("tiny"), image_channels=1, num_classes=num_classes)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: no zero-initialised layers, an embedding that matters
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


def test_conditional_network_labels_and_no_label():
    net = _conditional()
    g = torch.Generator().manual_seed(0)
    u, t = torch.randn(4, 2, 8, 8, generator=g), torch.rand(4, generator=g) * 0.9 + 0.1
    with torch.no_grad():
        none = net(u, t)
        k = net(u, t, torch.full((4,), 3))
        a, b = net(u, t, torch.tensor([0, 0, 0, 0])), net(u, t, torch.tensor([1, 1, 1, 1]))
        mixed = net(u, t, torch.tensor([0, 1, 0, 1]))
    assert torch.equal(none, k)  # no labels = the "no label" entry K
    assert rel(a, b) > 1e-2
    torch.testing.assert_close(mixed[0::2], a[0::2])
    torch.testing.assert_close(mixed[1::2], b[1::2])
    # the embedding is added to the time embedding: equal to shifting the Dense layers' input
    temb = net._time_embedding(t) + net.label_embedding(torch.tensor([0, 0, 0, 0]))
    assert temb.shape == (4, 4 * net.n_channels)


def test_conditional_network_keeps_the_official_layout_and_checks_labels():
    uncond = build_model("tiny")
    cond = build_model(dict(get_config("tiny"), num_classes=10))
    extra = set(cond.state_dict()) - set(uncond.state_dict())
    assert extra == {"label_embedding.weight"} and cond.label_embedding.weight.shape == (11, 32)
    assert uncond.num_classes == 0 and cond.num_classes == 10
    assert NCSNppConfig.from_dict(dict(get_config("tiny"), num_classes=10)).to_dict()["num_classes"] == 10
    u, t = torch.randn(2, 6, 8, 8), torch.rand(2) + 0.1
    with pytest.raises(ValueError, match="class_labels given to an unconditional network"):
        uncond(u, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class_labels must be a \(B,\) = \(2,\) int64 tensor"):
        cond(u, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        NCSNppConfig.from_dict(dict(get_config("tiny"), num_classes=-1))
