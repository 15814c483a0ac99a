"""NCSN++ as used by the official CLD-SGM code (score_sde ``ncsnpp.py`` adapted to CLD).

Differences of the CLD version from score_sde's NCSN++, all reproduced here:

* the input is u = cat(x, v) with ``2 * image_channels`` channels (``sde='cld'``) and the output is
  ``image_channels`` channels (the network predicts the velocity part only);
* the time input is the *forward time* t in (0, 1] itself, not a noise level: with
  ``embedding_type='fourier'`` the Gaussian Fourier projection is applied to ``log(t)``; with
  ``'positional'`` the DDPM sinusoidal embedding is applied to t directly;
* the time embedding (Fourier projection + two dense layers) is computed with autocast disabled;
* no input centring (``2x - 1``) and no output scaling by sigma.

The parameter/``state_dict`` layout is that of the official model (one ``nn.ModuleList`` called
``all_modules``; keys such as ``all_modules.0.W``, ``all_modules.4.GroupNorm_0.weight``), so
official checkpoints load with identical key names (see :mod:`cld_fast.models.checkpoint`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers

__all__ = ["NCSNppConfig", "NCSNpp"]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _int_tuple(v: Any) -> Tuple[int, ...]:
    """Official list options come as '1,2,2,2' strings; also accept ints, lists and tuples."""
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(int(float(s)) for s in v.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
                     .replace(" ", "").split(",") if s != "")
    if isinstance(v, (int, float)):
        return (int(v),)
    return tuple(int(s) for s in v)


def _float_tuple(v: Any) -> Tuple[float, ...]:
    if isinstance(v, str):
        return tuple(float(s) for s in v.replace("[", "").replace("]", "").replace("(", "").replace(")", "")
                     .replace(" ", "").split(",") if s != "")
    if isinstance(v, (int, float)):
        return (float(v),)
    return tuple(float(s) for s in v)


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("1", "true", "yes", "on", ""):
            return True
        if s in ("0", "false", "no", "off", "none"):
            return False
        raise ValueError(f"cannot read {v!r} as a boolean")
    return bool(v)


@dataclass
class NCSNppConfig:
    """NCSN++ hyper-parameters under the official CLD-SGM config key names.

    Defaults are the official CIFAR-10 CLD model. List-valued options accept the official string
    form (``ch_mult='1,2,2,2'``) or sequences; they are stored as tuples.

    Fields:
        image_size: training resolution (int); decides at which levels attention is used.
        image_channels: data channels C (int); the network input has 2C channels for ``sde='cld'``.
        n_channels: base width nf (int).
        ch_mult: width multiplier per resolution level (tuple of int).
        n_resblocks: residual blocks per level (int).
        attn_resolutions: resolutions (tuple of int) with self-attention.
        resamp_with_conv: learned convolution in (ddpm-style / pyramid) resampling (bool).
        use_fir: FIR resampling (bool); fir_kernel: the FIR taps (tuple of float).
        skip_rescale: divide residual sums by sqrt(2) (bool).
        resblock_type: 'biggan' or 'ddpm'.
        progressive: output pyramid, 'none' | 'output_skip' | 'residual'.
        progressive_input: input pyramid, 'none' | 'input_skip' | 'residual'.
        progressive_combine: 'sum' | 'cat' (for input_skip).
        attention_type: ignored with a warning unless 'ddpm', like the official NCSN++ ignores it
            (it always uses DDPM attention).
        init_scale: scale of the zero-ish initialisation of the last layer of each block (float).
        fourier_scale: std of the Fourier projection weights (float).
        conv_size: accepted for compatibility; the official network ignores it (3x3 convs).
        embedding_type: 'fourier' (of log t) or 'positional' (of t).
        dropout: dropout probability in residual blocks (float).
        normalization: ignored with a warning unless 'GroupNorm', like the official NCSN++ ignores it
            (it always uses GroupNorm).
        nonlinearity: 'swish' | 'silu' | 'elu' | 'relu' | 'lrelu'.
        sde: 'cld' doubles the input channels for (x, v); anything else takes x only.
        name: model name, 'ncsnpp'.
        num_classes: K > 0 makes the network class-conditional (an extension; the official model has
            K = 0): an embedding of K + 1 entries, the last one "no label", added to the time embedding.
    """

    image_size: int = 32
    image_channels: int = 3
    n_channels: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    n_resblocks: int = 8
    attn_resolutions: Tuple[int, ...] = (16,)
    resamp_with_conv: bool = True
    use_fir: bool = True
    fir_kernel: Tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    attention_type: str = "ddpm"
    init_scale: float = 0.0
    fourier_scale: float = 16.0
    conv_size: int = 3
    embedding_type: str = "fourier"
    dropout: float = 0.1
    normalization: str = "GroupNorm"
    nonlinearity: str = "swish"
    sde: str = "cld"
    name: str = "ncsnpp"
    num_classes: int = 0

    def __post_init__(self):
        self.image_size = int(self.image_size)
        self.image_channels = int(self.image_channels)
        self.n_channels = int(self.n_channels)
        self.ch_mult = _int_tuple(self.ch_mult)
        self.n_resblocks = int(self.n_resblocks)
        self.attn_resolutions = _int_tuple(self.attn_resolutions)
        self.resamp_with_conv = _bool(self.resamp_with_conv)
        self.use_fir = _bool(self.use_fir)
        self.fir_kernel = _float_tuple(self.fir_kernel)
        self.skip_rescale = _bool(self.skip_rescale)
        self.resblock_type = str(self.resblock_type).lower()
        self.progressive = str(self.progressive).lower()
        self.progressive_input = str(self.progressive_input).lower()
        self.progressive_combine = str(self.progressive_combine).lower()
        self.attention_type = str(self.attention_type).lower()
        self.init_scale = float(self.init_scale)
        self.fourier_scale = float(self.fourier_scale)
        self.conv_size = _int_tuple(self.conv_size)[0]
        self.embedding_type = str(self.embedding_type).lower()
        self.dropout = float(self.dropout)
        self.normalization = str(self.normalization)
        self.nonlinearity = str(self.nonlinearity).lower()
        self.sde = str(self.sde).lower()
        self.name = str(self.name).lower()
        self.num_classes = int(self.num_classes)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` / ``NotImplementedError`` for unsupported or inconsistent options."""
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one level")
        if self.n_channels < 4 or self.image_channels < 1 or self.n_resblocks < 0:
            raise ValueError("n_channels >= 4, image_channels >= 1, n_resblocks >= 0 required")
        factor = 2 ** (len(self.ch_mult) - 1)  # the network halves the image at every level but the last
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} cannot run through {len(self.ch_mult)} resolution levels "
                             f"(ch_mult {','.join(map(str, self.ch_mult))}): it must be a positive multiple of "
                             f"{factor}")
        if self.resblock_type not in ("biggan", "ddpm"):
            raise NotImplementedError(f"ResnetBlock {self.resblock_type} is not implemented.")
        if self.progressive not in ("none", "output_skip", "residual"):
            raise NotImplementedError(f"Progressive method {self.progressive} is not implemented.")
        if self.progressive_input not in ("none", "input_skip", "residual"):
            raise NotImplementedError(f"Progressive input method {self.progressive_input} is not implemented.")
        if self.progressive_combine not in ("sum", "cat"):
            raise ValueError(f"progressive_combine {self.progressive_combine!r} not recognised (sum, cat)")
        if self.embedding_type not in ("fourier", "positional"):
            raise NotImplementedError(f"Embedding type {self.embedding_type} is not implemented.")
        # The official NCSN++ reads neither key (it always builds DDPM attention and GroupNorm), so
        # configs with other values train and load there: accept them too, but say so.
        if self.attention_type != "ddpm":
            warnings.warn(f"attention_type {self.attention_type!r} is ignored: the official NCSN++ always uses "
                          "DDPM self-attention (AttnBlockpp)", UserWarning, stacklevel=3)
        if self.normalization.lower() != "groupnorm":
            warnings.warn(f"normalization {self.normalization!r} is ignored: the official NCSN++ always uses "
                          "GroupNorm", UserWarning, stacklevel=3)
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if self.name != "ncsnpp":
            raise ValueError(f"NCSNppConfig.name must be 'ncsnpp', got {self.name!r}")
        if self.conv_size != 3:
            warnings.warn("conv_size != 3 is ignored: the official NCSN++ always uses 3x3 convolutions",
                          stacklevel=3)
        layers.get_act(self.nonlinearity)  # raises for unknown activations

    @property
    def in_channels(self) -> int:
        """Input channels: 2 * image_channels for CLD (x and v), image_channels otherwise."""
        return 2 * self.image_channels if self.sde == "cld" else self.image_channels

    @property
    def out_channels(self) -> int:
        """Output channels: image_channels (the velocity part for CLD)."""
        return self.image_channels

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = False) -> "NCSNppConfig":
        """Build from a dict with official key names; missing keys take the CIFAR-10 defaults.

        Keys that are not model options (e.g. the official ``dataset``, ``beta0``, ``learning_rate``)
        are ignored, or raise ``ValueError`` with ``strict=True``.
        """
        if isinstance(d, NCSNppConfig):
            return dataclasses.replace(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if strict and unknown:
            raise ValueError(f"unknown NCSN++ config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """The options as a plain dict (official key names; list options in the official '1,2,2' form)."""
        d = dataclasses.asdict(self)
        d["ch_mult"] = ",".join(str(v) for v in self.ch_mult)
        d["attn_resolutions"] = ",".join(str(v) for v in self.attn_resolutions)
        d["fir_kernel"] = ",".join(f"{v:g}" for v in self.fir_kernel)
        return d


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
class NCSNpp(nn.Module):
    """NCSN++ score network of CLD-SGM.

    Args:
        config: an :class:`NCSNppConfig` or a dict with official config keys (defaults: CIFAR-10).

    ``forward(u, t, class_labels=None)``:
        u: (B, 2C, H, W) floating tensor, ``cat(x, v)`` along channels (C = image_channels; for
           ``sde != 'cld'`` just x with C channels). H and W must be divisible by
           ``2 ** (len(ch_mult) - 1)``; contiguous or channels_last.
        t: (B,) forward time in (0, 1] (t = 0 is data; t must be > 0 for the Fourier embedding of
           log t). A 0-dim t is broadcast to the batch.
        returns: (B, C, H, W) network output for the velocity channels, in u's dtype (or the
           autocast dtype under autocast; the time embedding itself is always computed in the
           parameters' dtype with autocast disabled, as in the official code).
        class_labels: conditional networks (``num_classes`` K > 0) only: (B,) int64 labels in [0, K],
           K meaning "no label"; None is K for every sample (the unconditional model).
    """

    def __init__(self, config: Any = None):
        super().__init__()
        if config is None:
            config = NCSNppConfig()
        elif not isinstance(config, NCSNppConfig):
            config = NCSNppConfig.from_dict(config)
        self.config = config
        cfg = config
        self.act = act = layers.get_act(cfg.nonlinearity)

        nf = self.n_channels = cfg.n_channels
        ch_mult = cfg.ch_mult
        self.n_resblocks = nrb = cfg.n_resblocks
        self.attn_resolutions = cfg.attn_resolutions
        self.num_resolutions = num_res = len(ch_mult)
        self.all_resolutions = [cfg.image_size // (2 ** i) for i in range(num_res)]
        self._attn_at_level = [r in cfg.attn_resolutions for r in self.all_resolutions]
        fir = cfg.use_fir
        fir_kernel = cfg.fir_kernel
        self.skip_rescale = cfg.skip_rescale
        self.resblock_type = cfg.resblock_type
        self.progressive = cfg.progressive
        self.progressive_input = cfg.progressive_input
        self.embedding_type = cfg.embedding_type
        init_scale = cfg.init_scale
        combine_method = cfg.progressive_combine
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels

        modules = []
        if self.embedding_type == "fourier":
            modules.append(layers.GaussianFourierProjection(embedding_size=nf, scale=cfg.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        modules.append(nn.Linear(embed_dim, nf * 4))
        modules[-1].weight.data = layers.default_init()(modules[-1].weight.shape)
        nn.init.zeros_(modules[-1].bias)
        modules.append(nn.Linear(nf * 4, nf * 4))
        modules[-1].weight.data = layers.default_init()(modules[-1].weight.shape)
        nn.init.zeros_(modules[-1].bias)

        AttnBlock = functools.partial(layers.AttnBlockpp, init_scale=init_scale, skip_rescale=self.skip_rescale)
        Upsample = functools.partial(layers.Upsample, with_conv=cfg.resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
        Downsample = functools.partial(layers.Downsample, with_conv=cfg.resamp_with_conv, fir=fir,
                                       fir_kernel=fir_kernel)
        if self.progressive == "output_skip":
            self.pyramid_upsample = layers.Upsample(in_ch=self.out_channels, fir=fir, fir_kernel=fir_kernel,
                                                    with_conv=False)
        elif self.progressive == "residual":
            pyramid_upsample = functools.partial(layers.Upsample, fir=fir, fir_kernel=fir_kernel, with_conv=True)
        if self.progressive_input == "input_skip":
            self.pyramid_downsample = layers.Downsample(in_ch=self.in_channels, fir=fir, fir_kernel=fir_kernel,
                                                       with_conv=False)
        elif self.progressive_input == "residual":
            pyramid_downsample = functools.partial(layers.Downsample, fir=fir, fir_kernel=fir_kernel, with_conv=True)

        if self.resblock_type == "ddpm":
            ResnetBlock = functools.partial(layers.ResnetBlockDDPMpp, act=act, dropout=cfg.dropout,
                                            init_scale=init_scale, skip_rescale=self.skip_rescale,
                                            temb_dim=4 * nf)
        else:
            ResnetBlock = functools.partial(layers.ResnetBlockBigGANpp, act=act, dropout=cfg.dropout, fir=fir,
                                            fir_kernel=fir_kernel, init_scale=init_scale,
                                            skip_rescale=self.skip_rescale, temb_dim=4 * nf)

        channels = self.in_channels
        input_pyramid_ch = channels
        modules.append(layers.conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf

        # Downsampling path.
        for i_level in range(num_res):
            for _ in range(nrb):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self._attn_at_level[i_level]:
                    modules.append(AttnBlock(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != num_res - 1:
                if self.resblock_type == "ddpm":
                    modules.append(Downsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(down=True, in_ch=in_ch))
                if self.progressive_input == "input_skip":
                    modules.append(layers.Combine(dim1=input_pyramid_ch, dim2=in_ch, method=combine_method))
                    if combine_method == "cat":
                        in_ch *= 2
                elif self.progressive_input == "residual":
                    modules.append(pyramid_downsample(in_ch=input_pyramid_ch, out_ch=in_ch))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        # Middle.
        in_ch = hs_c[-1]
        modules.append(ResnetBlock(in_ch=in_ch))
        modules.append(AttnBlock(channels=in_ch))
        modules.append(ResnetBlock(in_ch=in_ch))

        # Upsampling path.
        pyramid_ch = 0
        for i_level in reversed(range(num_res)):
            for _ in range(nrb + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self._attn_at_level[i_level]:
                modules.append(AttnBlock(channels=in_ch))
            if self.progressive != "none":
                if i_level == num_res - 1:
                    if self.progressive == "output_skip":
                        modules.append(layers.group_norm(in_ch))
                        modules.append(layers.conv3x3(in_ch, self.out_channels, init_scale=init_scale))
                        pyramid_ch = self.out_channels
                    else:  # residual
                        modules.append(layers.group_norm(in_ch))
                        modules.append(layers.conv3x3(in_ch, in_ch, bias=True))
                        pyramid_ch = in_ch
                else:
                    if self.progressive == "output_skip":
                        modules.append(layers.group_norm(in_ch))
                        modules.append(layers.conv3x3(in_ch, self.out_channels, bias=True, init_scale=init_scale))
                        pyramid_ch = channels
                    else:  # residual
                        modules.append(pyramid_upsample(in_ch=pyramid_ch, out_ch=in_ch))
                        pyramid_ch = in_ch
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    modules.append(Upsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(in_ch=in_ch, up=True))
        assert not hs_c

        if self.progressive != "output_skip":
            modules.append(layers.group_norm(in_ch))
            modules.append(layers.conv3x3(in_ch, self.out_channels, init_scale=init_scale))

        self.all_modules = nn.ModuleList(modules)
        self.num_classes = cfg.num_classes
        if self.num_classes:
            # Outside all_modules, so the official state_dict layout is unchanged; zero at the start,
            # so a fresh conditional network is the unconditional one.
            self.label_embedding = nn.Embedding(self.num_classes + 1, nf * 4)
            nn.init.zeros_(self.label_embedding.weight)

    # ------------------------------------------------------------------------------------------
    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) forward time -> (B, 4 * n_channels) time embedding.

        As in the official code this runs with autocast disabled, so it is float32 for a float32
        network under autocast. For a network cast to half precision it is still computed in
        float32 (the Fourier phases |2 pi W log t| ~ 1e3 need it) and returned in the parameters'
        dtype.
        """
        modules = self.all_modules
        if self.embedding_type == "fourier":
            dense0, dense1 = modules[1], modules[2]
        else:
            dense0, dense1 = modules[0], modules[1]
        pdt = dense0.weight.dtype
        cdt = torch.promote_types(pdt, torch.float32)
        t = t.to(cdt)
        with torch.autocast(device_type=t.device.type, enabled=False):
            if self.embedding_type == "fourier":
                temb = modules[0](torch.log(t))
            else:
                temb = layers.get_timestep_embedding(t, self.n_channels).to(cdt)
            if pdt == cdt:
                temb = dense0(temb)
                temb = dense1(self.act(temb))
            else:
                temb = F.linear(temb, dense0.weight.to(cdt), dense0.bias.to(cdt))
                temb = F.linear(self.act(temb), dense1.weight.to(cdt), dense1.bias.to(cdt))
        return temb.to(pdt)

    def _label_embedding(self, class_labels, batch: int, device) -> torch.Tensor:
        """(B, 4 * n_channels) embedding of the labels (None: the "no label" entry K for all)."""
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif not isinstance(class_labels, torch.Tensor) or class_labels.dtype not in (torch.int32, torch.int64) \
                or class_labels.shape != (batch,):
            raise ValueError(f"class_labels must be a (B,) = ({batch},) int64 tensor of labels in [0, "
                             f"{self.num_classes}], got {getattr(class_labels, 'dtype', type(class_labels).__name__)} "
                             f"{tuple(getattr(class_labels, 'shape', ()))}")
        return self.label_embedding(class_labels.to(device=device, dtype=torch.long))

    def forward(self, u: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """See the class docstring: u (B, 2C, H, W), t (B,), class_labels (B,) or None -> (B, C, H, W)."""
        if u.ndim != 4 or u.shape[1] != self.in_channels:
            raise ValueError(f"expected u of shape (B, {self.in_channels}, H, W), got {tuple(u.shape)}")
        if t.ndim == 0:
            t = t.expand(u.shape[0])
        elif t.shape != (u.shape[0],):
            t = t.reshape(-1)
            if t.shape[0] != u.shape[0]:
                raise ValueError(f"expected t of shape ({u.shape[0]},), got {tuple(t.shape)}")

        modules = self.all_modules
        temb = self._time_embedding(t)
        if self.num_classes:
            temb = temb + self._label_embedding(class_labels, u.shape[0], u.device).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes = 0)")
        m_idx = 2 if self.embedding_type == "positional" else 3
        sqrt2 = math.sqrt(2.0)
        num_res = self.num_resolutions
        ddpm = self.resblock_type == "ddpm"

        x = u
        input_pyramid = x if self.progressive_input != "none" else None

        hs = [modules[m_idx](x)]
        m_idx += 1
        for i_level in range(num_res):
            for _ in range(self.n_resblocks):
                h = modules[m_idx](hs[-1], temb)
                m_idx += 1
                if self._attn_at_level[i_level]:
                    h = modules[m_idx](h)
                    m_idx += 1
                hs.append(h)
            if i_level != num_res - 1:
                if ddpm:
                    h = modules[m_idx](hs[-1])
                else:
                    h = modules[m_idx](hs[-1], temb)
                m_idx += 1
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = modules[m_idx](input_pyramid, h)
                    m_idx += 1
                elif self.progressive_input == "residual":
                    input_pyramid = modules[m_idx](input_pyramid)
                    m_idx += 1
                    if self.skip_rescale:
                        input_pyramid = (input_pyramid + h) / sqrt2
                    else:
                        input_pyramid = input_pyramid + h
                    h = input_pyramid
                hs.append(h)

        h = hs[-1]
        h = modules[m_idx](h, temb)
        m_idx += 1
        h = modules[m_idx](h)
        m_idx += 1
        h = modules[m_idx](h, temb)
        m_idx += 1

        pyramid = None
        for i_level in reversed(range(num_res)):
            for _ in range(self.n_resblocks + 1):
                h = modules[m_idx](torch.cat([h, hs.pop()], dim=1), temb)
                m_idx += 1
            if self._attn_at_level[i_level]:
                h = modules[m_idx](h)
                m_idx += 1
            if self.progressive != "none":
                if i_level == num_res - 1:
                    pyramid = self.act(modules[m_idx](h))
                    m_idx += 1
                    pyramid = modules[m_idx](pyramid)
                    m_idx += 1
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid_h = self.act(modules[m_idx](h))
                    m_idx += 1
                    pyramid_h = modules[m_idx](pyramid_h)
                    m_idx += 1
                    pyramid = pyramid + pyramid_h
                else:  # residual
                    pyramid = modules[m_idx](pyramid)
                    m_idx += 1
                    if self.skip_rescale:
                        pyramid = (pyramid + h) / sqrt2
                    else:
                        pyramid = pyramid + h
                    h = pyramid
            if i_level != 0:
                if ddpm:
                    h = modules[m_idx](h)
                else:
                    h = modules[m_idx](h, temb)
                m_idx += 1
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(modules[m_idx](h))
            m_idx += 1
            h = modules[m_idx](h)
            m_idx += 1
        assert m_idx == len(modules)
        return h

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, n_channels={c.n_channels}, "
                f"ch_mult={c.ch_mult}, n_resblocks={c.n_resblocks}, attn_resolutions={c.attn_resolutions}, "
                f"image_size={c.image_size}")
