"""Block-level checks of the less-used NCSN++ options against the published formulas (score_sde /
CLD-SGM NCSN++): the DDPM residual block, and the progressive output ('residual', 'output_skip') and
input ('residual', 'input_skip' with 'sum' / 'cat') pyramids, including their 1/sqrt(2) skip scaling.

The residual block is recomputed with functional ops. The pyramids are checked on a whole network:
forward hooks record every top-level block call in order, and each combination the architecture
prescribes (e.g. next input = (Upsample(pyramid) + h) / sqrt(2)) is recomputed from the recorded
tensors. All weights are re-drawn from a seeded generator so that no branch is ~0 (init_scale = 0
would make the last convolutions 1e-10 and hide a missing term).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cld_fast.models import layers
from cld_fast.models.ncsnpp import NCSNpp, NCSNppConfig

SQRT2 = math.sqrt(2.0)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _gn(x, channels, norm):
    return F.group_norm(x, min(channels // 4, 32), norm.weight, norm.bias, eps=1e-6)


@pytest.mark.parametrize("skip_rescale", [True, False])
@pytest.mark.parametrize("in_ch, out_ch, conv_shortcut", [(8, 8, False), (8, 16, False), (8, 16, True)])
def test_ddpm_resblock_matches_published_formula(skip_rescale, in_ch, out_ch, conv_shortcut):
    torch.manual_seed(0)
    block = layers.ResnetBlockDDPMpp(torch.nn.SiLU(), in_ch, out_ch, temb_dim=12, conv_shortcut=conv_shortcut,
                                     dropout=0.5, skip_rescale=skip_rescale)
    _randomize(block, 1).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, in_ch, 6, 6, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    block = block.double()
    got = block(x, temb)
    h = F.conv2d(F.silu(_gn(x, in_ch, block.GroupNorm_0)), block.Conv_0.weight, block.Conv_0.bias, padding=1)
    h = h + F.linear(F.silu(temb), block.Dense_0.weight, block.Dense_0.bias)[:, :, None, None]
    h = F.silu(_gn(h, out_ch, block.GroupNorm_1))  # dropout is the identity in eval mode
    h = F.conv2d(h, block.Conv_1.weight, block.Conv_1.bias, padding=1)
    if in_ch != out_ch:
        if conv_shortcut:
            x = F.conv2d(x, block.Conv_2.weight, block.Conv_2.bias, padding=1)
        else:  # NIN: a per-pixel dense layer, sum_c x[b, c] W[c, o] + b[o]
            x = torch.einsum("bchw,co->bohw", x, block.NIN_0.W) + block.NIN_0.b[:, None, None]
    want = (x + h) / SQRT2 if skip_rescale else x + h
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["sum", "cat"])
def test_combine_matches_published_formula(method):
    comb = _randomize(layers.Combine(3, 8, method=method), 3).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    proj = F.conv2d(x, comb.Conv_0.weight, comb.Conv_0.bias)
    want = proj + y if method == "sum" else torch.cat([proj, y], 1)
    torch.testing.assert_close(comb(x, y), want, rtol=1e-12, atol=1e-12)


def _net(**kw):
    cfg = dict(image_size=8, image_channels=1, n_channels=8, ch_mult=(1, 2, 2), n_resblocks=1,
               attn_resolutions=(), dropout=0.0, init_scale=0.0, use_fir=False, resamp_with_conv=True,
               progressive="none", progressive_input="none", resblock_type="biggan")
    cfg.update(kw)
    torch.manual_seed(0)
    net = _randomize(NCSNpp(NCSNppConfig(**cfg)), 5).double().eval()
    return net


def _trace(net, extra=()):
    """Run the network once, recording (module, inputs, output) of every top-level block call in order."""
    calls = []
    mods = list(net.all_modules) + [m for m in extra if m is not None]
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp, out))) for m in set(mods)]
    g = torch.Generator().manual_seed(6)
    u = torch.randn(2, net.in_channels, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    try:
        out = net(u, t)
    finally:
        for h in hooks:
            h.remove()
    return u, out, calls


@pytest.mark.parametrize("skip_rescale", [True, False])
def test_progressive_residual_output_pyramid(skip_rescale):
    net = _net(progressive="residual", skip_rescale=skip_rescale)
    _, out, calls = _trace(net)
    ups = [i for i, (m, _, _) in enumerate(calls) if isinstance(m, layers.Upsample)]
    assert len(ups) == 2  # one per level below the coarsest
    for i in ups:
        h = calls[i - 1][2]
        want = (calls[i][2] + h) / SQRT2 if skip_rescale else calls[i][2] + h
        torch.testing.assert_close(calls[i + 1][1][0], want, rtol=1e-12, atol=1e-12)


def test_progressive_output_skip_pyramid():
    net = _net(progressive="output_skip")
    _, out, calls = _trace(net, extra=(net.pyramid_upsample,))
    ups = [i for i, (m, _, _) in enumerate(calls) if m is net.pyramid_upsample]
    assert len(ups) == 2
    for k, i in enumerate(ups):
        # pyramid = Upsample(pyramid) + Conv(act(GroupNorm(h))): the conv is the second call after it
        conv_out = calls[i + 2][2]
        assert isinstance(calls[i + 2][0], torch.nn.Conv2d)
        total = calls[i][2] + conv_out
        if k + 1 < len(ups):
            torch.testing.assert_close(calls[ups[k + 1]][1][0], total, rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(out, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip_rescale", [True, False])
def test_progressive_input_residual_pyramid(skip_rescale):
    net = _net(progressive_input="residual", skip_rescale=skip_rescale)
    u, _, calls = _trace(net)
    downs = [i for i, (m, _, _) in enumerate(calls) if isinstance(m, layers.Downsample)]
    assert len(downs) == 2
    torch.testing.assert_close(calls[downs[0]][1][0], u, rtol=0, atol=0)  # the pyramid starts at the input
    for k, i in enumerate(downs):
        h = calls[i - 1][2]
        want = (calls[i][2] + h) / SQRT2 if skip_rescale else calls[i][2] + h
        torch.testing.assert_close(calls[i + 1][1][0], want, rtol=1e-12, atol=1e-12)
        if k + 1 < len(downs):  # the next pyramid step downsamples the combined tensor
            torch.testing.assert_close(calls[downs[k + 1]][1][0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combine", ["sum", "cat"])
def test_progressive_input_skip_pyramid(combine):
    net = _net(progressive_input="input_skip", progressive_combine=combine)
    u, _, calls = _trace(net, extra=(net.pyramid_downsample,))
    downs = [i for i, (m, _, _) in enumerate(calls) if m is net.pyramid_downsample]
    assert len(downs) == 2
    torch.testing.assert_close(calls[downs[0]][1][0], u, rtol=0, atol=0)
    for k, i in enumerate(downs):
        comb, (ip, h), got = calls[i + 1]
        assert isinstance(comb, layers.Combine)
        torch.testing.assert_close(ip, calls[i][2], rtol=0, atol=0)  # the downsampled input pyramid
        torch.testing.assert_close(h, calls[i - 1][2], rtol=0, atol=0)  # the features at this level
        proj = F.conv2d(ip, comb.Conv_0.weight, comb.Conv_0.bias)
        want = proj + h if combine == "sum" else torch.cat([proj, h], 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(calls[i + 2][1][0], got, rtol=0, atol=0)  # the next block gets it
        if k + 1 < len(downs):
            torch.testing.assert_close(calls[downs[k + 1]][1][0], ip, rtol=0, atol=0)
