"""Training CLD score models (HSM, fused loss) and the VP-SDE baseline (DSM).

    from cld_fast.config import get_preset
    from cld_fast.train import train
    result = train(get_preset("toy"), "runs/toy")          # or: cld-fast train --out runs/toy
    print(result.energy_distance, result.checkpoint)

One run is the ``Trainer`` below, in EDM style: its phases run in order and each is one short
method:

1. ``_setup``    device, process group (torchrun), seeds, run folder, SDE, precision;
2. ``_data``     the data source, sharded per rank;
3. ``_network``  network, EMA, DDP, ``torch.compile``, Adam, GradScaler;
4. ``_resume``   state from the newest (or a named) checkpoint;
5. ``run``       the loop: ``train_step`` per step, logging, checkpoints, snapshots;
6. ``_finish``   final checkpoint, sample plot and the quality check (toy data: energy distance;
   digit data: the ``cld_fast.metrics`` Frechet distance, classifier verdict and memorisation check).

The CLD step: t ~ U(loss_eps, 1) per sample, ``cf.perturb`` (one fused pass drawing u and the noise),
the network under autocast (bf16 by default on GPU), ``cf.hsm_loss`` (fused, ``reweightedv2`` or
``likelihood``), backward, gradient clipping, Adam (``fused=True`` on CUDA, else ``foreach``) with
linear warm-up, EMA (the official decay warm-up). The VP-SDE step is plain torch DSM with the mixed
score of ``VPSDE.mixed_score_coefficients`` (the parameterisation ``cf.score_fn`` samples with).

No host synchronisation inside a step: the loss is accumulated on the device and read every
``log_every`` steps; a device-side flag records the first step whose loss (or gradient norm) was
not finite, and it is checked at every log and checkpoint point. A non-finite loss stops training
with :class:`NonFiniteLossError` naming the step and the last good checkpoint; no checkpoint is
ever written from non-finite parameters.

The run folder is locked (``cld_fast.runlock``: an OS ``flock`` on the folder itself) from the
start of the trainer to the end of ``run``: a second trainer on the same folder fails with the
holder's PID, and a folder deleted or replaced while training stops the run at the next log or
checkpoint point (``RunFolderGoneError``) instead of being re-created unlocked. Every file of the run
folder is written atomically (``cld_fast.fileio``), except ``metrics.jsonl``, which is appended one
flushed line at a time. SIGINT / SIGTERM during ``run`` write a checkpoint at the next step boundary and raise
:class:`TrainingInterrupted` (``cld-fast train`` then exits 130 / 143).

Checkpoints hold the full state (network, EMA, optimizer, GradScaler, step, every rank's RNG
states, the config as a plain dict) and a resumed run is bitwise identical to an uninterrupted
one on CPU. Under ``torchrun`` the network is wrapped in DDP, each rank draws its own data, and
only rank 0 writes checkpoints, logs and plots.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import ops, philox
from .checks import value_checks
from .config import TrainConfig
from .data import PACKAGED_DATASETS, DataSource, build_data
from .ema import ExponentialMovingAverage
from .fileio import atomic_write_text, atomic_writer
from .runlock import RunLock
from .sde import CLD, VPSDE
from .sde_config import build_sde

__all__ = ["train", "Trainer", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "MissingExtraError",
           "build_sde", "build_network",
           "resolve_precision", "load_for_sampling"]


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or inf; training stopped.

    Attributes: ``step`` (the first bad optimizer step, 1-based: the step that would have produced
    checkpoint ``ckpt_<step>``), ``last_checkpoint`` (path of the last good checkpoint or None).
    """

    def __init__(self, step: int, last_checkpoint: Optional[str], detail: str = ""):
        self.step = step
        self.last_checkpoint = last_checkpoint
        where = (f"The last good checkpoint is {last_checkpoint}; it is intact and no checkpoint was written "
                 f"after the loss went bad. Resume from it with --resume after lowering --lr, or try --precision fp32.")
        if last_checkpoint is None:
            where = "No checkpoint had been written yet, and none was written from the bad state."
        super().__init__(f"training stopped: the loss became NaN or inf at step {step}{detail}. {where}")


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived during training; a checkpoint of the step it ended on was written.

    Attributes: ``signum``, ``step``, ``checkpoint`` (the path of the checkpoint of ``step``),
    ``exit_code`` (128 + signum: 130 for SIGINT, 143 for SIGTERM). A non-finite state raises
    :class:`NonFiniteLossError` instead, as at any checkpoint.
    """

    def __init__(self, signum: int, step: int, checkpoint: str, after_final_checkpoint: bool = False):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        if after_final_checkpoint:
            super().__init__(f"interrupted by {name} at step {self.step}, after training finished: saved {checkpoint}; "
                             "the final samples and evaluation were skipped")
        else:
            super().__init__(f"interrupted by {name} at step {self.step}: saved {checkpoint}; continue with --resume")


@dataclass
class TrainResult:
    """What a finished run produced (paths are absolute; None where not applicable)."""

    run_dir: str
    step: int
    loss: Optional[float]
    checkpoint: Optional[str]
    metrics: Optional[str]
    samples_plot: Optional[str] = None
    samples_npz: Optional[str] = None
    quality_plot: Optional[str] = None
    energy_distance: Optional[float] = None
    energy_distance_floor: Optional[float] = None
    wall_time: float = 0.0
    train_time: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device):
    """(autocast dtype or None, use GradScaler) for ``precision`` on ``device``.

    ``auto``: bf16 autocast on CUDA (fp16 + GradScaler where bf16 is unsupported), fp32 on CPU.
    ``bf16``: bf16 autocast (CPU too). ``fp16``: fp16 autocast with a GradScaler (CUDA only).
    ``fp32``: no autocast (the setting for exact checks).
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device (GradScaler); use bf16 or fp32 on the CPU")
        return torch.float16, True
    raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")


def model_config(config: TrainConfig, data_shape) -> Dict[str, Any]:
    """The ``cld_fast.models`` config dict for this run, adapted to the data shape and the SDE."""
    from .models import get_config

    mcfg = get_config(config.model) if isinstance(config.model, str) else dict(config.model)
    mcfg.update(config.model_overrides or {})
    mcfg["sde"] = config.sde
    name = str(mcfg.get("name", "ncsnpp")).lower()
    if config.conditional:
        from .config import LABELED_DATASETS

        if name != "ncsnpp":
            raise ValueError(f"conditional training needs an NCSN++ model, got {name!r}")
        mcfg["num_classes"] = LABELED_DATASETS[config.data]
    if len(data_shape) == 1:
        if name != "mlp":
            raise ValueError(f"data of shape {tuple(data_shape)} (vectors) needs an MLP model (the toy2d preset), got {name!r}")
        mcfg["data_dim"] = int(data_shape[0])
    elif len(data_shape) == 3:
        if name == "mlp":
            raise ValueError(f"image data of shape {tuple(data_shape)} needs an NCSN++ model (such as the cifar10 preset), got 'mlp'")
        c, h, w = data_shape
        if h != w:
            raise ValueError(f"NCSN++ needs square images, got {h}x{w}")
        mcfg["image_channels"], mcfg["image_size"] = int(c), int(h)
    else:
        raise ValueError(f"unsupported data shape {tuple(data_shape)}; expected (D,) or (C, H, W)")
    return mcfg


def build_network(config: TrainConfig, data_shape) -> nn.Module:
    """A fresh network for the config and data shape (float32, CPU)."""
    from .models import build_model

    mcfg = model_config(config, data_shape)
    try:
        return build_model(mcfg)
    except (TypeError, ValueError, RuntimeError) as exc:
        opts = " ".join(f"{k}={v!r}" for k, v in (config.model_overrides or {}).items())
        given = f" with --model-opt {opts}" if opts else ""
        raise ValueError(f"model {config.model if isinstance(config.model, str) else 'dict'!r}{given} cannot be "
                         f"built: {_first_line(exc)}") from None


def _rank_seed(seed: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (rank + 1)) % (2**63 - 1)


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}


def _make_optimizer(config: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """``config.optimizer`` (Adam, AdamW or Adamax as in the official code), fused on CUDA where torch has it."""
    cls = _OPTIMIZERS[config.optimizer]
    kw = dict(lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay)
    if device.type == "cuda" and cls is not torch.optim.Adamax:
        try:
            return cls(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return cls(params, foreach=True, **kw)


def network_score(net, sde, config: TrainConfig, autocast_dtype=None):
    """``cf.score_fn`` of a network trained with ``config`` (its objective; mixed-score output)."""
    from .loading import network_score_fn

    return network_score_fn(net, sde, True, config.objective, autocast_dtype)


class MissingExtraError(ImportError):
    """An optional package a requested feature needs is not installed (the message names the extra)."""


TENSORBOARD_HINT = "pip install 'cld_fast[tensorboard]' (or pip install tensorboard)"


def tensorboard_writer(log_dir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``; ImportError naming the extra to
    install when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise MissingExtraError(f"tensorboard logging (--tensorboard / TrainConfig.tensorboard) needs the tensorboard "
                          f"package: {TENSORBOARD_HINT}") from exc
    return SummaryWriter(log_dir=log_dir)


def _scalars(record: Dict[str, Any], prefix: str = ""):
    """(tag, value) of every finite int/float in ``record`` (nested dicts as 'eval/energy_distance'), bar 'step'."""
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


def _open_append_no_follow(path: str):
    """``path`` opened for appending lines; a symbolic link there is refused, never written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link; a run folder's files are never written through links "
                             "(remove it)") from None
        raise
    return os.fdopen(fd, "a", buffering=1)


class _MetricsWriter:
    """``metrics.jsonl`` (one JSON record per line) and, when ``tensorboard_dir`` is given, every
    numeric field of each record as a TensorBoard scalar at ``record['step']``."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None):
        self.path = path
        self._tb = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
        self._f = _open_append_no_follow(path) if path else None

    def write(self, record: Dict[str, Any]) -> None:
        if self._f is not None:
            try:
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()
            except OSError as exc:  # a file object's error carries no path: name it (and so its disk)
                raise OSError(exc.errno, exc.strerror or str(exc), self.path) from None
        if self._tb is not None:
            for tag, value in _scalars(record):
                self._tb.add_scalar(tag, value, global_step=int(record.get("step", 0)))
            self._tb.flush()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
# The training loss of each SDE class (a Trainer method), chosen once when the trainer is built.
LOSSES = {CLD: "cld_loss", VPSDE: "vp_loss"}


class Trainer:
    """One training run. ``Trainer(config, run_dir).run()`` trains and returns a :class:`TrainResult`.

    Args:
        config: a :class:`cld_fast.config.TrainConfig`.
        run_dir: the run folder (``checkpoints/``, ``samples/``, ``metrics.jsonl``, ``config.json``;
            ``tensorboard/`` with ``config.tensorboard``).
        model: use this network instead of building one from ``config.model`` (tests, custom nets);
            it is called as ``model(u, t)``.
        resume: None (fresh run; refuses a folder that already holds checkpoints), ``"latest"``
            (the newest checkpoint of ``run_dir``, fresh if there is none), or a checkpoint path.
        progress: show a tqdm bar (rank 0).
        loss_fn: replace the loss, called as ``loss_fn(model, x0, generator) -> scalar``.
        verbose: print where files go (rank 0).
    """

    def __init__(self, config: TrainConfig, run_dir: str, *, model: Optional[nn.Module] = None, resume=None,
                 progress: bool = True, loss_fn: Optional[LossFn] = None, verbose: bool = True):
        self.config = config.validate()
        self.run_dir = os.path.abspath(run_dir)
        self.progress = progress
        self.verbose = verbose
        self.t_start = time.time()
        self._lock = RunLock(self.run_dir)
        self._stop_signal: Optional[int] = None
        self._finishing: Optional[str] = None  # the final checkpoint's path, once written
        created = not os.path.exists(self.run_dir)
        try:
            self._setup()
            self.loss_fn = loss_fn or getattr(self, LOSSES[type(self.sde)])
            self._data()
            self._network(model)
            self._resume(resume)
        except BaseException:
            self._lock.release()
            if created:
                _remove_empty_run_folder(self.run_dir)
            raise

    # -- phase 1 ------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        self.device = dist_utils.device_for_rank(cfg.device)
        self.owns_process_group = dist_utils.init_from_env(self.device)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.samples_dir = os.path.join(self.run_dir, "samples")
        if self.is_main:
            # Held until run() ends (or close()): a second trainer on this folder fails here.
            self._lock.acquire()
            os.makedirs(self.ckpt_dir, exist_ok=True)
            os.makedirs(self.samples_dir, exist_ok=True)
            ckpt.clean_stale_temp(self.ckpt_dir)
        dist_utils.barrier()
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        if self.device.type == "cpu":
            # Denormal activations and gradients appear as the toy model trains and slow CPU
            # arithmetic by ~20% (measured); flushing them changes nothing at training precision.
            torch.set_flush_denormal(True)
        self.sde = build_sde(cfg)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.generator = torch.Generator(self.device).manual_seed(_rank_seed(cfg.seed, self.rank))
        # Training times are drawn on the host so their coefficient tables are computed there (float64,
        # cld_fast.sde) and reach the device in one pinned copy: no coefficient kernels, no host sync.
        self.time_generator = (self.generator if self.device.type == "cpu"
                               else torch.Generator().manual_seed(_rank_seed(cfg.seed + 1, self.rank)))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    # -- phase 2 ------------------------------------------------------------------------------
    def _data(self) -> None:
        self.data: DataSource = build_data(self.config, self.device, self.rank, self.world_size)

    # -- phase 3 ------------------------------------------------------------------------------
    def _network(self, model: Optional[nn.Module]) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
        net = model if model is not None else build_network(cfg, self.data.shape)
        self.channels_last = bool(cfg.channels_last and self.data.is_image)
        net = net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        self.net = net
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the network has no trainable parameters")
        self.ema = ExponentialMovingAverage(net.parameters(), cfg.ema_decay, cfg.ema_num_updates)
        wrapped: nn.Module = net
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if cfg.compile:
            wrapped = torch.compile(wrapped)
        self.model = wrapped
        self.optimizer = _make_optimizer(cfg, self.params, self.device)
        self.n_params = sum(p.numel() for p in self.params)

    # -- phase 4 ------------------------------------------------------------------------------
    def _resume(self, resume) -> None:
        self.step = 0
        self.superseded = None  # (folder, names) of the checkpoints a resume from an older one moved aside
        self.last_checkpoint: Optional[str] = None
        path = ckpt.resolve_resume(resume, self.run_dir) if resume else None
        if path is None:
            existing = ckpt.latest_checkpoint(self.ckpt_dir)
            if existing and not resume:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints (newest: {os.path.basename(existing)}); pass "
                    "--resume to continue that run, or choose another --out"
                )
            if resume:
                self._announce(f"no checkpoint in {self.ckpt_dir}; starting from step 0")
            return
        state = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.check_entries(state, path, ("config", "model", "ema", "optimizer", "rng"))
        self._check_resume_fits(state, path)
        if int(state["step"]) > self.config.steps:
            raise ValueError(f"--steps {self.config.steps} is below the step of the checkpoint to resume "
                             f"({path}, step {state['step']}); --steps is the total, so pass at least that")
        try:
            self.load_state(state)
        except KeyError as exc:
            raise ckpt.CheckpointError(f"{path} has no {exc.args[0]!r} entry, so it cannot be resumed (it can still "
                                       "be sampled from); start a new run with another --out") from None
        except (RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{path} does not fit this run's network or optimizer: "
                                       f"{_first_line(exc)}") from None
        self.last_checkpoint = os.path.abspath(path)
        self._announce(f"resumed from {path} at step {self.step}")
        if self.is_main:
            self._set_aside_newer_checkpoints(path)
        dist_utils.barrier()

    # What a checkpoint's network is built from: a resumed run may not change it.
    _ARCHITECTURE = (("sde", "--sde"), ("model", "--model"), ("model_overrides", "--model-opt"),
                     ("conditional", "--conditional"))

    def _check_resume_fits(self, state: Dict[str, Any], path: str) -> None:
        """CheckpointError naming the setting when this run's network differs from the checkpoint's."""
        old = state["config"]
        for key, flag in self._ARCHITECTURE:
            mine = getattr(self.config, key)
            theirs = old.get(key, mine)
            if key == "model_overrides":
                theirs = theirs or {}
                mine = mine or {}
            if theirs != mine:
                raise ckpt.CheckpointError(
                    f"--resume {path}: the checkpoint was trained with {key}={theirs!r}, this run asks for "
                    f"{key}={mine!r}; {flag} cannot change when resuming (leave it out to keep the checkpoint's "
                    "value, or start a new run with another --out)")
        shape = state.get("data_shape")
        if shape is not None and tuple(shape) != tuple(self.data.shape):
            raise ckpt.CheckpointError(f"--resume {path}: the checkpoint was trained on data of shape {tuple(shape)}, "
                                       f"this run's data ({self.config.data}) has shape {tuple(self.data.shape)}")

    def _set_aside_newer_checkpoints(self, path: str) -> None:
        """Move this run's checkpoints newer than the resumed step into ``checkpoints/superseded-...``, so
        the newest checkpoint of the folder (what ``--resume`` and ``cld-fast sample RUN`` pick) is always
        the resumed run's."""
        newer = [p for p in ckpt.list_checkpoints(self.ckpt_dir) if ckpt.step_of(p) > self.step]
        if not newer:
            return
        aside = os.path.join(self.ckpt_dir, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-resumed-at-{self.step:07d}")
        os.makedirs(aside, exist_ok=True)
        for p in newer:
            os.replace(p, os.path.join(aside, os.path.basename(p)))
        self.superseded = (aside, [os.path.basename(p) for p in newer])
        msg = (f"resumed from step {self.step}, older than {len(newer)} checkpoint(s) of this run "
               f"({', '.join(self.superseded[1])}): moved them to {aside} so that the newest checkpoint is this "
               "run's")
        if self.verbose:
            print(f"[cld-fast] {msg}", file=sys.stderr)
        else:
            warnings.warn(msg, UserWarning, stacklevel=3)

    # -- losses ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _model_input(self, u: torch.Tensor) -> torch.Tensor:
        return u.contiguous(memory_format=torch.channels_last) if self.channels_last and u.dim() == 4 else u

    def sample_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ U(loss_eps, 1), one per sample, float32 on the device."""
        eps = self.config.loss_eps
        return torch.rand(batch, generator=generator, device=self.device) * (1.0 - eps) + eps

    def _host_times(self, batch: int, dtype: torch.dtype):
        """t ~ U(loss_eps, 1) (B,) and a Philox seed (1,) int64, drawn on the host from the time generator
        and moved in one pinned, non-blocking copy: no host sync, and the same t for a seed on any device."""
        eps = self.config.loss_eps
        t = torch.rand(batch, generator=self.time_generator, dtype=torch.float64) * (1.0 - eps) + eps
        seed = torch.randint(0, philox.SEED_BOUND, (1,), generator=self.time_generator, dtype=torch.int64)
        word = torch.int32 if dtype == torch.float32 else torch.int64
        head = 8 // (torch.finfo(dtype).bits // 8)  # the seed's 8 bytes in words of the time dtype
        buf = torch.empty(head + batch, dtype=word)
        buf[:head] = seed.view(word)
        buf[head:].view(dtype).copy_(t)
        buf = buf.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else buf.to(self.device)
        return buf[head:].view(dtype), buf[:head].view(torch.int64)

    def cld_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """HSM loss of the mixed score: perturb (one fused launch), network, ``cf.hsm_loss`` (fused); batch mean.

        The kernels compute every coefficient from t themselves; t and the Philox seed come from the
        host time generator in one copy (``_host_times``).
        """
        t, seed = self._host_times(x0.shape[0], x0.dtype)
        # On a GPU the noise is drawn in-kernel from that seed; on the CPU from ``generator`` as
        # tensors, which the cpu backend's elementwise loop reads faster than it draws Philox.
        objective = self.config.objective
        # DSM also draws v0 ~ N(0, gamma M): from ``generator`` when it lives on x0's device (CPU), else
        # from the device's default generator (its state is in the checkpoint's RNG states).
        v0_gen = generator if generator is not None and generator.device == x0.device else None
        if x0.device.type == "cuda":
            u, noise = ops.perturb(x0, t, self.sde, objective=objective, seed=seed, generator=v0_gen)
        else:
            eps = torch.randn((x0.shape[0], 2, x0[0].numel()), generator=generator, dtype=x0.dtype)
            u, noise = ops.perturb(x0, t, self.sde, objective=objective, eps=eps, generator=v0_gen)
        with self._autocast():
            out = model(self._model_input(u), t)
        return ops.hsm_loss(out, u, t, self.sde, noise, weighting=self.config.weighting, objective=objective)

    def vp_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """DSM loss of the VP-SDE baseline with the mixed score score = c0 x + c1 out (plain torch).

        ``reweightedv2``: |sigma * score + eps|^2; ``likelihood``: beta(t) |score + eps / sigma|^2;
        summed over data dimensions, averaged over the batch.
        """
        b = x0.shape[0]
        t = self.sample_times(b, generator)
        alpha, sigma = self.sde.marginal_coefficients(t)
        coef = self.sde.mixed_score_coefficients(t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = alpha.to(x0.dtype).view(shape) * x0 + sigma.to(x0.dtype).view(shape) * eps
        with self._autocast():
            out = model(self._model_input(xt), t)
        score = coef[:, 0].float().view(shape) * xt + coef[:, 1].float().view(shape) * out.float()
        if self.config.weighting == "reweightedv2":
            r = sigma.float().view(shape) * score + eps
            w = None
        else:
            r = score + eps / sigma.float().view(shape)
            w = self.sde.beta(t).float()
        per = r.pow(2).flatten(1).sum(1)
        return (per * w if w is not None else per).mean()

    def dropped_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with each replaced by "no label" (the class count K) with probability ``label_dropout``,
        drawn from the training generator (classifier-free guidance trains both models in one network)."""
        drop = torch.rand(labels.shape, generator=self.generator, device=labels.device) < self.config.label_dropout
        return torch.where(drop, torch.full_like(labels, self.net.num_classes), labels)

    # -- one step -------------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """Learning rate of 0-based step ``step``: linear warm-up to ``lr`` over ``warmup`` steps."""
        cfg = self.config
        if cfg.warmup > 0:
            return cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        return cfg.lr

    def _init_accumulators(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        self._loss_count = 0
        self._bad_step = torch.full((), -1, device=self.device, dtype=torch.int64)
        self._gnorm = None

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the (device) loss without reading it."""
        if not hasattr(self, "_loss_sum"):
            self._init_accumulators()
        cfg = self.config
        x0 = self.data.next(self.step, self.generator)
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        model = self.model
        if cfg.conditional:
            model = functools.partial(model, class_labels=self.dropped_labels(self.data.labels_of(self.step)))
        with value_checks(False):
            loss = self.loss_fn(model, x0, self.generator)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        gnorm = None
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.params)
        self.step += 1
        # Device-side bookkeeping, read only at log / checkpoint points.
        ld = loss.detach().float()
        self._loss_sum += ld
        self._loss_count += 1
        ok = torch.isfinite(ld)
        if gnorm is not None and self.scaler is None:  # fp16: the scaler skips overflowing steps itself
            ok = ok & torch.isfinite(gnorm)
        self._bad_step = torch.where(ok | (self._bad_step >= 0), self._bad_step, self.step)
        self._gnorm = gnorm
        return loss

    # -- checks, logs, checkpoints --------------------------------------------------------------
    def _check_finite(self) -> None:
        """Raise NonFiniteLossError if any step since the start/resume had a non-finite loss (syncs)."""
        bad = self._bad_step.clone()
        if self.world_size > 1:
            # the first bad step on any rank: max over ranks of (-1 or step) after mapping -1 -> big
            big = torch.where(bad < 0, torch.full_like(bad, 2**62), bad)
            big = -dist_utils.all_reduce_max(-big)
            bad = torch.where(big >= 2**62, torch.full_like(bad, -1), big)
        k = int(bad.item())
        if k >= 0:
            raise NonFiniteLossError(k, self.last_checkpoint)

    def _params_finite(self) -> bool:
        tensors = [p.detach() for p in self.net.parameters()] + list(self.ema.shadow_params)
        norms = torch._foreach_norm([t.float() for t in tensors])
        return bool(torch.isfinite(torch.stack(norms)).all().item())

    def _log(self, metrics: "_MetricsWriter", bar, t_last: float, step_last: int) -> Dict[str, Any]:
        loss_sum = self._loss_sum.clone()
        count = torch.tensor(float(self._loss_count), device=self.device)
        if self.world_size > 1:
            dist_utils.all_reduce_sum(loss_sum)
            dist_utils.all_reduce_sum(count)
        mean_loss = float((loss_sum / count.clamp_min(1)).item())  # the one host sync per log interval
        self._check_finite()
        now = time.time()
        samples = (self.step - step_last) * self.config.batch_size
        rate = samples / max(now - t_last, 1e-9)
        record = {"step": self.step, "loss": mean_loss, "lr": self.learning_rate(self.step - 1),
                  "samples_per_s": rate, "time": now - self.t_start, "ema_decay": self.ema.current_decay(self.ema.num_updates)}
        if self._gnorm is not None:
            record["grad_norm"] = float(self._gnorm.item())
        if self.scaler is not None:
            record["loss_scale"] = float(self.scaler.get_scale())
        if self.is_main:
            self._lock.check()
            metrics.write(record)
            if bar is not None:
                unit = "img/s" if self.data.is_image else "samples/s"
                bar.set_postfix_str(f"loss {mean_loss:.4f}, {rate:,.0f} {unit}", refresh=False)
        self._loss_sum.zero_()
        self._loss_count = 0
        return record

    def state_dict(self) -> Dict[str, Any]:
        """The full training state (collective under DDP: every rank's RNG states are gathered)."""
        rng = ckpt.rng_state_tensors(self.generator)
        rng["time_generator"] = self.time_generator.get_state()
        gathered = dist_utils.all_gather_object({k: (v.cpu() if isinstance(v, torch.Tensor) else [s.cpu() for s in v])
                                                  for k, v in rng.items()})
        return {
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "ema": {**self.ema.state_dict(), "shadow_params": [s.detach().cpu() for s in self.ema.shadow_params]},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": {
                "torch_cpu": [g["torch_cpu"] for g in gathered],
                "torch_cuda": [g["torch_cuda"] for g in gathered],
                "generator": [g["generator"] for g in gathered],
                "time_generator": [g["time_generator"] for g in gathered],
                "generator_device": self.device.type,
            },
            "sampler": self.data.state_dict(self.step),
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "data_shape": [int(d) for d in self.data.shape],
            "n_params": int(self.n_params),
        }

    def load_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (from ``checkpoint.load_checkpoint``)."""
        self.net.load_state_dict(ckpt.bare_state_dict(state["model"]))
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        osd = copy.copy(state["optimizer"])
        # Keep this run's choice of fused/foreach kernels (the checkpoint may come from another device).
        osd["param_groups"] = [dict(g) for g in osd["param_groups"]]
        for g, mine in zip(osd["param_groups"], self.optimizer.param_groups):
            for key in ("fused", "foreach", "capturable"):
                if key in mine:
                    g[key] = mine[key]
        self.optimizer.load_state_dict(osd)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if int(state.get("world_size", 1)) == self.world_size and rng.get("generator_device") == self.device.type:
            ckpt.restore_rng_states({"torch_cpu": rng["torch_cpu"][self.rank], "torch_cuda": rng["torch_cuda"][self.rank],
                                     "generator": rng["generator"][self.rank]}, self.generator)
            if self.time_generator is not self.generator and rng.get("time_generator"):
                self.time_generator.set_state(rng["time_generator"][self.rank].cpu())
        else:
            warnings.warn(
                f"the checkpoint was written by {state.get('world_size')} rank(s) on {rng.get('generator_device')}; this run "
                f"has {self.world_size} on {self.device.type}: random streams are re-seeded from (seed, step, rank), so "
                "the continuation is statistically but not bitwise the same as an uninterrupted run", RuntimeWarning)
            torch.manual_seed(_rank_seed(self.config.seed + self.step, self.rank))
            self.generator.manual_seed(_rank_seed(self.config.seed + 7 * self.step + 1, self.rank))
            if self.time_generator is not self.generator:
                self.time_generator.manual_seed(_rank_seed(self.config.seed + 7 * self.step + 2, self.rank))

    def save_checkpoint(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0), after checking that everything is finite."""
        self._check_finite()
        ok = self._params_finite()
        if not ok:
            raise NonFiniteLossError(self.step, self.last_checkpoint, detail=" (non-finite parameters at the checkpoint)")
        state = self.state_dict()
        path = None
        if self.is_main:
            self._lock.check()  # never re-create a deleted or replaced run folder
            path = ckpt.save_checkpoint(state, self.ckpt_dir, self.step, keep=self.config.keep_checkpoints)
        dist_utils.barrier()
        self.last_checkpoint = os.path.abspath(path or ckpt.checkpoint_path(self.ckpt_dir, self.step))
        return self.last_checkpoint

    @torch.no_grad()
    def evaluate_loss(self, n: int = 4096, seed: int = 0, use_ema: bool = False) -> float:
        """The training loss on a fixed batch of ``n`` items (fixed data, times and noise from ``seed``).

        Toy data: fresh samples from the seeded generator; data sets: the first ``n`` items. The
        same ``seed`` gives the same batch, so values at different steps are directly comparable.
        """
        gen = torch.Generator(self.device).manual_seed(int(seed))
        x0 = self.data.reference(n, gen)
        net = self.ema_network() if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            with value_checks(False):
                loss = self.loss_fn(net, x0, gen)
        finally:
            net.train(was_training)
        return float(loss.item())

    # -- sampling for plots / evaluation ------------------------------------------------------
    def ema_network(self) -> nn.Module:
        """A copy of the network holding the EMA weights, in eval mode."""
        net = copy.deepcopy(self.net)
        self.ema.copy_to(net)
        return net.eval()

    def sample(self, n: int, steps: int, method: str, seed: int, network: Optional[nn.Module] = None):
        """``n`` samples from the EMA network (``cf.sample``); returns the SampleResult."""
        from .sampling import sample

        net = network if network is not None else self.ema_network()
        gen = torch.Generator(self.device).manual_seed(int(seed))
        shape = (n,) + tuple(self.data.shape)
        return sample(network_score(net, self.sde, self.config), shape, self.sde, steps=steps, method=method, generator=gen,
                      device=self.device, progress=self.progress and self.is_main)

    def _announce(self, what: str) -> None:
        """One ``[cld-fast]`` line on stderr from rank 0 when ``verbose``: what the run is doing or did."""
        if self.is_main and self.verbose:
            print(f"[cld-fast] {what}", file=sys.stderr, flush=True)

    def snapshot(self, tag: str) -> Optional[str]:
        """A sample plot of the EMA network under ``samples/`` (rank 0)."""
        if not self.is_main:
            return None
        cfg = self.config
        method = cfg.sample_method
        n = cfg.sample_count if not self.data.is_image else min(cfg.sample_count, 64)
        res = self.sample(n, cfg.sample_steps, method, seed=cfg.seed + 99991)
        from . import plots

        path = os.path.join(self.samples_dir, f"{tag}.png")
        if self.data.is_image:
            return plots.image_grid(res.x, path)
        if self.data.shape[0] == 2:
            ref = self.data.reference(n, torch.Generator(self.device).manual_seed(cfg.seed + 4242))
            return plots.scatter_2d(res.x, path, data=ref, title=f"step {self.step}, {method} {cfg.sample_steps} steps")
        return None

    # -- phase 5: the loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        self._init_accumulators()
        tb_dir = os.path.join(self.run_dir, "tensorboard") if (self.is_main and cfg.tensorboard) else None
        metrics = _MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl") if self.is_main else None, tb_dir)
        if self.is_main:
            self._lock.check()
            atomic_write_text(os.path.join(self.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=1))
        self._announce(f"run dir {self.run_dir} | {self.n_params:,} parameters | device {self.device} | "
                       f"{self.world_size} rank(s) | precision {cfg.precision} -> {self.autocast_dtype or torch.float32}")
        bar = None
        if self.is_main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), unit="step", dynamic_ncols=True,
                       desc=f"train {cfg.sde}", file=sys.stderr, mininterval=0.5)
        t_train = time.time()
        t_last, step_last = time.time(), self.step
        last_record: Dict[str, Any] = {}
        previous_handlers = self._install_signal_handlers()
        try:
            while self.step < cfg.steps:
                self.train_step()
                if bar is not None:
                    bar.update(1)
                at_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if at_log:
                    last_record = self._log(metrics, bar, t_last, step_last)
                    t_last, step_last = time.time(), self.step
                if self._should_stop(at_log):
                    self._stop(bar)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step != cfg.steps:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step != cfg.steps:
                    self.snapshot(f"step_{self.step:07d}")
                    dist_utils.barrier()
            if self._loss_count:
                last_record = self._log(metrics, bar, t_last, step_last)
            train_time = time.time() - t_train
            if bar is not None:
                bar.close()
                bar = None
            return self._finish(metrics, last_record, train_time)
        finally:
            self._restore_signal_handlers(previous_handlers)
            if bar is not None:
                bar.close()
            metrics.close()
            self._lock.release()

    # -- SIGINT / SIGTERM: checkpoint at the next step boundary ------------------------------------
    def _install_signal_handlers(self) -> Dict[int, Any]:
        """Route SIGINT/SIGTERM to a flag read between steps (main thread only; a second SIGINT
        interrupts at once)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._finishing is not None:  # final evaluation: the checkpoint is written, stop at once
                raise TrainingInterrupted(signum, self.step, self._finishing, after_final_checkpoint=True)
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)

    def _should_stop(self, at_log: bool) -> bool:
        """Whether a signal asked to stop. One rank: every step (a Python flag, no sync). DDP: only at
        log points, where the ranks already meet, so they all stop at the same step."""
        if self.world_size == 1:
            return self._stop_signal is not None
        if not at_log:
            return False
        flag = torch.tensor(float(self._stop_signal or 0), device=self.device)
        got = int(dist_utils.all_reduce_max(flag).item())
        if got and self._stop_signal is None:
            self._stop_signal = got
        return bool(got)

    def _stop(self, bar) -> None:
        """Checkpoint the current step and raise :class:`TrainingInterrupted`."""
        if bar is not None:
            bar.close()
        path = self.last_checkpoint
        if path != os.path.abspath(ckpt.checkpoint_path(self.ckpt_dir, self.step)):
            path = self.save_checkpoint()
        raise TrainingInterrupted(self._stop_signal, self.step, path)

    # -- phase 6 --------------------------------------------------------------------------------
    def _finish(self, metrics: "_MetricsWriter", last_record: Dict[str, Any], train_time: float) -> TrainResult:
        cfg = self.config
        path = self.save_checkpoint()
        if self._stop_signal is not None:  # a signal between the last step and the final checkpoint
            raise TrainingInterrupted(self._stop_signal, self.step, path, after_final_checkpoint=True)
        self._finishing = path
        result = TrainResult(run_dir=self.run_dir, step=self.step, loss=last_record.get("loss"), checkpoint=path,
                             metrics=os.path.join(self.run_dir, "metrics.jsonl"), train_time=train_time)
        if self.is_main:
            result.samples_plot = self.snapshot("samples_final")
            if self.data.toy is not None:
                self._evaluate_toy(result, metrics)
            elif cfg.data in PACKAGED_DATASETS:
                self._evaluate_digits(result, metrics)
        dist_utils.barrier()
        result.wall_time = time.time() - self.t_start
        return result

    def _evaluate_toy(self, result: TrainResult, metrics: "_MetricsWriter") -> None:
        """Energy distance of EMA samples to fresh data (``sample_method``, ``eval_steps``), samples .npz, and the
        quality figure (every fixed-step sampler of the SDE at 10 to 200 steps)."""
        import numpy as np

        from . import plots
        from .toy import energy_distance

        cfg = self.config
        n = cfg.eval_samples
        net = self.ema_network()
        main_method = cfg.sample_method
        gdata = torch.Generator(self.device).manual_seed(cfg.seed + 31337)
        ref = self.data.reference(n, gdata)
        ref2 = self.data.reference(n, gdata)
        self._announce(f"evaluating: {n:,} samples ({main_method}, {cfg.eval_steps} steps) against fresh data")
        t0 = time.time()
        res = self.sample(n, cfg.eval_steps, main_method, seed=cfg.seed + 2024, network=net)
        sample_time = time.time() - t0
        ed = energy_distance(res.x, ref)
        floor = energy_distance(ref2, ref)
        # What a Gaussian with the data's mean and covariance scores: the baseline any model must beat.
        mu, cov = ref2.mean(0), torch.cov(ref2.T)
        gauss = mu + torch.randn(ref2.shape, generator=gdata, device=ref2.device) @ torch.linalg.cholesky(cov).T
        gauss_ed = energy_distance(gauss, ref)
        result.energy_distance, result.energy_distance_floor = ed, floor
        npz = os.path.join(self.run_dir, "samples_final.npz")
        arrays = {"x": res.x.cpu().numpy()}
        if res.v is not None:
            arrays["v"] = res.v.cpu().numpy()
        with atomic_writer(npz) as f:
            np.savez(f, **arrays)
        result.samples_npz = npz
        record = {"step": self.step, "eval": {"method": main_method, "steps": cfg.eval_steps, "n": n,
                                              "energy_distance": ed, "energy_distance_data_vs_data": floor,
                                              "energy_distance_gaussian_fit": gauss_ed,
                                              "sample_seconds": sample_time}}
        if cfg.quality_figure:
            from .samplers import sampler_names

            methods = sampler_names(self.sde, fixed_steps=True)
            curves: Dict[str, List] = {}
            for m in methods:
                curves[m] = []
                for s in (10, 20, 50, 100, 200):
                    if m == main_method and s == cfg.eval_steps:
                        curves[m].append((s, ed))
                        continue
                    r = self.sample(n, s, m, seed=cfg.seed + 2024, network=net)
                    curves[m].append((s, energy_distance(r.x, ref)))
            record["eval"]["curves"] = {m: [[s, e] for s, e in v] for m, v in curves.items()}
            record["eval"]["recommended"] = recommend_sampler(curves, floor)
            note = plots.log_floor_note([e for v in curves.values() for _, e in v] + [gauss_ed])
            if note:  # the figure's log axis can't show these: say so next to the numbers too
                record["eval"]["plot_note"] = note
            result.quality_plot = plots.quality_figure(
                os.path.join(self.run_dir, "quality.png"), res.x, ref, curves, floor=floor, baseline=gauss_ed,
                title=f"{cfg.data}: {main_method} {cfg.eval_steps} steps, energy distance {ed:.4f}")
        metrics.write(record)
        result.extra["eval"] = record["eval"]

    def _evaluate_digits(self, result: TrainResult, metrics: "_MetricsWriter") -> None:
        """Digit data: ``cld_fast.metrics.digit_metrics`` of ``eval_samples`` EMA samples (``sample_method``,
        ``eval_steps``) against the held-out split, with the data-vs-held-out floor; samples .npz. Skipped
        with a note when the ``metrics`` extra is missing."""
        import numpy as np

        from .data import HELDOUT

        cfg = self.config
        n = min(cfg.eval_samples, HELDOUT[cfg.data])
        method = cfg.sample_method
        record: Dict[str, Any] = {"step": self.step, "eval": {"method": method, "steps": cfg.eval_steps, "n": n}}
        self._announce(f"evaluating: {n:,} samples ({method}, {cfg.eval_steps} steps) against the held-out images")
        t0 = time.time()
        res = self.sample(n, cfg.eval_steps, method, seed=cfg.seed + 2024)
        record["eval"]["sample_seconds"] = time.time() - t0
        npz = os.path.join(self.run_dir, "samples_final.npz")
        np.savez(npz, x=res.x.cpu().numpy())
        result.samples_npz = npz
        try:
            from .metrics import digit_metrics

            record["eval"].update(digit_metrics(cfg.data, res.x, seed=cfg.seed))
            if cfg.quality_figure:
                self._announce(f"sampler table: {min(n, DIGIT_TABLE_SAMPLES)} samples per sampler and step count")
                table = self._digit_sampler_table(min(n, DIGIT_TABLE_SAMPLES))
                record["eval"]["sampler_table"] = table
                result.extra["sampler_table_md"] = self._write_sampler_table(table, record["eval"]["floor"]["fd"])
        except (ImportError, FileNotFoundError) as exc:  # the metrics extra, or the classifier weights, missing
            record["eval"]["skipped"] = str(exc)
            warnings.warn(f"no image metrics: {exc}", RuntimeWarning, stacklevel=2)
        metrics.write(record)
        result.extra["eval"] = record["eval"]

    def _digit_sampler_table(self, n: int) -> Dict[str, List]:
        """{method: [[steps, Frechet distance, classified with p >= 0.9], ...]} of ``n`` EMA samples per cell,
        SSCS and gDDIM (their defaults; EM for a VP-SDE) at ``DIGIT_TABLE_STEPS`` steps, one sampler seed."""
        from .metrics import digit_metrics, load_classifier
        from .samplers import sampler_names

        cfg = self.config
        clf = load_classifier(cfg.data)
        net = self.ema_network()
        table: Dict[str, List] = {}
        methods = [m for m in ("sscs", "gddim") if m in sampler_names(self.sde)] or [cfg.sample_method]
        for method in methods:
            table[method] = []
            for steps in DIGIT_TABLE_STEPS:
                r = self.sample(n, steps, method, seed=cfg.seed + 2024, network=net)
                m = digit_metrics(cfg.data, r.x, seed=cfg.seed, classifier=clf)
                table[method].append([steps, m["fd"], m["classifier"]["confident"]])
        return table

    def _write_sampler_table(self, table: Dict[str, List], floor_fd: float) -> str:
        """``sampler_table.md`` in the run folder: Frechet distance (confident fraction) per sampler and steps."""
        steps = [row[0] for row in next(iter(table.values()))]
        lines = ["# Samplers on this model: Frechet distance (classified with p >= 0.9) vs steps", "",
                 f"Step {self.step}, EMA weights; floor (training images vs held-out): {floor_fd:.2f}.", "",
                 "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
                 "| :--- |" + " ---: |" * len(steps)]
        for method, rows in table.items():
            lines.append(f"| {method} | " + " | ".join(f"{fd:.2f} ({c:.2f})" for _, fd, c in rows) + " |")
        path = os.path.join(self.run_dir, "sampler_table.md")
        with atomic_writer(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def close(self) -> None:
        """Release the run-folder lock; tear down the process group if this trainer created it."""
        self._lock.release()
        if self.owns_process_group:
            dist_utils.destroy()
            self.owns_process_group = False


DIGIT_TABLE_STEPS = (10, 20, 50)
DIGIT_TABLE_SAMPLES = 300  # per cell: the Frechet distance's estimate is stable enough to rank samplers


def recommend_sampler(curves: Dict[str, Sequence[Tuple[int, float]]], floor: float) -> dict:
    """The cheapest (method, steps) whose energy distance is within reach of the best one measured.

    ``curves``: {method: [(steps, energy distance), ...]}; ``floor``: the data-vs-data energy distance
    (estimator noise). Within reach: at most best + max(best / 2, 2 |floor|). Returns
    {"method", "steps", "energy_distance", "best": {"method", "steps", "energy_distance"}}.
    """
    points = [(e, s, m) for m, pts in curves.items() for s, e in pts]
    if not points:
        raise ValueError("curves must hold at least one (steps, energy distance) point")
    best_e, best_s, best_m = min(points)
    reach = best_e + max(0.5 * abs(best_e), 2.0 * abs(floor))
    e, s, m = min((p for p in points if p[0] <= reach), key=lambda p: (p[1], p[0]))
    return {"method": m, "steps": s, "energy_distance": e,
            "best": {"method": best_m, "steps": best_s, "energy_distance": best_e}}


def _remove_empty_run_folder(run_dir: str) -> None:
    """Undo the folders a trainer that failed before training created (only empty folders are removed)."""
    for d in (os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "samples"), run_dir):
        try:
            os.rmdir(d)
        except OSError:
            pass


def train(config: TrainConfig, run_dir: str, *, resume=None, model: Optional[nn.Module] = None, progress: bool = True,
          loss_fn: Optional[LossFn] = None, verbose: bool = True) -> TrainResult:
    """Train with ``config`` into ``run_dir`` (see :class:`Trainer`) and return a :class:`TrainResult`."""
    trainer = Trainer(config, run_dir, model=model, resume=resume, progress=progress, loss_fn=loss_fn, verbose=verbose)
    try:
        return trainer.run()
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------------
# Loading for sampling
# ------------------------------------------------------------------------------------------------
def load_for_sampling(path: str, use_ema: bool = True, device=None):
    """(network in eval mode, sde, TrainConfig, data shape) from one of our training checkpoints (a file
    or a run folder): ``cf.load_score_model(path, kind="cld_fast")``."""
    from .loading import load_score_model

    m = load_score_model(path, use_ema=use_ema, device=device, kind="cld_fast")
    return m.network, m.sde, m.config, m.data_shape


def _first_line(exc: BaseException, limit: int = 400) -> str:
    """The error message on one line, cut at a word boundary after ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
