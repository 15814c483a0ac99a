"""End-to-end training on a packaged digit set with its preset, as ``cld-fast train --data NAME`` runs it.

    python -m bench.digits_train --data digits --steps 4000
    python -m bench.digits_train --data mnist5k --steps 300     # a timing run: extrapolates the preset's steps

Trains with ``cld_fast.train.train`` (preset ``digits`` or ``mnist5k``, fp32 on the CPU), whose last
phase samples the EMA network (SSCS, ``eval_steps``) and computes the ``cld_fast.metrics`` digit
metrics with their floor. Writes ``bench/results/<data>-<steps>steps-train-cpu.md`` / ``.json`` (device, versions,
commit, date, time per step, the estimate for the preset's full step count, metrics) and the sample
grid ``bench/results/<data>-<steps>steps-samples.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from . import common

RESULTS = common.ROOT / "bench" / "results"


def _row(name, m):
    c, mem = m["classifier"], m["memorisation"]
    return [name, f"{m['fd']:.3f}", f"{c['confident']:.3f}", f"{c['min_class']:.3f}",
            " ".join(f"{h:.2f}" for h in c["histogram"]), f"{mem['ratio']:.3f}", f"{mem['copies']:.3f}"]


def main(argv=None) -> int:
    from cld_fast.config import get_preset
    from cld_fast.train import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("digits", "mnist5k"), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-samples", type=int, default=None)
    ap.add_argument("--run-root", default="runs/digits_train")
    args = ap.parse_args(argv)
    full = get_preset(args.data)
    over = dict(steps=args.steps, precision="fp32", num_threads=args.threads, ckpt_every=0)
    if args.eval_samples:
        over["eval_samples"] = args.eval_samples
    cfg = get_preset(args.data, **over)
    run = os.path.join(args.run_root, f"{args.data}-{args.steps}")
    shutil.rmtree(run, ignore_errors=True)
    torch.set_num_threads(args.threads)
    info = common.device_info(torch.device("cpu"))
    r = train(cfg, run, progress=False, verbose=False)
    ev = r.extra["eval"]
    s_per_step = r.train_time / args.steps
    grid = RESULTS / f"{args.data}-{args.steps}steps-samples.png"
    shutil.copyfile(r.samples_plot, grid)
    with open(r.metrics) as f:
        losses = [json.loads(line) for line in f if '"loss"' in line]
    lines = [f"# `{args.data}` preset trained on the CPU ({args.steps} steps)", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {info['commit']}, {info['date']}",
             f"- written by `python -m bench.digits_train --data {args.data} --steps {args.steps} --threads {args.threads}` "
             f"(preset `{args.data}`: model `{cfg.model}`, batch {cfg.batch_size}, lr {cfg.lr}, fp32)", "",
             common.md_table(["steps", "training loop s", "s/step", f"estimate for the preset's {full.steps} steps",
                              "loss (last log)", "sampling s"],
                             [[args.steps, f"{r.train_time:.0f}", f"{s_per_step:.3f}",
                               f"{full.steps * s_per_step / 60:.0f} min", f"{losses[-1]['loss']:.3f}",
                               f"{ev['sample_seconds']:.0f}"]]),
             "", f"Metrics of {ev['n']} samples (SSCS {ev['steps']} steps, EMA weights) against the {ev['n_heldout']} "
                 "held-out images; floor: as many training images against the same held-out images.", "",
             common.md_table(["", "Frechet distance", "classifier >= 0.9", "rarest class", "class histogram 0..9",
                              "NN ratio to held-out", "copies"],
                             [_row("samples", ev), _row("floor (data vs held-out)", ev["floor"])]),
             "", f"Samples: `{grid.name}`.", ""]
    (RESULTS / f"{args.data}-{args.steps}steps-train-cpu.md").write_text("\n".join(lines))
    (RESULTS / f"{args.data}-{args.steps}steps-train-cpu.json").write_text(json.dumps(
        {"info": info, "steps": args.steps, "threads": args.threads, "train_time_s": r.train_time,
         "s_per_step": s_per_step, "preset_steps": full.steps, "eval": ev, "loss_log": losses}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
