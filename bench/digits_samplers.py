"""Samplers on a learned image score: the digit metrics of each sampler vs network evaluations (NFE).

    python -m bench.digits_samplers --ckpt runs/digits_train/digits-3000/checkpoints/ckpt_0003000.pt

The 8x8 ``digits`` model of ``bench.digits_train`` (EMA weights); 300 samples per cell (the held-out
count), the same sampler seed everywhere; SSCS (linear and quadratic grids), EM, gDDIM orders 1-3 with
``predict`` "eps" and "x0" (default grid), each at 5, 10, 20, 50 and 100 steps. Writes
``bench/results/digits_samplers-cpu.md`` / ``.json``: the Frechet distance (and the fraction of samples
the classifier labels with p >= 0.9) of each cell, with the floor. A cell that raises shows its error.
"""
from __future__ import annotations

import argparse
import json

import torch

from . import common

RESULTS = common.ROOT / "bench" / "results"
STEPS = (5, 10, 20, 50, 100)
VARIANTS = [("sscs linear", dict(method="sscs", striding="linear")),
            ("sscs quadratic", dict(method="sscs", striding="quadratic")),
            ("em", dict(method="em"))] + [
    (f"gddim order {o} {p}", dict(method="gddim", order=o, predict=p)) for p in ("eps", "x0") for o in (1, 2, 3)]


def main(argv=None) -> int:
    import cld_fast as cf
    from cld_fast.metrics import digit_metrics, load_classifier
    from cld_fast.train import load_for_sampling, network_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = common.device_info(torch.device("cpu"))
    net, sde, cfg, shape = load_for_sampling(args.ckpt, use_ema=True)
    score = network_score(net, sde, cfg)
    clf = load_classifier("digits")
    cells, floor = {}, None
    for name, kw in VARIANTS:
        for steps in STEPS:
            try:
                with torch.no_grad():
                    res = cf.sample(score, (args.samples,) + tuple(shape), sde, steps=steps,
                                    generator=torch.Generator().manual_seed(args.seed), **kw)
                m = digit_metrics("digits", res.x, classifier=clf)
                floor = m["floor"]
                cells[f"{name}|{steps}"] = {"nfe": res.nfe, "fd": m["fd"], "confident": m["classifier"]["confident"]}
            except Exception as exc:  # noqa: BLE001 - the table shows it
                cells[f"{name}|{steps}"] = {"error": common.short_error(exc)}
            print(name, steps, cells[f"{name}|{steps}"], flush=True)

    def cell(name, steps):
        c = cells[f"{name}|{steps}"]
        return "error" if "error" in c else f"{c['fd']:.1f} ({c['confident']:.2f}; {c['nfe']})"

    lines = ["# Samplers on the 8x8 digits model: Frechet distance vs steps", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {info['commit']}, {info['date']}",
             f"- written by `python -m bench.digits_samplers --ckpt {args.ckpt}`; {args.samples} samples per cell, "
             f"sampler seed {args.seed}, EMA weights", "",
             "Each cell: Frechet distance on classifier features against the held-out images (fraction "
             "classified with p >= 0.9; network evaluations). "
             f"Floor (training images vs held-out): {floor['fd']:.1f} ({floor['classifier']['confident']:.2f}).", "",
             common.md_table(["sampler"] + [f"{s} steps" for s in STEPS],
                             [[name] + [cell(name, s) for s in STEPS] for name, _ in VARIANTS]), ""]
    errors = {k: v["error"] for k, v in cells.items() if "error" in v}
    if errors:
        lines += ["Errors:", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    (RESULTS / "digits_samplers-cpu.md").write_text("\n".join(lines))
    (RESULTS / "digits_samplers-cpu.json").write_text(json.dumps({"info": info, "cells": cells, "floor": floor}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
