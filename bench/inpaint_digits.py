"""Inpainting held-out digits with a trained model: label recovery and observed-pixel error vs NFE.

    python -m bench.inpaint_digits --ckpt runs/digits-3000 --data digits
    python -m bench.inpaint_digits --ckpt runs/mnist5k/checkpoints/ckpt_6000.pt --data mnist5k --n 500

Two masks on the held-out images (``cld_fast.data.load_packaged(data, "heldout")``): the lower half of
every image unobserved, and a random 75% of the pixels unobserved (a fresh mask per image, seeded).
Each sampler (``--methods``) inpaints them at every NFE of ``--nfe`` with ``cf.Inpaint``; the
shipped digit classifier (``cld_fast.metrics``) classifies the results, and the table gives the
fraction classified as the original's label, next to the classifier on the originals (its ceiling),
on the masked inputs (unobserved pixels set to 0, mid grey) and on unconditional samples (chance),
and the largest |x - x_obs| over the observed pixels (0 by construction: the denoising step writes
x_obs). Writes ``bench/results/inpaint-<data>-cpu.md`` (device, versions, commit, date) and
``inpaint-<data>-grid.png`` (per mask: originals, observed part, inpainted at the largest NFE).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import common

RESULTS = common.ROOT / "bench" / "results"


def masks(shape, kind: str, seed: int) -> torch.Tensor:
    """(N, C, H, W) bool, True = observed: "lower-half" (rows >= H / 2 unobserved) or "random75"."""
    n, c, h, w = shape
    if kind == "lower-half":
        m = torch.ones(shape, dtype=torch.bool)
        m[:, :, h // 2:, :] = False
        return m
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, h, w, generator=g) >= 0.75).expand(shape).clone()


def run(model, x, mask, method: str, nfe: int, seed: int, device):
    """Inpainted samples (N, C, H, W) on the CPU."""
    import cld_fast as cf

    res = cf.sample(model.score_fn, tuple(x.shape), model.sde, steps=nfe, method=method,
                    generator=torch.Generator(device).manual_seed(seed), device=device,
                    condition=cf.Inpaint(x.to(device), mask.to(device)))
    return res.x.detach().cpu().float()


def main(argv=None) -> int:
    import cld_fast as cf
    from cld_fast import plots
    from cld_fast.cli import inpainting_grid
    from cld_fast.data import center, load_packaged
    from cld_fast.metrics import classifier_report, load_classifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint or run folder (cf.load_score_model)")
    ap.add_argument("--data", choices=("digits", "mnist5k"), required=True)
    ap.add_argument("--n", type=int, default=300, help="held-out images (default 300)")
    ap.add_argument("--nfe", default="10,20,50,100", help="comma-separated NFEs")
    ap.add_argument("--methods", default="sscs,gddim", help="comma-separated samplers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/inpaint-<data>-cpu)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nfes = [int(v) for v in args.nfe.split(",")]
    methods = args.methods.split(",")
    stem = args.out or str(RESULTS / f"inpaint-{args.data}-{'cpu' if device.type == 'cpu' else device.type}")
    info = common.device_info(device)
    model = cf.load_score_model(args.ckpt, device=device)
    images, labels = load_packaged(args.data, "heldout")
    images, labels = center(images[:args.n].float() / 255.0), labels[:args.n]
    classifier = load_classifier(args.data)

    def accuracy(x):
        return classifier_report(classifier, x, labels)["accuracy"]

    t0 = time.time()
    uncond = cf.sample(model.score_fn, tuple(images.shape), model.sde, steps=max(nfes), device=device,
                       generator=torch.Generator(device).manual_seed(args.seed)).x.detach().cpu().float()
    rows, raw, grids = [], [], []
    for kind in ("lower-half", "random75"):
        mask = masks(tuple(images.shape), kind, args.seed + 1)
        masked = torch.where(mask, images, torch.zeros_like(images))
        rows.append([kind, "original (ceiling)", "", f"{accuracy(images):.3f}", ""])
        rows.append([kind, "masked input, 0 fill", "", f"{accuracy(masked):.3f}", ""])
        rows.append([kind, "unconditional sscs", str(max(nfes)), f"{accuracy(uncond):.3f}", ""])
        for method in methods:
            for nfe in nfes:
                x = run(model, images, mask, method, nfe, args.seed, device)
                err = float((x - images)[mask].abs().max())
                acc = accuracy(x)
                rows.append([kind, method, str(nfe), f"{acc:.3f}", f"{err:.2e}"])
                raw.append(dict(mask=kind, method=method, nfe=nfe, accuracy=acc, observed_max_abs_error=err))
                print(kind, method, nfe, acc, err, flush=True)
                if method == methods[0] and nfe == max(nfes):
                    grids.append(inpainting_grid(images, mask, x))
    grid_png = stem.replace("-cpu", "") + "-grid.png" if stem.endswith("-cpu") else stem + "-grid.png"
    plots.image_grid(torch.cat(grids), grid_png, nrow=8)
    ckpt = str(args.ckpt)
    lines = [f"# Inpainting held-out `{args.data}` images: label recovery vs NFE", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {common.git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- model: `{ckpt}` ({model.describe()}); {args.n} held-out images; seed {args.seed}",
             f"- written by `python -m bench.inpaint_digits --ckpt {ckpt} --data {args.data} --n {args.n} "
             f"--nfe {args.nfe} --methods {args.methods}` in {time.time() - t0:.0f} s", "",
             "Masks: `lower-half` (rows H/2.. unobserved), `random75` (75% of the pixels unobserved, a fresh mask "
             "per image). Accuracy: the fraction of inpainted images that the shipped digit classifier "
             "(`cld_fast.metrics`) assigns the original's label. Observed error: max |x - x_obs| over the observed "
             "pixels of all images (the denoising step writes x_obs).", "",
             common.md_table(["mask", "sampler", "NFE", "classifier accuracy", "observed max abs error"], rows), "",
             f"Grid: `{grid_png.split('/')[-1]}` (per mask: originals, observed part (grey = unobserved), inpainted "
             f"with {methods[0]} at NFE {max(nfes)}).", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(stem + ".json", "w") as f:
        json.dump(dict(info=info, ckpt=ckpt, n=args.n, rows=raw), f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
