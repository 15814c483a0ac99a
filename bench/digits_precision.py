"""fp32 vs bf16 autocast on the CPU: the ``digits`` preset (NCSN++ ``digits8``, 8x8 digits) trained twice.

    python -m bench.digits_precision --stage train --steps 1200     # both runs, interleaved step by step
    python -m bench.digits_precision --stage eval                   # metrics, plots, results file

The two trainers (same preset, seed and steps; ``precision`` fp32 and bf16) advance in lockstep,
one step each in turn, so both see the same machine load and their step times compare. Each step's
loss and wall time are recorded. ``eval`` samples the EMA networks (SSCS), computes the
``cld_fast.metrics`` digit metrics of each against the held-out split (and the data-vs-held-out
floor), and writes into ``bench/results/``:

* ``digits_precision-cpu.md``   device, versions, commit, date, time per step, metrics table
* ``digits_precision-cpu.json`` the same numbers and the loss curves
* ``digits_precision-cpu-loss.png``  loss curves (moving average)
* ``digits-fp32-samples.png``, ``digits-bf16-samples.png``  sample grids (64 each)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from . import common

PRECISIONS = ("fp32", "bf16")
RESULTS = common.ROOT / "bench" / "results"


def train_stage(run_root: str, steps: int, threads: int, seed: int) -> dict:
    """Train both precisions in lockstep; returns {precision: {"loss": [...], "step_s": [...], "ckpt": path}}."""
    from cld_fast.config import get_preset
    from cld_fast.train import Trainer

    trainers = {}
    for p in PRECISIONS:
        cfg = get_preset("digits", precision=p, steps=steps, seed=seed, num_threads=threads, ckpt_every=0)
        trainers[p] = Trainer(cfg, os.path.join(run_root, p), progress=False, verbose=False)
    log = {p: {"loss": [], "step_s": []} for p in PRECISIONS}
    try:
        for step in range(steps):
            for p, tr in trainers.items():
                t0 = time.perf_counter()
                loss = float(tr.train_step().item())
                log[p]["step_s"].append(time.perf_counter() - t0)
                log[p]["loss"].append(loss)
            if (step + 1) % 50 == 0:
                print(f"step {step + 1}: " + ", ".join(f"{p} loss {np.mean(log[p]['loss'][-50:]):.3f} "
                                                       f"{np.median(log[p]['step_s'][-50:]):.3f} s/step" for p in PRECISIONS),
                      flush=True)
        for p, tr in trainers.items():
            log[p]["ckpt"] = tr.save_checkpoint()
            log[p]["n_params"] = tr.n_params
    finally:
        for tr in trainers.values():
            tr.close()
    with open(os.path.join(run_root, "train_log.json"), "w") as f:
        json.dump({"steps": steps, "threads": threads, "seed": seed, "log": log}, f)
    return log


def eval_stage(args) -> None:
    raise NotImplementedError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("train", "eval", "all"), default="all")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-root", default="runs/digits_precision")
    ap.add_argument("--samples", type=int, default=300, help="samples per model for the metrics")
    ap.add_argument("--sample-steps", type=int, default=100)
    args = ap.parse_args(argv)
    os.makedirs(args.run_root, exist_ok=True)
    if args.stage in ("train", "all"):
        train_stage(args.run_root, args.steps, args.threads, args.seed)
    if args.stage in ("eval", "all"):
        eval_stage(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
