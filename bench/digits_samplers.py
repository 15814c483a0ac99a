"""Samplers on a learned image score: the digit metrics of each sampler vs network evaluations (NFE).

    python -m bench.digits_samplers --ckpt runs/digits_train/digits-3000/checkpoints/ckpt_0003000.pt
    python -m bench.digits_samplers --ckpt RUN_DIR --steps 5 10 20 50 100 200 --samples 200 --ode
    python -m bench.digits_samplers --ckpt RUN_DIR --grids linear,quadratic,polynomial   # gDDIM on each grid

A model of ``bench.digits_train`` / ``cld-fast train --data digits|mnist5k`` (EMA weights; the data set
is read from its config); ``--samples`` per cell, the same sampler seed everywhere; SSCS (linear and
quadratic grids), EM, gDDIM orders 1-3 with ``predict`` "eps" and "x0" (default grid), each at
``--steps``; ``--grids`` runs each gDDIM variant on each listed time grid instead (``gddim order 2 x0
linear``, ...); with ``--ode`` also the adaptive probability-flow ODE (its NFE). Writes
``bench/results/<data>_samplers-cpu.md`` / ``.json``: the Frechet distance (and the fraction of samples
the classifier labels with p >= 0.9) of each cell, with the floor, a plot of the Frechet distance vs NFE
(``<data>_samplers-cpu.png``) and sample grids at 10 and 50 steps (``<data>_samplers-<steps>steps.png``,
SSCS quadratic above gDDIM order 2 x0). A cell that raises shows its error.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--ode", action="store_true", help="also the adaptive probability-flow ODE (rtol = atol = 1e-3)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of the sampler names, e.g. 'sscs quadratic,gddim order 2 x0'")
    ap.add_argument("--grids", default=None,
                    help="comma-separated time grids (cld_fast.sde.STRIDINGS): each gDDIM variant runs on each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(RESULTS), help="folder for the report, plot and grids")
    ap.add_argument("--name", default=None, help="file name stem of the report and plot (default <data>_samplers)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    info = common.device_info(torch.device("cpu"))
    net, sde, cfg, shape = load_for_sampling(args.ckpt, use_ema=True)
    score = network_score(net, sde, cfg)
    data = cfg.data
    if data not in ("digits", "mnist5k"):
        raise SystemExit(f"--ckpt: a model of the digits or mnist5k data is needed, this one trained on {data!r}")
    clf = load_classifier(data)
    steps_list = tuple(args.steps)
    variants = list(VARIANTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - {name for name, _ in VARIANTS})
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {[name for name, _ in VARIANTS]}")
        variants = [(name, kw) for name, kw in VARIANTS if name in wanted]
    if args.grids:
        from cld_fast.sde import STRIDINGS

        grids_wanted = [g.strip() for g in args.grids.split(",")]
        if not set(grids_wanted) <= set(STRIDINGS):
            raise SystemExit(f"--grids: unknown {sorted(set(grids_wanted) - set(STRIDINGS))}; choose from {STRIDINGS}")
        variants = [(f"{name} {g}" if kw["method"] == "gddim" else name, dict(kw, striding=g) if kw["method"] == "gddim"
                     else kw) for name, kw in variants for g in (grids_wanted if kw["method"] == "gddim" else [None])]
    variants += [("ode (adaptive)", dict(method="ode", rtol=1e-3, atol=1e-3))] if args.ode else []
    cells, floor, grids = {}, None, {}
    for name, kw in variants:
        for steps in (steps_list if kw["method"] != "ode" else (0,)):
            try:
                with torch.no_grad():
                    res = cf.sample(score, (args.samples,) + tuple(shape), sde, steps=max(steps, 1),
                                    generator=torch.Generator().manual_seed(args.seed), **kw)
                m = digit_metrics(data, res.x, classifier=clf)
                if steps in (10, 50) and name in ("sscs quadratic", "gddim order 2 x0", "gddim order 2 x0 polynomial"):
                    grids.setdefault(steps, {})[name.replace(" polynomial", "")] = res.x[:32].cpu()
                floor = m["floor"]
                cells[f"{name}|{steps}"] = {"nfe": res.nfe, "fd": m["fd"], "confident": m["classifier"]["confident"]}
            except Exception as exc:  # noqa: BLE001 - the table shows it
                cells[f"{name}|{steps}"] = {"error": common.short_error(exc)}
            print(name, steps, cells[f"{name}|{steps}"], flush=True)

    def cell(name, steps):
        c = cells.get(f"{name}|{steps}")
        if c is None:
            return "-"
        return "error" if "error" in c else f"{c['fd']:.1f} ({c['confident']:.2f}; {c['nfe']})"

    from cld_fast.plots import image_grid

    pngs = []
    for steps, by_name in sorted(grids.items()):
        if len(by_name) == 2:  # 4 rows of 8 per sampler, stacked: SSCS quadratic above gDDIM order 2
            png = results / f"{data}_samplers-{steps}steps.png"
            image_grid(torch.cat([by_name["sscs quadratic"], by_name["gddim order 2 x0"]]), str(png), nrow=8)
            pngs.append(png.name)
    stem = args.name or f"{data}_samplers"
    plot = _plot(cells, variants, steps_list, floor, results / f"{stem}-cpu.png")
    size = "x".join(str(s) for s in shape[-2:])
    ode_row = [[name] + ([cell(name, 0)] + ["-"] * (len(steps_list) - 1)) for name, kw in variants if kw["method"] == "ode"]
    lines = [f"# Samplers on the {size} {data} model: Frechet distance vs steps", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {info['commit']}, {info['date']}",
             f"- written by `python -m bench.digits_samplers --ckpt {args.ckpt} --samples {args.samples} --steps "
             f"{' '.join(map(str, steps_list))}{' --ode' if args.ode else ''}"
             f"{' --variants ' + repr(args.variants) if args.variants else ''}"
             f"{' --grids ' + args.grids if args.grids else ''}{' --name ' + args.name if args.name else ''} "
             f"--threads {args.threads}`; {args.samples} samples per cell, "
             f"sampler seed {args.seed}, EMA weights of the checkpoint at step {cfg_step(args.ckpt)}", "",
             "Each cell: Frechet distance on classifier features against the held-out images (fraction "
             "classified with p >= 0.9; network evaluations). "
             f"Floor (training images vs held-out): {floor['fd']:.1f} ({floor['classifier']['confident']:.2f}).", "",
             common.md_table(["sampler"] + [f"{s} steps" for s in steps_list],
                             [[name] + [cell(name, s) for s in steps_list] for name, kw in variants
                              if kw["method"] != "ode"] + ode_row), ""]
    if ode_row:
        lines += ["The adaptive ODE row is one run at rtol = atol = 1e-3 (its NFE in the cell), not a step count.", ""]
    if plot:
        lines += [f"![Frechet distance vs NFE]({plot})", ""]
    if pngs:
        lines += ["Sample grids (top 4 rows SSCS quadratic, bottom 4 gDDIM order 2 x0): " + ", ".join(pngs), ""]
    errors = {k: v["error"] for k, v in cells.items() if "error" in v}
    if errors:
        lines += ["Errors:", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    (results / f"{stem}-cpu.md").write_text("\n".join(lines))
    (results / f"{stem}-cpu.json").write_text(
        json.dumps({"info": info, "cells": cells, "floor": floor}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


def _plot(cells, variants, steps_list, floor, path):
    """Frechet distance vs NFE (log-log), one panel per gDDIM ``predict`` with SSCS, EM and the ODE in
    both, the floor dashed; the file name, or None when no cell succeeded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sscs": "-", "em": ":", "gddim": "--", "ode": "none"}
    panels = [p for p in ("x0", "eps") if any(kw.get("predict") == p for _, kw in variants)] or ["all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    drawn = False
    for ax, panel in zip(axes[0], panels):
        for name, kw in variants:
            if kw["method"] == "gddim" and panel != "all" and kw.get("predict") != panel:
                continue
            wanted = steps_list if kw["method"] != "ode" else (0,)
            pts = [(c["nfe"], c["fd"]) for c in (cells.get(f"{name}|{s}") for s in wanted) if c and "error" not in c]
            if pts:
                nfe, fd = zip(*sorted(pts))
                ax.plot(nfe, fd, linestyle=styles[kw["method"]], marker="o", markersize=3, label=name)
                drawn = True
        if floor:
            ax.axhline(floor["fd"], color="k", linestyle="--", linewidth=1, label="floor (training vs held-out)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("Frechet distance (classifier features)")
        ax.set_title(f"gDDIM predict={panel!r}" if panel != "all" else "samplers")
        ax.legend(fontsize=6, ncol=2)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def cfg_step(path: str) -> str:
    """The training step of a checkpoint file or a run folder's newest checkpoint ("?" if unknown)."""
    from cld_fast.loading import load_score_model

    try:
        step = load_score_model(path, kind="cld_fast").step
        return "?" if step is None else str(step)
    except Exception:  # noqa: BLE001 - only for the header line
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
