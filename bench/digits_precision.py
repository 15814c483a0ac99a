"""fp32 vs bf16 autocast on the CPU: the ``digits`` preset (NCSN++ ``digits8``, 8x8 digits) trained twice.

    python -m bench.digits_precision --stage train --steps 1200     # both runs, interleaved step by step
    python -m bench.digits_precision --stage eval                   # metrics, plots, results file

The two trainers (same preset, seed and steps; ``precision`` fp32 and bf16) advance in lockstep,
one step each in turn, so both see the same machine load and their step times compare. Each step's
loss and wall time are recorded. ``eval`` samples the EMA networks (SSCS), computes the
``cld_fast.metrics`` digit metrics of each against the held-out split (and the data-vs-held-out
floor), and writes into ``bench/results/``:

* ``digits_precision-cpu.md``   device, versions, commit, date, time per step, metrics table (each model
  sampled twice with different seeds, and the floor from two training subsets: how much the numbers
  move from sampling alone)
* ``digits_precision-cpu.json`` the same numbers and the loss curves
* ``digits_precision-cpu-loss.png``  loss curves (moving average)
* ``digits-fp32-samples.png``, ``digits-bf16-samples.png``  sample grids (64 each); ``digits-heldout.png``
  the first 64 held-out images, for comparison
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


def _samples(ckpt: str, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` SSCS samples (``steps`` steps) of the EMA network of ``ckpt``, (n, 1, 8, 8) float32 on the CPU."""
    import cld_fast as cf
    from cld_fast.train import load_for_sampling, network_score

    net, sde, cfg, shape = load_for_sampling(ckpt, use_ema=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        res = cf.sample(network_score(net, sde, cfg), (n,) + tuple(shape), sde, steps=steps, method="sscs",
                        generator=gen)
    return res.x.float().cpu()


def _moving_average(x, k: int = 25):
    x = np.asarray(x, dtype=np.float64)
    return np.convolve(x, np.ones(k) / k, mode="valid")


def _loss_plot(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in PRECISIONS:
        ma = _moving_average(log[p]["loss"])
        a.plot(np.arange(len(ma)) + 25, ma, label=p)
        b.plot(np.arange(len(log[p]["step_s"])) + 1, np.asarray(log[p]["step_s"]) * 1e3, label=p, lw=0.6)
    a.set(xlabel="step", ylabel="HSM loss (moving average of 25)", title="digits (8x8): training loss")
    b.set(xlabel="step", ylabel="ms per step", yscale="log", title="time per step (interleaved runs)")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, m: dict) -> list:
    c, mem = m["classifier"], m["memorisation"]
    return [name, f"{m['fd']:.3f}", f"{c['confident']:.3f}", f"{c['min_class']:.3f}",
            " ".join(f"{h:.2f}" for h in c["histogram"]), f"{mem['median_nn_samples']:.3f}", f"{mem['ratio']:.3f}",
            f"{mem['copies']:.3f}"]


def eval_stage(args) -> None:
    from cld_fast import plots
    from cld_fast.metrics import digit_metrics

    with open(os.path.join(args.run_root, "train_log.json")) as f:
        train = json.load(f)
    log = train["log"]
    torch.set_num_threads(args.threads)
    info = common.device_info(torch.device("cpu"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    metrics, resampled = {}, {}
    for p in PRECISIONS:
        x = _samples(log[p]["ckpt"], args.samples, args.sample_steps, seed=args.seed + 1)
        plots.image_grid(x[:64], str(RESULTS / f"digits-{p}-samples.png"))
        metrics[p] = digit_metrics("digits", x, seed=args.seed)
        # The same model with other sampler noise: how much the numbers move without any change to the model.
        resampled[p] = digit_metrics("digits", _samples(log[p]["ckpt"], args.samples, args.sample_steps, seed=args.seed + 2),
                                     seed=args.seed + 1)
    _loss_plot(log, str(RESULTS / "digits_precision-cpu-loss.png"))
    from cld_fast.data import center, load_packaged

    held, _ = load_packaged("digits", "heldout")
    plots.image_grid(center(held[:64].float() / 255.0), str(RESULTS / "digits-heldout.png"))  # what real data looks like
    timing = {p: {"median_ms": 1e3 * float(np.median(log[p]["step_s"])), "mean_ms": 1e3 * float(np.mean(log[p]["step_s"])),
                  "total_s": float(np.sum(log[p]["step_s"])),
                  "final_loss_last100": float(np.mean(log[p]["loss"][-100:]))} for p in PRECISIONS}
    floor = metrics["fp32"]["floor"]
    lines = ["# fp32 vs bf16 autocast on the CPU: NCSN++ `digits8` on 8x8 digits", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {info['commit']}, {info['date']}",
             f"- written by `python -m bench.digits_precision` (preset `digits`, {train['steps']} steps each, seed "
             f"{train['seed']}, {train['threads']} thread(s); the two runs advance in lockstep, one step each in turn)",
             f"- parameters: {log['fp32']['n_params']:,}; samples: {args.samples} per model, SSCS {args.sample_steps} steps "
             f"(EMA weights); metrics against the {metrics['fp32']['n_heldout']} held-out images", "",
             "## Time per step", "",
             common.md_table(["precision", "median ms/step", "mean ms/step", "training loop s", "loss (mean of last 100 steps)"],
                             [[p, f"{timing[p]['median_ms']:.1f}", f"{timing[p]['mean_ms']:.1f}", f"{timing[p]['total_s']:.0f}",
                               f"{timing[p]['final_loss_last100']:.3f}"] for p in PRECISIONS]),
             "", "## Sample quality (floor: as many training images vs the held-out images)", "",
             common.md_table(["", "Frechet distance", "classifier >= 0.9", "rarest class", "class histogram 0..9",
                              "median NN distance", "NN ratio to held-out", "copies"],
                             [_row(p, metrics[p]) for p in PRECISIONS]
                             + [_row(f"{p}, other sampler seed", resampled[p]) for p in PRECISIONS]
                             + [_row("floor (data vs held-out)", floor),
                                _row("floor, other training subset", resampled["fp32"]["floor"])]),
             "",
             f"Held-out accuracy of the feature classifier: {metrics['fp32']['heldout_classifier']['accuracy']:.4f}. "
             "Loss curves and step times: `digits_precision-cpu-loss.png`; samples: `digits-fp32-samples.png`, "
             "`digits-bf16-samples.png`.", ""]
    (RESULTS / "digits_precision-cpu.md").write_text("\n".join(lines))
    (RESULTS / "digits_precision-cpu.json").write_text(json.dumps(
        {"info": info, "steps": train["steps"], "threads": train["threads"], "timing": timing, "metrics": metrics,
         "metrics_other_seed": resampled,
         "loss": {p: log[p]["loss"] for p in PRECISIONS}}, indent=1) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("train", "eval", "all"), default="all")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=1)
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
