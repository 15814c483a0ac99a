"""Sampler quality with a trained toy network: energy distance vs NFE for SSCS, EM and gDDIM.

The network is the default main job's (``cld-fast train``: 8-Gaussian mixture, official toy MLP,
12k steps); pass its run folder or checkpoint. Unlike ``bench/sampler_quality.py`` (exact score) the
error here mixes the sampler's discretisation with the network's score error.

    python bench/sampler_trained.py runs/toy-...            # a run folder or a checkpoint file

Writes ``bench/results/sampler_trained-<device>.md``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cld_fast as cf  # noqa: E402
from cld_fast.checkpoint import resolve_resume  # noqa: E402
from cld_fast.toy import GaussianMixture2D, energy_distance  # noqa: E402
from cld_fast.train import load_for_sampling  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SAMPLERS = [
    ("SSCS (linear)", dict(method="sscs", striding="linear")),
    ("SSCS (quadratic)", dict(method="sscs", striding="quadratic")),
    ("EM (quadratic)", dict(method="em", striding="quadratic")),
    ("gDDIM order 2", dict(method="gddim", order=2)),
    ("gDDIM order 3", dict(method="gddim", order=3)),
    ("gDDIM x0 order 2 (log)", dict(method="gddim", order=2, predict="x0", striding="log")),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run folder or checkpoint of a toy (gmm) run")
    p.add_argument("--n", type=int, default=4000, help="samples per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--out", default=None, help="output path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    src = resolve_resume(args.checkpoint, args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    net, sde, config, shape = load_for_sampling(src, use_ema=True, device="cpu")
    if config.data != "gmm":
        raise SystemExit(f"{src} was trained on {config.data!r}; this table needs the 8-Gaussian mixture (gmm)")
    score = cf.score_fn(net, sde)
    gm = GaussianMixture2D()
    nfes = [int(x) for x in args.nfe.split(",")]
    refs = [gm.sample(args.n, torch.Generator().manual_seed(500 + s)) for s in range(args.seeds)]
    t0 = time.perf_counter()
    rows = []
    for name, kw in SAMPLERS:
        cells = []
        for nfe in nfes:
            eds = []
            for s in range(args.seeds):
                res = cf.sample(score, (args.n,) + tuple(shape), sde, steps=nfe,
                                generator=torch.Generator().manual_seed(s), **kw)
                eds.append(energy_distance(res.x, refs[s]))
            cells.append(statistics.mean(eds))
            print(f"{name:24s} NFE {nfe:3d}  ED {cells[-1]:.5f}", flush=True)
        rows.append((name, cells))
    floor = statistics.mean(energy_distance(gm.sample(args.n, torch.Generator().manual_seed(900 + s)), refs[s])
                            for s in range(args.seeds))
    lines = [
        "# Sampler quality with the trained toy network (CPU)",
        "",
        f"- checkpoint: `{os.path.basename(src)}` of the default main job (`cld-fast train`; {config.steps} steps, "
        f"EMA weights), {config.model} on {config.data}",
        f"- torch {torch.__version__}, cld_fast {cf.__version__}, date {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- {args.n} samples per run, mean over {args.seeds} seeds; energy distance to fresh data "
        f"(noise floor, data vs data: {floor:.5f}); NFE includes the final denoising step",
        "",
        "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|" + "---:|" * len(nfes),
    ]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(f"{c:.5f}" for c in cells) + " |")
    lines += ["", f"Run time {time.perf_counter() - t0:.0f} s. Lower is better.", ""]
    base = args.out or os.path.join(RESULTS, "sampler_trained-cpu")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {base}.md")


if __name__ == "__main__":
    main()
