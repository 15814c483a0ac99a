"""Training table: optimizer steps per second (images/s) and peak memory, official-style vs ours.

GPU: the NCSN++ ``cifar10`` network at batch 128.

    official-style  fp16 autocast + GradScaler, the eager official loss (``official_style.loss_fn``),
                    ``torch.optim.Adam`` (PyTorch's default implementation), warm-up, clipping, and the
                    per-parameter EMA loop (``official_style.make_train_step``)
    ours            ``cld_fast.train.Trainer.train_step``: bf16 autocast, fused perturb + HSM loss,
                    fused Adam, channels_last, EMA, with and without ``torch.compile`` of the network

CPU (``--quick``): the toy MLP at batch 4096, both in fp32.

Both sides run under the same global flags (TF32 and cuDNN autotuning on, as ``Trainer`` sets them;
restored afterwards). The official-style side gets pre-made batches on the device (no data loading),
ours takes its batches from the Trainer's data source (a synthetic uint8 ``.npz`` of CIFAR-10's
shape for the GPU run, the toy swiss roll on the CPU): any loading cost is charged to ours.
"""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from . import common
from . import official_style as off


@dataclass
class Row:
    model: str
    batch: int
    variant: str
    precision: str
    steps: int = 0
    seconds: Optional[float] = None
    peak_mem: Optional[int] = None
    warmup_s: Optional[float] = None
    na: Optional[str] = None

    @property
    def images_per_s(self):
        return None if not self.seconds else self.batch * self.steps / self.seconds


@contextlib.contextmanager
def _global_flags(device):
    """TF32 + cuDNN benchmark as Trainer sets them, restored on exit."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed_steps(step_fn, device, warmup: int, steps: int, row: Row):
    t0 = time.perf_counter()
    for _ in range(warmup):
        step_fn()
    common.sync(device)
    row.warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def loop():
        for _ in range(steps):
            step_fn()

    row.seconds = common.time_block(loop, device)
    row.steps = steps
    if device.type == "cuda":
        row.peak_mem = torch.cuda.max_memory_allocated(device)


def run(device: torch.device, quick: bool, log=print, workdir: Optional[str] = None) -> List[Row]:
    from cld_fast.models import build_model

    on_gpu = device.type == "cuda"
    if on_gpu:
        model_name, preset, batch, shape = "NCSN++ cifar10", "cifar10", 128, (3, 32, 32)
        warmup, steps = 3, 10
    else:
        model_name, preset, batch, shape = "toy MLP (toy2d)", "toy", 4096, (2,)
        warmup, steps = 3, (20 if quick else 100)
    rows: List[Row] = []
    with _global_flags(device), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # ---- official-style ----------------------------------------------------------------------
        row = Row(model_name, batch, "official-style (eager loss, Adam, per-tensor EMA)",
                  "fp16 autocast + GradScaler" if on_gpu else "fp32")
        rows.append(row)
        try:
            torch.manual_seed(0)
            net = build_model(preset if on_gpu else "toy2d").to(device).train()
            opt = torch.optim.Adam(net.parameters(), lr=2e-4 if on_gpu else 1e-3)
            step = off.make_train_step(off.OfficialCLD(), net, opt, lr=2e-4 if on_gpu else 1e-3,
                                       warmup=5000 if on_gpu else 0,
                                       autocast_dtype=torch.float16 if on_gpu else None,
                                       ema_rate=0.9999 if on_gpu else 0.999)
            g = torch.Generator(device=device).manual_seed(0)
            batches = [(torch.rand((batch,) + shape, generator=g, device=device) * 2 - 1) for _ in range(4)]
            it = {"i": 0}

            def official_step():
                it["i"] += 1
                step(batches[it["i"] % len(batches)])

            _timed_steps(official_step, device, warmup, steps, row)
            log(f"  train {row.variant}: {row.images_per_s:.1f} images/s")
        except Exception as exc:  # noqa: BLE001
            row.na = f"official-style step failed: {common.short_error(exc)}"
            log("  " + row.na)
        net = opt = step = batches = None
        _free(device)

        # ---- ours: cld_fast.train.Trainer ----------------------------------------------------------
        for compile_ in ((False, True) if (on_gpu or not quick) else (False,)):
            label = "ours: cld_fast Trainer" + (" + torch.compile" if compile_ else " (eager)")
            row = Row(model_name, batch, label, "bf16 autocast" if on_gpu else "fp32")
            rows.append(row)
            if compile_ and common.env_flag("BENCH_NO_COMPILE"):
                row.na = "torch.compile switched off (BENCH_NO_COMPILE=1 or --no-compile)"
                continue
            skip = common.budget_note(200.0 if (compile_ and on_gpu) else 20.0)
            if skip:
                row.na = skip
                continue
            try:
                trainer = _make_trainer(on_gpu, compile_, batch, shape, device, tmp)
                _timed_steps(trainer.train_step, device, warmup, steps, row)
                log(f"  train {row.variant}: {row.images_per_s:.1f} images/s (warm-up {row.warmup_s:.1f} s)")
            except Exception as exc:  # noqa: BLE001
                row.na = f"{label} failed: {common.short_error(exc)}"
                log("  " + row.na)
            trainer = None
            _free(device)
        if not on_gpu and quick:
            rows.append(Row(model_name, batch, "ours: cld_fast Trainer + torch.compile", "fp32",
                            na="skipped in --quick (compiling the training step takes longer than the CI budget on 2 cores)"))
    return rows


def _make_trainer(on_gpu: bool, compile_: bool, batch: int, shape, device, tmp: str):
    from cld_fast.config import get_preset
    from cld_fast.train import Trainer

    common_kw = dict(steps=10**9, log_every=10**9, ckpt_every=0, sample_every=0, compile=compile_,
                     device=str(device), batch_size=batch, quality_figure=False)
    if on_gpu:
        npz = os.path.join(tmp, "cifar_shaped.npz")
        if not os.path.exists(npz):
            rng = np.random.default_rng(0)
            np.savez(npz, x=rng.integers(0, 256, size=(4 * batch,) + tuple(shape[1:]) + (shape[0],), dtype=np.uint8))
        cfg = get_preset("cifar10", data="npz", data_path=npz, precision="bf16", num_workers=0, **common_kw)
    else:
        cfg = get_preset("toy", precision="fp32", **common_kw)
    run_dir = tempfile.mkdtemp(dir=tmp, prefix="run-")
    return Trainer(cfg, run_dir, progress=False, verbose=False)


def render(rows: List[Row], device: torch.device, notes: common.Footnotes) -> str:
    n_what = notes.ref(
        "official-style: bench/official_style.py make_train_step (official loss structure with its NaN-check "
        "host syncs, torch.optim.Adam defaults, lr warm-up, clip_grad_norm_, GradScaler on GPU, per-tensor EMA). "
        "ours: cld_fast.train.Trainer.train_step (fused perturb + HSM loss, fused Adam on CUDA / foreach on CPU, "
        "channels_last images, foreach clipping, EMA; bf16 autocast on GPU). Same network, batch and global "
        "TF32/cuDNN flags. Timed: N optimizer steps after warm-up steps (torch.compile compiles during the warm-up).")
    header = ["network", "batch", "variant", "precision", f"images/s {n_what}", "steps timed", "warm-up s",
              "peak memory", "speed-up vs official"]
    base = rows[0].images_per_s if rows and rows[0].images_per_s else None
    out = []
    for r in rows:
        if r.na:
            out.append([r.model, f"{r.batch:,}", r.variant, r.precision, notes.na(r.na), "-", "-", "-", "-"])
            continue
        mem = common.human_bytes(r.peak_mem) if r.peak_mem is not None else (
            "n/a " + notes.ref("torch.cuda.max_memory_allocated needs a GPU") if device.type != "cuda" else "-")
        out.append([r.model, f"{r.batch:,}", r.variant, r.precision, common.fmt(r.images_per_s), str(r.steps),
                    common.fmt(r.warmup_s), mem, f"{r.images_per_s / base:,.2f}x" if base else "-"])
    return common.md_table(header, out, align="llllrrrrr")
