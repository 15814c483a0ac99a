"""Building blocks of NCSN++ (score_sde ``layers.py`` / ``layerspp.py``, as used by CLD-SGM).

Attribute names inside every block (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0``,
``Conv2d_0``, ``W``, ``b``, ...) are those of the official code, so that ``state_dict`` keys of a
network built from these blocks are identical to the official ones and official checkpoints load
without renaming. Parameters are also registered in the official order (``parameters()`` order
matters for the EMA ``shadow_params`` list of official checkpoints).

Initialisation follows the official code (``variance_scaling(scale, 'fan_avg', 'uniform')``,
zero biases, ``init_scale=0`` meaning a scale of 1e-10), so freshly built networks train like the
official ones. Numerics of the forward pass follow the official code operation by operation where
float rounding could be visible (Fourier features, skip rescaling).

All image tensors are (B, C, H, W), float32/float16/bfloat16, contiguous or channels_last.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import up_or_down_sampling as ups

__all__ = [
    "variance_scaling",
    "default_init",
    "conv1x1",
    "conv3x3",
    "get_act",
    "get_timestep_embedding",
    "GaussianFourierProjection",
    "NIN",
    "Combine",
    "rename_legacy_combine_keys",
    "AttnBlockpp",
    "Upsample",
    "Downsample",
    "ResnetBlockDDPMpp",
    "ResnetBlockBigGANpp",
    "group_norm",
]

_SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------------
def variance_scaling(scale: float, mode: str, distribution: str, in_axis: int = 1, out_axis: int = 0,
                     dtype: torch.dtype = torch.float32, device="cpu") -> Callable:
    """JAX-style variance-scaling initialiser: returns ``init(shape) -> tensor`` (float32 by default).

    ``fan_in`` / ``fan_out`` are ``shape[in_axis]`` / ``shape[out_axis]`` times the receptive field
    size; the variance is ``scale / fan`` (``fan_avg`` uses their mean).
    """

    def _fans(shape):
        receptive = float(np.prod(shape)) / shape[in_axis] / shape[out_axis]
        return shape[in_axis] * receptive, shape[out_axis] * receptive

    def init(shape, dtype=dtype, device=device):
        fan_in, fan_out = _fans(shape)
        if mode == "fan_in":
            denom = fan_in
        elif mode == "fan_out":
            denom = fan_out
        elif mode == "fan_avg":
            denom = (fan_in + fan_out) / 2
        else:
            raise ValueError(f"invalid mode for variance scaling initializer: {mode}")
        variance = scale / denom
        if distribution == "normal":
            return torch.randn(*shape, dtype=dtype, device=device) * np.sqrt(variance)
        if distribution == "uniform":
            return (torch.rand(*shape, dtype=dtype, device=device) * 2.0 - 1.0) * np.sqrt(3 * variance)
        raise ValueError("invalid distribution for variance scaling initializer")

    return init


def default_init(scale: float = 1.0) -> Callable:
    """The DDPM initialiser: uniform variance scaling with ``fan_avg``; ``scale=0`` means 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    return variance_scaling(scale, "fan_avg", "uniform")


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            padding: int = 0) -> nn.Conv2d:
    """1x1 ``nn.Conv2d`` with DDPM initialisation (``weight`` (out, in, 1, 1), ``bias`` (out,))."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=padding, bias=bias)
    conv.weight.data = default_init(init_scale)(conv.weight.data.shape)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
            init_scale: float = 1.0, padding: int = 1) -> nn.Conv2d:
    """3x3 ``nn.Conv2d`` with DDPM initialisation (``weight`` (out, in, 3, 3), ``bias`` (out,))."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding,
                     dilation=dilation, bias=bias)
    conv.weight.data = default_init(init_scale)(conv.weight.data.shape)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def get_act(name: str) -> nn.Module:
    """Activation module for an official ``nonlinearity`` name: swish/silu, elu, relu, lrelu."""
    name = str(name).lower()
    if name in ("swish", "silu"):
        return nn.SiLU()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    raise NotImplementedError(f"activation function {name!r} does not exist")


def group_norm(channels: int) -> nn.GroupNorm:
    """The NCSN++ GroupNorm: ``min(channels // 4, 32)`` groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


# ----------------------------------------------------------------------------------------------
# Time embeddings
# ----------------------------------------------------------------------------------------------
def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM sinusoidal embedding: (B,) float -> (B, embedding_dim) float32 ([sin, cos], zero-padded if odd)."""
    assert timesteps.ndim == 1
    half_dim = embedding_dim // 2
    emb = math.log(max_positions) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * -emb)
    emb = timesteps.float()[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: (B,) -> (B, 2 * embedding_size) = [sin(2 pi x W), cos(2 pi x W)].

    Computed in float32 even when the module's parameters are in half precision.

    ``W`` (embedding_size,) ~ N(0, scale^2) is a frozen parameter (``requires_grad=False``): it is
    in the state_dict (key ``W``) but not among the trainable parameters (nor in EMA shadow params).
    """

    _warned = False

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, 2 * embedding_size), always computed and returned in (at least) float32.

        The arguments reach |x W 2 pi| ~ 1e3 for x = log t, so half precision would destroy the
        phase; the operation order is the official one (its rounding is visible at ~1e-5).
        """
        if self.W.dtype in (torch.float16, torch.bfloat16) and not GaussianFourierProjection._warned:
            GaussianFourierProjection._warned = True
            warnings.warn("the Fourier time-embedding weights W are stored in half precision: their rounding "
                          "(~1e-3 relative) shifts the phases 2*pi*W*log(t) by ~1 rad. Keep the network in "
                          "float32 and use autocast for mixed precision.", stacklevel=2)
        dt = torch.promote_types(x.dtype, torch.float32)
        x_proj = x.to(dt)[:, None] * self.W.to(dt)[None, :] * 2 * np.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Basic layers
# ----------------------------------------------------------------------------------------------
class NIN(nn.Module):
    """Per-pixel dense layer ("network in network"): (B, in_dim, H, W) -> (B, num_units, H, W).

    Parameters: ``W`` (in_dim, num_units), ``b`` (num_units,). Computed as a 1x1 convolution.
    """

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init(scale=init_scale)((in_dim, num_units)), requires_grad=True)
        self.b = nn.Parameter(torch.zeros(num_units), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class Combine(nn.Module):
    """Combine a (projected) input-pyramid tensor with a feature map (``progressive_input='input_skip'``).

    ``Conv_0`` is a 1x1 convolution dim1 -> dim2 (the official name, so official ``input_skip``
    checkpoints load). ``forward(x (B, dim1, H, W), y (B, dim2, H, W))`` returns ``Conv_0(x) + y``
    (method 'sum', (B, dim2, H, W)) or ``cat([Conv_0(x), y])`` ('cat', 2*dim2 channels).
    State dicts written before the rename (key ``...Conv.weight``) still load: see
    :func:`rename_legacy_combine_keys`.
    """

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        self.Conv_0 = conv1x1(dim1, dim2)
        if method not in ("cat", "sum"):
            raise ValueError(f"Method {method} not recognized.")
        self.method = method

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):
            old, new = f"{prefix}Conv.{name}", f"{prefix}Conv_0.{name}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        if self.method == "cat":
            return torch.cat([h, y], dim=1)
        return h + y


def rename_legacy_combine_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> dict:
    """A copy of ``state_dict`` with the pre-rename ``<combine>.Conv.{weight,bias}`` keys of every
    :class:`Combine` in ``model`` renamed to ``<combine>.Conv_0.*`` (cld_fast checkpoints written
    before the official name was adopted). Other keys are untouched.
    """
    out = dict(state_dict)
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, Combine):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for name in ("weight", "bias"):
            old, new = f"{prefix}Conv.{name}", f"{prefix}Conv_0.{name}"
            if old in out and new not in out:
                out[new] = out.pop(old)
    return out


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all H*W positions (DDPM attention, NCSN++ variant).

    Parameters: ``GroupNorm_0``, ``NIN_0`` (q), ``NIN_1`` (k), ``NIN_2`` (v), ``NIN_3`` (output).
    Forward: (B, C, H, W) -> (B, C, H, W); returns ``(x + h) / sqrt(2)`` when ``skip_rescale``.

    The official code forms the (B, H, W, H, W) attention matrix with two einsums; this computes the
    same softmax(q k^T / sqrt(C)) v with ``F.scaled_dot_product_attention`` (memory-efficient /
    flash kernels on GPU) and a fused q/k/v projection.
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        # (B, H*W, C): a free view for channels_last inputs.
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        w_qkv = torch.cat([self.NIN_0.W, self.NIN_1.W, self.NIN_2.W], dim=1)  # (C, 3C)
        b_qkv = torch.cat([self.NIN_0.b, self.NIN_1.b, self.NIN_2.b], dim=0)  # (3C,)
        qkv = F.linear(h, w_qkv.t(), b_qkv)
        q, k, v = qkv.split(C, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           scale=float(C) ** -0.5).squeeze(1)
        a = F.linear(a, self.NIN_3.W.t(), self.NIN_3.b)
        h = a.reshape(B, H, W, C).permute(0, 3, 1, 2)
        if not self.skip_rescale:
            return x + h
        return (x + h) / _SQRT2


class Upsample(nn.Module):
    """2x upsampling block (used by ``resblock_type='ddpm'`` and ``progressive='residual'``).

    fir=False: nearest neighbour, then optional ``Conv_0`` (3x3). fir=True: FIR ``upsample_2d`` or,
    with conv, the fused ``Conv2d_0`` (upsample_conv_2d). (B, in_ch, H, W) -> (B, out_ch, 2H, 2W).
    """

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if not fir:
            if with_conv:
                self.Conv_0 = conv3x3(in_ch, out_ch)
        elif with_conv:
            self.Conv2d_0 = ups.Conv2d(in_ch, out_ch, kernel=3, up=True, resample_kernel=fir_kernel,
                                       use_bias=True, kernel_init=default_init())
        self.fir = fir
        self.with_conv = with_conv
        self.fir_kernel = tuple(fir_kernel)
        self.out_ch = out_ch
        self.register_buffer("fir_up", ups.setup_kernel(self.fir_kernel, 4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = F.interpolate(x, scale_factor=2, mode="nearest")
            if self.with_conv:
                h = self.Conv_0(h)
        elif not self.with_conv:
            h = ups.upsample_2d(x, kernel=self.fir_up, factor=2)
        else:
            h = self.Conv2d_0(x)
        return h


class Downsample(nn.Module):
    """2x downsampling block (``resblock_type='ddpm'`` and ``progressive_input`` pyramids).

    fir=False: pad (0,1,0,1) then ``Conv_0`` (3x3, stride 2), or 2x2 average pooling (no padding). fir=True: FIR
    ``downsample_2d`` or, with conv, the fused ``Conv2d_0`` (conv_downsample_2d).
    (B, in_ch, H, W) -> (B, out_ch, H/2, W/2).
    """

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if not fir:
            if with_conv:
                self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif with_conv:
            self.Conv2d_0 = ups.Conv2d(in_ch, out_ch, kernel=3, down=True, resample_kernel=fir_kernel,
                                       use_bias=True, kernel_init=default_init())
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.with_conv = with_conv
        self.out_ch = out_ch
        self.register_buffer("fir_down", ups.setup_kernel(self.fir_kernel, 1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                x = self.Conv_0(F.pad(x, (0, 1, 0, 1)))
            else:
                x = F.avg_pool2d(x, 2, stride=2)
        elif not self.with_conv:
            x = ups.downsample_2d(x, kernel=self.fir_down, factor=2)
        else:
            x = self.Conv2d_0(x)
        return x


# ----------------------------------------------------------------------------------------------
# Residual blocks
# ----------------------------------------------------------------------------------------------
class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block (``resblock_type='ddpm'``).

    Parameters: GroupNorm_0, Conv_0, Dense_0 (temb), GroupNorm_1, Conv_1, and for in_ch != out_ch
    either Conv_2 (3x3, ``conv_shortcut``) or NIN_0. Forward: x (B, in_ch, H, W), temb (B, temb_dim)
    -> (B, out_ch, H, W).
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: Optional[int] = None, temb_dim: Optional[int] = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
            self.Dense_0.weight.data = default_init()(self.Dense_0.weight.data.shape)
            nn.init.zeros_(self.Dense_0.bias)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Dropout_0(h)
        h = self.Conv_1(h)
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        if not self.skip_rescale:
            return x + h
        return (x + h) / _SQRT2


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block with optional FIR up/down-sampling (``resblock_type='biggan'``).

    Parameters: GroupNorm_0, Conv_0, Dense_0 (temb), GroupNorm_1, Conv_1, and Conv_2 (1x1 skip
    projection) when in_ch != out_ch or resampling. Forward: x (B, in_ch, H, W), temb (B, temb_dim)
    -> (B, out_ch, H', W') with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: Optional[int] = None, temb_dim: Optional[int] = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.up = up
        self.down = down
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
            self.Dense_0.weight.data = default_init()(self.Dense_0.weight.shape)
            nn.init.zeros_(self.Dense_0.bias)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch
        if up:
            self.register_buffer("fir_k", ups.setup_kernel(self.fir_kernel, 4.0), persistent=False)
        elif down:
            self.register_buffer("fir_k", ups.setup_kernel(self.fir_kernel, 1.0), persistent=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            if self.fir:
                return ups.upsample_2d(x, kernel=self.fir_k, factor=2)
            return ups.naive_upsample_2d(x, factor=2)
        if self.down:
            if self.fir:
                return ups.downsample_2d(x, kernel=self.fir_k, factor=2)
            return ups.naive_downsample_2d(x, factor=2)
        return x

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up or self.down:
            h = self._resample(h)
            x = self._resample(x)
        h = self.Conv_0(h)
        # Add a per-channel bias conditioned on the time embedding.
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Dropout_0(h)
        h = self.Conv_1(h)
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        if not self.skip_rescale:
            return x + h
        return (x + h) / _SQRT2
