"""Launches per public call: cld_fast's fused ops against eager code written the way the official
CLD-SGM code writes it (``bench/official_style.py``), at one CIFAR-10 shape on the CPU.

A launch is a dispatched non-view op that runs a kernel (``bench.common.dispatched_ops`` minus pure
allocations). Ours: the public call (``cf.perturb``, ``cf.hsm_loss``, its backward, one
``cf.sscs_step_``) on the ``cpu`` backend with value checks off, as the trainer and samplers run
them; ``tests/test_launch_counts.py`` asserts the same numbers. The counts do not depend on the batch
size or the device (the CUDA backend issues the same ops).

    python bench/launch_counts.py          # writes bench/results/launch_counts-cpu.md
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cld_fast as cf  # noqa: E402
from bench import common  # noqa: E402
from bench.kernels import Case, Size  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SIZE = Size("CIFAR-10 b8", (8, 3, 32, 32))
CALLS: Tuple[Tuple[str, str], ...] = (
    ("perturb", "perturb (x0 -> u = (x, v))"),
    ("loss_fwd", "HSM loss forward"),
    ("loss_bwd", "HSM loss backward"),
    ("sscs", "SSCS step (one per network evaluation)"),
)


def launches(fn) -> int:
    """Non-allocation ops one ``fn()`` dispatches (after a warm-up call)."""
    return sum(1 for name in common.dispatched_ops(fn) if not common.is_allocation(name))


def count(backend: str = "cpu") -> List[Dict[str, object]]:
    """One row per call: ``{"op", "label", "official", "ours"}`` (launches per call)."""
    device = torch.device("cpu")
    rows = []
    with cf.value_checks(False):
        for op, label in CALLS:
            case = Case(op, SIZE, device)
            rows.append({"op": op, "label": label, "official": launches(case.official().op),
                         "ours": launches(case.ours(backend).op)})
    return rows


def render(rows: List[Dict[str, object]], info: Dict[str, str], backend: str) -> str:
    header = common.md_table(["", ""], [
        ["device", info["device"]], ["torch", info["torch"]], ["cld_fast", info["cld_fast"]],
        ["backend counted", backend], ["shape", f"{SIZE.name} `{'x'.join(map(str, SIZE.shape))}`"],
        ["git commit", info["commit"]], ["date", info["date"]], ["command", "`python bench/launch_counts.py`"]],
        align="ll")
    table = common.md_table(["call", "official-style eager", "cld_fast", "ratio"],
                            [[r["label"], r["official"], r["ours"], f"{r['official'] / max(1, r['ours']):.0f}x"]
                             for r in rows], align="lrrr")
    return f"# Launches per call\n\n{header}\n\n{table}\n\n{__doc__.split(chr(10) + chr(10))[1]}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu", help="our backend to count (default cpu)")
    p.add_argument("--out", default=os.path.join(RESULTS, "launch_counts-cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = render(count(args.backend), common.device_info(torch.device("cpu")), args.backend)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
