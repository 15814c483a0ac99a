"""Class-conditional digits: classifier guidance and classifier-free guidance vs guidance scale.

    python -m bench.guidance_digits --data digits                  # 8x8 digits (~30 min on a shared 2-core CPU)
    python -m bench.guidance_digits --data mnist5k --n 1000        # 28x28 (the model alone trains ~100 min)

Trains (or reuses, from ``--run-root``) a class-conditional NCSN++ (``cld-fast train --conditional``: the
data set's preset, label dropout 0.1) and a noise-conditional classifier on CLD-perturbed training
images (``cld_fast.noise_classifier``), then samples ``--n`` images with balanced requested labels
(SSCS, ``--steps`` NFE):

* classifier guidance: the conditional network without labels (the "no label" model it learns from
  the dropped labels: the unconditional score) plus scale * grad_v log p_phi(y | u, t); scale 0 is
  unconditional sampling;
* classifier-free guidance: (1 + w) s(u, t, y) - w s(u, t, none); w = 0 is the conditional model.

For each: the accuracy of the shipped digit classifier (``cld_fast.metrics``, trained on clean
images) against the requested label, and the Frechet distance of the classifier features to the
held-out images (``cld_fast.metrics.digit_metrics``), with their floors (held-out images: accuracy;
as many training images: Frechet distance). Writes ``bench/results/guidance-digits-<data>-cpu.md``
(``guidance-digits-cpu.md`` for ``digits``), ``.json`` and one image grid per method (one row per
class, columns grouped by scale).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from . import common

RESULTS = common.ROOT / "bench" / "results"
CLASSIFIER_WIDTH = {"digits": 32, "mnist5k": 32}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    ap.add_argument("--run-root", default=os.path.join("runs", "guidance-digits"),
                    help="where the conditional model (cond-<data>/) and the classifier (classifier-<data>.pt) "
                         "are trained, or found and reused")
    ap.add_argument("--model-steps", type=int, default=None, help="conditional model steps (default: digits 3000, "
                                                                  "mnist5k the preset's 6000)")
    ap.add_argument("--classifier-steps", type=int, default=3000)
    ap.add_argument("--n", type=int, default=300, help="samples per setting (balanced labels; at most the "
                                                       "training set)")
    ap.add_argument("--steps", type=int, default=100, help="SSCS network evaluations")
    ap.add_argument("--scales", default="0,1,2,4,8", help="classifier-guidance scales")
    ap.add_argument("--weights", default="0,0.5,1,2,4", help="classifier-free weights")
    ap.add_argument("--grid-per-class", type=int, default=8, help="images per class (row) in the grids")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS), help="folder for the report and grids")
    return ap.parse_args(argv)


def conditional_model(args):
    """The conditional network's run folder, trained here unless its final checkpoint exists."""
    from cld_fast import checkpoint as ckpt
    from cld_fast.config import get_preset
    from cld_fast.train import train

    run = os.path.join(args.run_root, f"cond-{args.data}")
    steps = args.model_steps or (3000 if args.data == "digits" else None)
    config = get_preset(args.data, conditional=True, **({"steps": steps} if steps else {}))
    latest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints")) if os.path.isdir(run) else None
    if latest is None or ckpt.step_of(latest) < config.steps:
        print(f"training the conditional model in {run} ({config.steps} steps)", flush=True)
        train(config, run, resume="latest" if latest else None, progress=False)
    return run


def classifier(args, sde):
    """The noise-conditional classifier (trained here unless its file exists) and its held-out accuracies."""
    from cld_fast.data import center, load_packaged
    from cld_fast.noise_classifier import (NoiseClassifier, load_classifier, perturbed_accuracy, save_classifier,
                                           train_classifier)

    path = os.path.join(args.run_root, f"classifier-{args.data}.pt")
    if os.path.isfile(path):
        clf, clf_sde = load_classifier(path)
        if clf_sde != sde:
            raise SystemExit(f"{path} was trained for {clf_sde}, the model for {sde}: remove it to retrain")
        train_s = None
    else:
        images, labels = load_packaged(args.data, "train")
        x = center(images.float() / 255.0)
        torch.manual_seed(0)
        clf = NoiseClassifier(1, 10, CLASSIFIER_WIDTH[args.data], x.shape[-1])
        print(f"training the noise-conditional classifier ({args.classifier_steps} steps)", flush=True)
        t0 = time.perf_counter()
        train_classifier(clf, x, labels, sde, args.classifier_steps, generator=torch.Generator().manual_seed(0))
        train_s = time.perf_counter() - t0
        save_classifier(clf, path, sde, data=args.data, steps=args.classifier_steps)
    held, held_labels = load_packaged(args.data, "heldout")
    held = center(held.float() / 255.0)
    acc = {t: perturbed_accuracy(clf, held, held_labels, sde, t) for t in (0.01, 0.1, 0.3, 0.6, 1.0)}
    return clf, path, acc, train_s


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def grid_rows(x: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """(10 * per_class, C, H, W): the first ``per_class`` samples of each class, class by class."""
    return torch.cat([x[labels == k][:per_class] for k in range(10)])


def evaluate(args, score, sde, shape, guidance, digit_clf, labels):
    import cld_fast as cf
    from cld_fast.metrics import classifier_report, digit_metrics

    t0 = time.perf_counter()
    res = cf.sample(score, (args.n,) + tuple(shape), sde, steps=args.steps,
                    generator=torch.Generator().manual_seed(args.seed), guidance=guidance)
    secs = time.perf_counter() - t0
    x = res.x.clamp(-1, 1)
    m = digit_metrics(args.data, x, seed=0, classifier=digit_clf)
    acc = classifier_report(digit_clf, x, labels)["accuracy"]
    return dict(accuracy=acc, fd=m["fd"], confident=m["classifier"]["confident"], seconds=secs,
                floor_fd=m["floor"]["fd"], heldout_accuracy=m["heldout_classifier"]["accuracy"]), x


def panels(grids, titles, path, data):
    """One PNG: the grids side by side, each titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cld_fast.plots import grid_array

    arrays = [grid_array(g, nrow=g.shape[0] // 10, scale=4 if data == "digits" else 1) for g in grids]
    fig, axes = plt.subplots(1, len(arrays), figsize=(2.6 * len(arrays), 3.2))
    for ax, arr, title in zip(axes, arrays, titles):
        ax.imshow(arr)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import cld_fast as cf
    from cld_fast.metrics import load_classifier as load_digit_classifier

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.device_info(torch.device("cpu"))
    run = conditional_model(args)
    m = cf.load_score_model(run)
    clf, clf_path, clf_acc, clf_train_s = classifier(args, m.sde)
    digit_clf = load_digit_classifier(args.data)
    labels = balanced_labels(args.n)
    rows, grids = {"classifier": [], "free": []}, {"classifier": [], "free": []}
    for s in [float(v) for v in args.scales.split(",")]:
        r, x = evaluate(args, m.score_fn, m.sde, m.data_shape, cf.ClassifierGuidance(clf, labels, s), digit_clf, labels)
        rows["classifier"].append(dict(scale=s, **r))
        grids["classifier"].append(grid_rows(x, labels, args.grid_per_class))
        print(f"classifier guidance scale {s:g}: accuracy {r['accuracy']:.3f} FD {r['fd']:.2f}", flush=True)
    for w in [float(v) for v in args.weights.split(",")]:
        r, x = evaluate(args, m.score_fn, m.sde, m.data_shape, cf.ClassifierFree(labels, w), digit_clf, labels)
        rows["free"].append(dict(weight=w, **r))
        grids["free"].append(grid_rows(x, labels, args.grid_per_class))
        print(f"classifier-free weight {w:g}: accuracy {r['accuracy']:.3f} FD {r['fd']:.2f}", flush=True)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = "guidance-digits" if args.data == "digits" else f"guidance-digits-{args.data}"
    names = {"classifier": f"{stem}-classifier.png", "free": f"{stem}-free.png"}
    panels(grids["classifier"], [f"scale {r['scale']:g}" for r in rows["classifier"]], out / names["classifier"],
           args.data)
    panels(grids["free"], [f"w = {r['weight']:g}" for r in rows["free"]], out / names["free"], args.data)
    report = dict(info=info, args=vars(args), model_run=run, model_step=m.config.steps, classifier=clf_path,
                  classifier_accuracy=clf_acc, classifier_train_s=clf_train_s, rows=rows, grids=names)
    (out / f"{stem}-cpu.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, out / f"{stem}-cpu.md")
    print("wrote", out / f"{stem}-cpu.md")
    return 0


def rewrite(json_path) -> None:
    """Write the Markdown report again from its ``.json`` (no sampling)."""
    json_path = Path(json_path)
    write_markdown(json.loads(json_path.read_text()), json_path.with_suffix(".md"))


def write_markdown(rep, path):
    info, args, rows = rep["info"], rep["args"], rep["rows"]
    first = rows["classifier"][0]
    lines = [
        f"# Class-conditional sampling on `{args['data']}` (classifier guidance and classifier-free guidance)",
        "",
        f"- device: {info['device']}",
        f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
        f"- commit {info['commit']}, {info['date']}",
        f"- written by `python -m bench.guidance_digits --data {args['data']} --n {args['n']} --steps {args['steps']}"
        + (f" --model-steps {args['model_steps']}" if args.get("model_steps") else "")
        + f" --threads {args.get('threads')}`",
        f"- model: conditional NCSN++ (preset `{args['data']}`, `--conditional`, label dropout 0.1), "
        f"{rep['model_step']} steps, EMA weights; sampler: SSCS, {args['steps']} NFE (one batch-doubled network "
        "call per step for classifier-free guidance), seed "
        f"{args['seed']}; {args['n']} samples with balanced requested labels per row",
        f"- noise-conditional classifier: CNN of `cld_fast.noise_classifier`, {args['classifier_steps']} steps on "
        "CLD-perturbed training images; its accuracy on perturbed held-out images by forward time t: "
        + ", ".join(f"t = {t}: {a:.3f}" for t, a in rep["classifier_accuracy"].items()),
        "- accuracy: the shipped digit classifier (`cld_fast.metrics`, clean images) against the requested label "
        f"(floor: its accuracy on the held-out images, {first['heldout_accuracy']:.3f}); FD: Frechet distance "
        "of its features to the held-out images (`digit_metrics`; floor: as many training images, "
        f"{first['floor_fd']:.3f}); p >= 0.9: fraction of samples it labels with probability >= 0.9",
        "",
        "## Classifier guidance (scale 0: unconditional, the network without labels)",
        "",
        "| scale | accuracy vs requested label | Frechet distance | p >= 0.9 | sampling s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows["classifier"]:
        lines.append(f"| {r['scale']:g} | {r['accuracy']:.3f} | {r['fd']:.3f} | {r['confident']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "## Classifier-free guidance: (1 + w) s(u, t, y) - w s(u, t, none) (w = 0: the conditional model)",
              "", "| w | accuracy vs requested label | Frechet distance | p >= 0.9 | sampling s |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows["free"]:
        lines.append(f"| {r['weight']:g} | {r['accuracy']:.3f} | {r['fd']:.3f} | {r['confident']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Grids (one row per class 0..9, {args['grid_per_class']} samples each, one panel per scale): "
              f"`{rep['grids']['classifier']}`, `{rep['grids']['free']}`.", "",
              "The Frechet-distance floor is itself one estimate from as many images, not a lower bound: "
              "samples more typical than the data can land below it. Sampling times are indicative only "
              "(a shared machine).", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
