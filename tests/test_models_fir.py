"""FIR up/down-sampling of cld_fast.models against a direct float64 transcription of upfirdn2d.

The reference below is the textbook definition of StyleGAN2's ``upfirdn2d`` (zero insertion, zero
padding with negative pads cropping, true 2-D convolution with the kernel, decimation), evaluated
in float64 with explicit loops; the production code uses grouped (transposed) convolutions.
Relative error is max|a - b| / max|b|.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cld_fast.models import up_or_down_sampling as ups


def ref_upfirdn2d(x, k, up=1, down=1, pad=(0, 0)):
    k = torch.as_tensor(np.asarray(k, dtype=np.float64))
    if k.ndim == 1:
        k = torch.outer(k, k)
    x = x.double()
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * up, w * up, dtype=torch.float64)
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    z = F.pad(z, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    hh, ww = z.shape[-2:]
    z = z[..., max(-p0, 0): hh - max(-p1, 0), max(-p0, 0): ww - max(-p1, 0)]
    kk = k.shape[0]
    oh, ow = z.shape[-2] - kk + 1, z.shape[-1] - kk + 1
    out = torch.zeros(n, c, oh, ow, dtype=torch.float64)
    for a in range(kk):
        for b in range(kk):
            out += z[..., a:a + oh, b:b + ow] * k[kk - 1 - a, kk - 1 - b]
    return out[..., ::down, ::down]


def ref_setup(k, gain):
    k = np.asarray(k, dtype=np.float64)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / k.sum() * gain


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


KERNELS = [[1, 3, 3, 1], [1, 2, 5, 1], [1, 1], [1, 2, 1], [1, 4, 6, 4, 1]]


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("factor", [2, 3])
def test_upsample_downsample_match_reference(kern, factor):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 9, generator=g)
    k = ref_setup(kern, factor ** 2)
    p = k.shape[0] - factor
    ref = ref_upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))
    out = ups.upsample_2d(x, kern, factor=factor)
    assert out.shape == ref.shape == (2, 3, 6 * factor, 9 * factor)
    assert rel(out, ref) < 1e-6

    x = torch.randn(2, 3, 12, 18, generator=g)
    k = ref_setup(kern, 1)
    p = k.shape[0] - factor
    ref = ref_upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))
    out = ups.downsample_2d(x, kern, factor=factor)
    assert out.shape == ref.shape == (2, 3, 12 // factor, 18 // factor)
    assert rel(out, ref) < 1e-6


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (2, 2, (1, 3)), (3, 1, (0, 0)),
                                         (2, 1, (5, 5)), (1, 2, (-1, 2)), (2, 1, (-1, 0)), (4, 3, (1, 7))])
def test_generic_upfirdn2d_nonsymmetric_kernel(up, down, pad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 7, generator=g)
    k = torch.rand(4, 4, generator=g)
    ref = ref_upfirdn2d(x, k.numpy(), up, down, pad)
    out = ups.upfirdn2d(x, k, up, down, pad)
    assert out.shape == ref.shape
    assert rel(out, ref) < 1e-6


def test_conv_downsample_matches_official_composition():
    # official: upfirdn2d(x, k, pad=((p+1)//2, p//2)) followed by conv2d(stride=2), p = (4-2)+(3-1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    ref = F.conv2d(ref_upfirdn2d(x, ref_setup([1, 3, 3, 1], 1), pad=(2, 2)), w.double(), stride=2)
    out = ups.conv_downsample_2d(x, w, [1, 3, 3, 1])
    assert out.shape == (2, 5, 4, 4)
    assert rel(out, ref) < 1e-5


def test_upsample_conv_is_upsample_then_conv_in_the_interior():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    out = ups.upsample_conv_2d(x, w, [1, 3, 3, 1])
    ref = F.conv2d(ups.upsample_2d(x, [1, 3, 3, 1]), w, padding=1)
    assert out.shape == ref.shape == (2, 5, 16, 16)
    assert rel(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2]) < 1e-5


def test_naive_resampling_and_constant_preservation():
    torch.manual_seed(100)  # this test draws from the global RNG
    x = torch.randn(1, 2, 4, 4)
    up = ups.naive_upsample_2d(x)
    assert torch.equal(up[..., ::2, ::2], x) and torch.equal(up[..., 1::2, 1::2], x)
    assert torch.allclose(ups.naive_downsample_2d(up), x)
    c = torch.full((1, 1, 8, 8), 2.5)
    assert torch.allclose(ups.upsample_2d(c, [1, 3, 3, 1])[..., 2:-2, 2:-2], torch.tensor(2.5))
    assert torch.allclose(ups.downsample_2d(c, [1, 3, 3, 1])[..., 1:-1, 1:-1], torch.tensor(2.5))


def test_channels_last_and_bf16():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 8, 8, generator=g)
    xc = x.contiguous(memory_format=torch.channels_last)
    for fn in (ups.upsample_2d, ups.downsample_2d):
        a, b = fn(x, [1, 3, 3, 1]), fn(xc, [1, 3, 3, 1])
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
        hb = fn(x.bfloat16(), [1, 3, 3, 1])
        assert hb.dtype == torch.bfloat16 and rel(hb, a) < 1e-2
