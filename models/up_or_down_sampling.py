"""FIR up/down-sampling (StyleGAN2 ``upfirdn2d``) in plain PyTorch.

The official CLD-SGM / score_sde NCSN++ resamples feature maps with a separable FIR filter
(``[1, 3, 3, 1]`` by default) through a custom CUDA op ``upfirdn2d`` (and a reshape/pad based
fallback on CPU). This module computes the same quantities with ordinary PyTorch ops:

* ``upfirdn2d``            zero-insertion upsampling, padding, FIR filtering, decimation, written as
                           one depthwise ``conv_transpose2d`` (up) or ``conv2d`` (down / filter only);
* ``upsample_2d``          FIR upsampling by ``factor`` (depthwise ``conv_transpose2d``);
* ``downsample_2d``        FIR downsampling by ``factor`` (depthwise strided ``conv2d``);
* ``conv_downsample_2d``   FIR blur followed by a strided convolution ("conv then downsample");
* ``upsample_conv_2d``     transposed convolution followed by a FIR blur ("upsample then conv");
* ``naive_upsample_2d`` / ``naive_downsample_2d``  nearest-neighbour / box resampling;
* ``Conv2d``               the parameterised resampling convolution used by NCSN++ (``weight``, ``bias``).

Conventions (identical to StyleGAN2 / score_sde): the FIR kernel ``k`` is a 1-D sequence (made
separable by an outer product) or a 2-D array; it is normalised to sum to one and multiplied by
``gain`` (and by ``factor**2`` when upsampling, so that a constant image keeps its value); filtering
is a true convolution (the kernel is flipped), pixels outside the image are zero.

All functions take and return tensors of shape ``(N, C, H, W)`` in any floating dtype (float32,
float16, bfloat16), in contiguous or ``channels_last`` memory format, and work under autocast and
``torch.compile``. No custom CUDA ops are used.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

KernelLike = Union[Sequence[float], Sequence[Sequence[float]], torch.Tensor]

__all__ = [
    "setup_kernel",
    "upfirdn2d",
    "upsample_2d",
    "downsample_2d",
    "conv_downsample_2d",
    "upsample_conv_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
    "Conv2d",
]


def setup_kernel(k: KernelLike, gain: float = 1.0) -> torch.Tensor:
    """Return the normalised 2-D FIR kernel for ``k`` as a float32 CPU tensor.

    Args:
        k: 1-D sequence of length K (made separable: ``outer(k, k)``) or a square 2-D array (K, K).
        gain: scale applied after normalisation to unit sum.

    Returns:
        float32 tensor of shape (K, K) whose entries sum to ``gain``.
    """
    kt = torch.as_tensor(k, dtype=torch.float64).detach().cpu()
    if kt.ndim == 1:
        kt = torch.outer(kt, kt)
    if kt.ndim != 2 or kt.shape[0] != kt.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(kt.shape)}")
    kt = kt / kt.sum()
    return (kt * gain).to(torch.float32)


def _kernel_for(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Depthwise weight (C, 1, K, K) with ``x``'s dtype/device from a 2-D kernel (K, K)."""
    c = x.shape[1]
    k = k.to(device=x.device, dtype=x.dtype)
    return k[None, None].expand(c, 1, k.shape[0], k.shape[1])


def _pad_arg(pad: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(pad, int):
        return pad, pad
    p0, p1 = pad
    return int(p0), int(p1)


def _fir_filter(x: torch.Tensor, k: torch.Tensor, pad: Tuple[int, int], down: int = 1) -> torch.Tensor:
    """Pad by ``pad`` (both spatial axes), convolve with the 2-D kernel ``k``, keep every ``down``-th pixel.

    This is ``upfirdn2d`` with ``up=1``: a depthwise cross-correlation with the flipped kernel.
    Negative pads crop, as in the reference.
    """
    p0, p1 = pad
    w = _kernel_for(x, torch.flip(k, [0, 1]))
    if p0 == p1 and p0 >= 0:
        return F.conv2d(x, w, stride=down, padding=p0, groups=x.shape[1])
    if p0 >= 0 and p1 >= 0:
        x = F.pad(x, (p0, p1, p0, p1))
    else:
        x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
        h, w_ = x.shape[-2], x.shape[-1]
        x = x[..., max(-p0, 0): h - max(-p1, 0), max(-p0, 0): w_ - max(-p1, 0)]
    return F.conv2d(x, w, stride=down, groups=x.shape[1])


def _fir_upsample(x: torch.Tensor, k: torch.Tensor, up: int, pad: Tuple[int, int]) -> torch.Tensor:
    """``upfirdn2d`` with ``up > 1`` and ``down = 1`` as one depthwise ``conv_transpose2d``.

    With zero insertion z[up*j] = x[j], left pad p0 and true convolution by k (length K), the output
    is y[o] = sum_j x[j] k[o + s - up*j] with s = K - 1 - p0, i.e. the full transposed convolution
    ``full[i] = sum_j x[j] k[i - up*j]`` (length L = (H-1)*up + K, zero outside) read at i = o + s.
    When that window lies inside the symmetric crop of ``conv_transpose2d(padding=s)`` it is
    computed directly; otherwise the full result is padded/cropped.
    """
    p0, p1 = pad
    kk = k.shape[0]
    h, w_ = x.shape[-2], x.shape[-1]
    out_h = h * up + p0 + p1 - kk + 1
    out_w = w_ * up + p0 + p1 - kk + 1
    s = kk - 1 - p0
    len_h = (h - 1) * up + kk
    len_w = (w_ - 1) * up + kk
    weight = _kernel_for(x, k)
    if s >= 0 and s + out_h <= len_h - s and s + out_w <= len_w - s:
        y = F.conv_transpose2d(x, weight, stride=up, padding=s, groups=x.shape[1])
        if y.shape[-2] != out_h or y.shape[-1] != out_w:
            y = y[..., :out_h, :out_w]
        return y
    y = F.conv_transpose2d(x, weight, stride=up, padding=0, groups=x.shape[1])
    # F.pad with negative amounts crops; positive amounts add the zeros that lie outside `full`.
    return F.pad(y, (-s, s + out_w - len_w, -s, s + out_h - len_h))


def upfirdn2d(x: torch.Tensor, k: KernelLike, up: int = 1, down: int = 1,
              pad: Union[int, Tuple[int, int]] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter and downsample, like StyleGAN2's ``upfirdn2d``.

    Args:
        x: (N, C, H, W) floating tensor.
        k: the FIR kernel *as used* (a (K, K) tensor or array, or a 1-D sequence made separable);
           unlike :func:`upsample_2d` it is not normalised here.
        up, down: integer up/down-sampling factors (same on both axes).
        pad: ``(pad0, pad1)`` before/after padding on both spatial axes (applied after zero insertion).

    Returns:
        (N, C, (H*up + pad0 + pad1 - K) // down + 1, same for W), dtype of ``x``.
    """
    kt = torch.as_tensor(k, dtype=torch.float32)
    if kt.ndim == 1:
        kt = torch.outer(kt, kt)
    p = _pad_arg(pad)
    if up == 1:
        return _fir_filter(x, kt, p, down)
    y = _fir_upsample(x, kt, up, p)
    if down > 1:
        y = y[..., ::down, ::down]
    return y


def upsample_2d(x: torch.Tensor, k: Optional[KernelLike] = None, factor: int = 2, gain: float = 1.0,
                *, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FIR upsampling of a batch of images (StyleGAN2 ``upsample_2d``).

    Args:
        x: (N, C, H, W) floating tensor.
        k: FIR kernel (1-D separable or 2-D); default ``[1] * factor`` (nearest neighbour).
        factor: integer upsampling factor.
        gain: signal gain (a constant image is multiplied by ``gain``).
        kernel: optional precomputed ``setup_kernel(k, gain * factor**2)`` (skips the setup).

    Returns:
        (N, C, H * factor, W * factor), dtype of ``x``.
    """
    assert isinstance(factor, int) and factor >= 1
    if kernel is None:
        kernel = setup_kernel([1] * factor if k is None else k, gain * factor ** 2)
    p = kernel.shape[0] - factor
    return _fir_upsample(x, kernel, factor, ((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: Optional[KernelLike] = None, factor: int = 2, gain: float = 1.0,
                  *, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FIR downsampling of a batch of images (StyleGAN2 ``downsample_2d``).

    Args:
        x: (N, C, H, W) floating tensor.
        k: FIR kernel (1-D separable or 2-D); default ``[1] * factor`` (average pooling).
        factor: integer downsampling factor.
        gain: signal gain.
        kernel: optional precomputed ``setup_kernel(k, gain)``.

    Returns:
        (N, C, H // factor, W // factor) for H, W divisible by ``factor``; dtype of ``x``.
    """
    assert isinstance(factor, int) and factor >= 1
    if kernel is None:
        kernel = setup_kernel([1] * factor if k is None else k, gain)
    p = kernel.shape[0] - factor
    return _fir_filter(x, kernel, ((p + 1) // 2, p // 2), factor)


def conv_downsample_2d(x: torch.Tensor, w: torch.Tensor, k: Optional[KernelLike] = None, factor: int = 2,
                       gain: float = 1.0, *, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused convolution + FIR downsampling (StyleGAN2 ``conv_downsample_2d``): blur, then strided conv.

    Args:
        x: (N, Cin, H, W) floating tensor.
        w: conv weight (Cout, Cin, kh, kw) with kh == kw odd (no bias is added here).
        k: FIR kernel; default ``[1] * factor``.
        factor: downsampling factor.
        gain: signal gain.
        kernel: optional precomputed ``setup_kernel(k, gain)``.

    Returns:
        (N, Cout, H // factor, W // factor), dtype of ``x`` (or the autocast dtype).
    """
    assert isinstance(factor, int) and factor >= 1
    conv_h, conv_w = w.shape[-2], w.shape[-1]
    assert conv_h == conv_w
    if kernel is None:
        kernel = setup_kernel([1] * factor if k is None else k, gain)
    p = (kernel.shape[0] - factor) + (conv_w - 1)
    x = _fir_filter(x, kernel, ((p + 1) // 2, p // 2), 1)
    return F.conv2d(x, w, stride=factor, padding=0)


def upsample_conv_2d(x: torch.Tensor, w: torch.Tensor, k: Optional[KernelLike] = None, factor: int = 2,
                     gain: float = 1.0, *, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused upsampling + convolution (StyleGAN2 ``upsample_conv_2d``): transposed conv, then FIR blur.

    The weight is used the way StyleGAN2 uses it: transposed and spatially flipped so that the
    result equals ``conv2d(upsample_2d(x, k), w, padding=kh // 2)`` up to border effects.
    (The PyTorch port in score_sde writes the flip as ``w[..., ::-1, ::-1]``, which PyTorch rejects,
    so that code path never ran there; this implementation uses ``torch.flip``.)

    Args:
        x: (N, Cin, H, W) floating tensor.
        w: conv weight (Cout, Cin, kh, kw), kh == kw.
        k: FIR kernel; default ``[1] * factor``.
        factor: upsampling factor.
        gain: signal gain.
        kernel: optional precomputed ``setup_kernel(k, gain * factor**2)``.

    Returns:
        (N, Cout, H * factor, W * factor).
    """
    assert isinstance(factor, int) and factor >= 1
    assert w.ndim == 4
    conv_h, conv_w = w.shape[-2], w.shape[-1]
    assert conv_h == conv_w
    in_c, out_c = w.shape[1], w.shape[0]
    if kernel is None:
        kernel = setup_kernel([1] * factor if k is None else k, gain * factor ** 2)
    p = (kernel.shape[0] - factor) - (conv_w - 1)
    num_groups = x.shape[1] // in_c
    wt = w.reshape(num_groups, -1, in_c, conv_h, conv_w)
    wt = torch.flip(wt, [3, 4]).permute(0, 2, 1, 3, 4)
    wt = wt.reshape(num_groups * in_c, -1, conv_h, conv_w)
    x = F.conv_transpose2d(x, wt, stride=factor, padding=0, groups=num_groups)
    return _fir_filter(x, kernel, ((p + 1) // 2 + factor - 1, p // 2 + 1), 1)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: (N, C, H, W) -> (N, C, H*factor, W*factor)."""
    return torch.repeat_interleave(torch.repeat_interleave(x, factor, dim=-2), factor, dim=-1)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Box (mean) downsampling: (N, C, H, W) -> (N, C, H//factor, W//factor)."""
    return F.avg_pool2d(x, factor, stride=factor)


class Conv2d(nn.Module):
    """Convolution with optional FIR up- or down-sampling (StyleGAN2 / score_sde ``Conv2d``).

    Parameters (state_dict keys): ``weight`` (out_ch, in_ch, kernel, kernel) and ``bias`` (out_ch,).

    Args:
        in_ch, out_ch: channel counts.
        kernel: odd convolution size.
        up / down: fused upsample-then-conv / conv-then-downsample by 2 (at most one).
        resample_kernel: the FIR kernel (default [1, 3, 3, 1]).
        use_bias: add a bias.
        kernel_init: callable ``shape -> tensor`` initialising the weight (zeros if None).

    Forward: (N, in_ch, H, W) -> (N, out_ch, H', W') with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[float] = (1, 3, 3, 1), use_bias: bool = True,
                 kernel_init=None):
        super().__init__()
        assert not (up and down)
        assert kernel >= 1 and kernel % 2 == 1
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
        if kernel_init is not None:
            self.weight.data = kernel_init(self.weight.data.shape)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up = up
        self.down = down
        self.resample_kernel = tuple(resample_kernel)
        self.kernel = kernel
        self.use_bias = use_bias
        gain = 4.0 if up else 1.0  # factor ** 2 for upsampling, factor 2
        self.register_buffer("fir", setup_kernel(self.resample_kernel, gain), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, kernel=self.fir)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, kernel=self.fir)
        else:
            x = F.conv2d(x, self.weight, stride=1, padding=self.kernel // 2)
        if self.use_bias:
            x = x + self.bias.reshape(1, -1, 1, 1).to(x.dtype)
        return x
