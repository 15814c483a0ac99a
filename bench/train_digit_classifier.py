"""Train the digit classifiers whose features the Frechet distance of ``cld_fast.metrics`` uses.

    python -m bench.train_digit_classifier            # both: digits (8x8) and mnist5k (28x28)
    python -m bench.train_digit_classifier --data digits

Trains :class:`cld_fast.metrics.DigitClassifier` on the training split of each data set (Adam,
cross-entropy, small random shifts of up to 1 pixel as augmentation, fixed seed), measures its
accuracy on the held-out split, and writes:

* ``cld_fast/assets/<data>_classifier.pt``  (float32 weights + architecture + held-out accuracy)
* ``bench/results/digit_classifiers.md`` and ``.json`` (device, versions, commit, date, accuracies)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from . import common

SPECS = {"digits": dict(image_size=8, widths=(32,), n_features=32, epochs=40),
         "mnist5k": dict(image_size=28, widths=(16, 32), n_features=32, epochs=8)}
RESULTS = common.ROOT / "bench" / "results"


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in x and y (zero-padded at the background value -1)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    s = x.shape[-1]
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return pad[..., dy:dy + s, dx:dx + s]


def train_one(data: str, seed: int = 0, batch: int = 64, lr: float = 2e-3) -> dict:
    from cld_fast.data import center, load_packaged
    from cld_fast.metrics import DigitClassifier, classifier_path, classifier_report, save_classifier

    spec = dict(SPECS[data])
    epochs = spec.pop("epochs")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_u8, y = load_packaged(data, "train")
    xh_u8, yh = load_packaged(data, "heldout")
    x, xh = center(x_u8.float() / 255.0), center(xh_u8.float() / 255.0)
    net = DigitClassifier(**spec)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(x) // batch))
    t0 = time.time()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(net(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    seconds = time.time() - t0
    held = classifier_report(net, xh, yh)
    train_acc = classifier_report(net, x, y)["accuracy"]
    n_params = sum(p.numel() for p in net.parameters())
    path = classifier_path(data)
    save_classifier(net, path, data=data, heldout_accuracy=held["accuracy"], train_accuracy=train_acc,
                    n_train=len(x), n_heldout=len(xh), epochs=epochs, seed=seed)
    return {"data": data, "heldout_accuracy": held["accuracy"], "heldout_confident": held["confident"],
            "train_accuracy": train_acc, "n_train": len(x), "n_heldout": len(xh), "epochs": epochs,
            "n_params": n_params, "file": os.path.relpath(path, common.ROOT), "file_bytes": os.path.getsize(path),
            "seconds": seconds, "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}


def write_results(rows, info) -> None:
    head = [f"# Digit classifiers (feature networks of the Frechet distance)", "",
            f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
            f"- commit {info['commit']}, {info['date']}",
            "- written by `python -m bench.train_digit_classifier` (one CPU thread); held-out split: "
            "`cld_fast.data.load_packaged`; rows of data sets not retrained keep their values from an earlier run of the same script (the digits row: commit 69c293a+dirty, two threads)", ""]
    table = common.md_table(
        ["data", "held-out accuracy", "held-out >= 0.9 confident", "train accuracy", "train / held-out images",
         "epochs", "parameters", "weight file", "bytes", "train seconds"],
        [[r["data"], f"{r['heldout_accuracy']:.4f}", f"{r['heldout_confident']:.4f}", f"{r['train_accuracy']:.4f}",
          f"{r['n_train']} / {r['n_heldout']}", r["epochs"], r["n_params"], f"`{r['file']}`", r["file_bytes"],
          f"{r['seconds']:.1f}"] for r in rows])
    (RESULTS / "digit_classifiers.md").write_text("\n".join(head) + "\n" + table + "\n")
    (RESULTS / "digit_classifiers.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=tuple(SPECS), action="append")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.device_info(torch.device("cpu"))
    done = RESULTS / "digit_classifiers.json"
    # Rows of data sets not retrained this time stay as they were.
    rows = [r for r in json.loads(done.read_text())["rows"] if r["data"] not in (args.data or list(SPECS))] if done.exists() else []
    for data in args.data or list(SPECS):
        row = train_one(data, seed=args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(sorted(rows, key=lambda r: r["data"]), info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
