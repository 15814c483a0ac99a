"""Likelihood bound (bits/dim) of held-out digits under a CLD model and a VP-SDE model of the same budget.

    python -m bench.digits_bpd --ckpt runs/mnist5k-cld/checkpoints/ckpt_0002000.pt \\
        --ckpt runs/mnist5k-vpsde/checkpoints/ckpt_0002000.pt --n 100

Each checkpoint is one of ``cld-fast train --data digits|mnist5k`` (``--sde cld`` or ``--sde vpsde``;
EMA weights). ``cf.likelihood`` integrates the probability-flow ODE (RK45, rtol = atol = 1e-5, one
Rademacher probe) from forward time ``--eps`` (default 1e-5, the official likelihood eps) on the first
``--n`` held-out images, uniformly dequantised, centred to [-1, 1] as the models saw them (offset 7
bits). For CLD this is the official CLD-SGM bound: -log p(x0, v0) + H(v0), the entropy of the
velocity prior subtracted (``cf.likelihood`` docs). Writes ``bench/results/<name>-cpu.md`` / ``.json``
(``--name``, default ``<data>_bpd``): mean bits/dim with its standard error, NFE and time per model,
and the training steps of each checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from . import common

RESULTS = common.ROOT / "bench" / "results"


def main(argv=None) -> int:
    import cld_fast as cf
    from cld_fast.data import load_packaged
    from cld_fast.loading import load_score_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", required=True, help="a checkpoint or run folder (repeat)")
    ap.add_argument("--n", type=int, default=100, help="held-out images")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the ODE state's dtype")
    ap.add_argument("--eps", type=float, default=1e-5, help="the forward time the data sits at (likelihood eps)")
    ap.add_argument("--name", default=None, help="file name stem of the report (default <data>_bpd)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = common.device_info(torch.device("cpu"))
    rows, out, data = [], [], None
    for path in args.ckpt:
        m = load_score_model(path, kind="cld_fast")
        if data not in (None, m.config.data):
            raise SystemExit(f"--ckpt: every model must be of one data set, got {data!r} and {m.config.data!r}")
        data = m.config.data
        step = m.step
        x, _ = load_packaged(data, "heldout")
        x = x[:args.n].double() / 255.0
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        bpd, nfe = [], []
        for chunk in x.split(args.batch):
            r = cf.likelihood(m.score_fn, chunk.to(getattr(torch, args.dtype)), m.sde, dequantize=True,
                              centered=True, generator=g, eps=args.eps)
            bpd.append(r.bpd)
            nfe.append(r.nfe)
        bpd = torch.cat(bpd)
        seconds = time.time() - t0
        mean, se = bpd.mean().item(), bpd.std().item() / math.sqrt(bpd.numel())
        name = type(m.sde).__name__
        print(f"{name} step {step}: {mean:.3f} +- {se:.3f} bits/dim, NFE {nfe}, {seconds:.0f} s", flush=True)
        rows.append([name, str(step), f"{mean:.3f} ± {se:.3f}", f"{bpd.median().item():.3f}",
                     f"{bpd.min().item():.2f} to {bpd.max().item():.2f}", " / ".join(map(str, nfe)), f"{seconds:.0f}",
                     f"`{path}`"])
        out.append({"sde": name, "step": step, "bpd_mean": mean, "bpd_se": se, "bpd": bpd.tolist(), "nfe": nfe,
                    "seconds": seconds, "ckpt": path})
    lines = [f"# Likelihood bound on held-out {data} images: CLD vs VP-SDE", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {info['commit']}, {info['date']}",
             f"- written by `python -m bench.digits_bpd {' '.join('--ckpt ' + p for p in args.ckpt)} --n {args.n} "
             f"--batch {args.batch} --dtype {args.dtype} --eps {args.eps:g}"
             + (f" --name {args.name}" if args.name else "") + "`", "",
             f"Bits/dim (mean ± standard error over the first {args.n} held-out images; uniform dequantisation, "
             f"centred data, probability-flow ODE RK45 from t = {args.eps:g} with rtol = atol = 1e-5 on a {args.dtype} "
             "state, one "
             "Rademacher probe):", "",
             common.md_table(["SDE", "training steps", "bits/dim", "median", "per-image range", "NFE per batch",
                              "seconds", "checkpoint"], rows), ""]
    stem = args.name or f"{data}_bpd"
    (RESULTS / f"{stem}-cpu.md").write_text("\n".join(lines))
    (RESULTS / f"{stem}-cpu.json").write_text(json.dumps({"info": info, "eps": args.eps, "models": out}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
