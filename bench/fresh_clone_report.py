"""The results file of ``bench/fresh_clone_mnist5k.sh``: what a newcomer's ``cld-fast train --data mnist5k``
on a fresh clone produced, and how long it took.

    python -m bench.fresh_clone_report --clone DIR --train-log LOG --load-log LOG \\
        --install-seconds S --train-seconds S

Reads the run folder the command wrote (``DIR/runs/mnist5k-*``: ``metrics.jsonl``, ``sampler_table.md``,
the sample grid) and writes ``mnist5k-fresh-clone-cpu.md`` / ``.json`` and
``mnist5k-fresh-clone-samples.png`` into ``--out`` (default ``bench/results/``): wall times (install;
training, sampling and scoring), time per step, the load average during the run, the Frechet distance
with its floor and the other digit metrics, and the sampler table, with the device, versions, the
clone's commit and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Dict, List

import torch

from . import common
from .digits_train import _row

RESULTS = common.ROOT / "bench" / "results"
NAME = "mnist5k-fresh-clone"


def _run_dir(clone: pathlib.Path) -> pathlib.Path:
    runs = sorted((clone / "runs").glob("mnist5k-*"))
    if len(runs) != 1:
        raise SystemExit(f"fresh_clone_report: expected one run folder under {clone / 'runs'}, found {len(runs)}")
    return runs[0]


def _records(run: pathlib.Path) -> List[Dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_averages(path: pathlib.Path) -> List[float]:
    """The 1-minute load averages of an ``uptime`` log, one a minute."""
    return [float(m.group(1)) for m in re.finditer(r"load average: ([0-9.]+)", path.read_text())]


def _clone_commit(clone: pathlib.Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clone", type=pathlib.Path, required=True, help="the fresh clone the job ran in")
    ap.add_argument("--train-log", type=pathlib.Path, required=True, help="stdout + stderr of cld-fast train")
    ap.add_argument("--load-log", type=pathlib.Path, required=True, help="uptime once a minute during the job")
    ap.add_argument("--install-seconds", type=float, required=True)
    ap.add_argument("--train-seconds", type=float, required=True, help="wall time of cld-fast train")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder of the results files")
    args = ap.parse_args(argv)

    run = _run_dir(args.clone)
    records = _records(run)
    config = json.loads((run / "config.json").read_text())
    steps = [r for r in records if "loss" in r]
    evals = [r["eval"] for r in records if "eval" in r]
    if not steps or not evals:
        raise SystemExit(f"fresh_clone_report: {run / 'metrics.jsonl'} has no training log or no evaluation")
    ev = evals[-1]
    if "fd" not in ev:
        raise SystemExit(f"fresh_clone_report: the evaluation was skipped: {ev.get('skipped')}")
    loop_s = steps[-1]["time"]
    n_steps = steps[-1]["step"]
    rest_s = args.train_seconds - loop_s - ev["sample_seconds"]
    loads = _load_averages(args.load_log)
    build = json.loads((args.clone / "cld_fast" / "_build_info.json").read_text())
    info = common.device_info(torch.device("cpu"))
    info["commit"] = _clone_commit(args.clone)
    grid = args.out / f"{NAME}-samples.png"
    shutil.copyfile(run / "samples" / "samples_final.png", grid)
    table = (run / "sampler_table.md").read_text().strip().splitlines()
    printed = [line.rstrip() for line in re.split(r"[\r\n]", args.train_log.read_text())
               if line.strip() and "%|" not in line]  # without the progress bars' redraws

    total = args.install_seconds + args.train_seconds
    lines = [
        "# `cld-fast train --data mnist5k` on a fresh clone", "",
        f"- device: {common.cpu_model_name()}, {os.cpu_count()} cores, torch's default thread count (no GPU)",
        f"- torch {info['torch']} (CUDA {info['cuda']}), python {info['python']}, cld_fast {info['cld_fast']}; "
        f"extension: cpu {'built' if build['cpu_built'] else 'NOT built'}, "
        f"cuda {'built' if build['cuda_built'] else 'not built'}",
        f"- commit {info['commit']} (the clone), {info['date']}",
        "- the job: `git clone`, a new venv with `--system-site-packages` (the installed torch), "
        "`pip install --no-build-isolation -e \".[data]\"`, `cld-fast train --data mnist5k` "
        "(the steps `bash bench/fresh_clone_mnist5k.sh` runs)",
        f"- load average (1 min) during the job, once a minute: {min(loads):.2f} to {max(loads):.2f}, "
        f"median {sorted(loads)[len(loads) // 2]:.2f} on 2 cores" if loads else "- load average: not logged",
        "",
        common.md_table(["part", "wall time"], [
            ["pip install (builds the C++ and CUDA extension)", f"{args.install_seconds / 60:.1f} min"],
            [f"training, {n_steps:,} steps (preset `{config['data']}`, batch {config['batch_size']}, "
             f"precision {config['precision']})", f"{loop_s / 60:.1f} min ({loop_s / n_steps:.2f} s per step)"],
            [f"sampling {ev['n']:,} images ({ev['method']}, {ev['steps']} steps)",
             f"{ev['sample_seconds'] / 60:.1f} min"],
            ["metrics, floor and the sampler table", f"{rest_s / 60:.1f} min"],
            ["**total**", f"**{total / 60:.1f} min**"]]),
        "",
        f"Metrics of {ev['n']} samples ({ev['method']} {ev['steps']} steps, EMA weights) against the "
        f"{ev['n_heldout']} held-out images; floor: as many training images against the same held-out images.", "",
        common.md_table(["", "Frechet distance", "classifier >= 0.9", "rarest class", "class histogram 0..9",
                         "NN ratio to held-out", "copies"],
                        [_row("samples", ev), _row("floor (data vs held-out)", ev["floor"])]),
        "", "The run's `sampler_table.md` (300 samples per cell):", "", *table[2:],
        "", f"Samples (the first 64): `{grid.name}`. What the command printed:", "", "```", *printed, "```", ""]
    (args.out / f"{NAME}-cpu.md").write_text("\n".join(lines))
    (args.out / f"{NAME}-cpu.json").write_text(json.dumps(
        {"info": info, "build": build, "config": config, "install_s": args.install_seconds,
         "train_command_s": args.train_seconds, "train_loop_s": loop_s, "steps": n_steps,
         "eval": ev, "load_averages": loads, "loss_log": steps}, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / (NAME + '-cpu.md')}, {args.out / (NAME + '-cpu.json')} and {grid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
