"""How the HSM loss splits its work between forward and backward on the cpu backend, three ways.

    python -m bench.loss_split [--numel 16777216] [--out bench/results/loss-split-cpu.md]

Kernel calls (``torch.ops.cld_fast``), one thread, seed-mode noise, x of shape (128, numel / 128):

    regenerate   hsm_loss_fwd + hsm_loss_bwd: eps_v drawn in both (the GPU backends' split)
    grad in fwd  hsm_loss_fwd_grad + one multiply: eps_v drawn once, the gradient written in the
                 forward (what cld_fast.hsm_loss runs on the cpu backend)
    save noise   hsm_loss_fwd + hsm_loss_bwd reading eps_v as a tensor: eps_v drawn once; a lower
                 bound, since writing the saved eps_v (4N bytes) in the forward is not timed
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import cld_fast as cf
from bench import common
from cld_fast import backends, opdefs
from cld_fast.sde import kernel_params

ROWS = 128


def run(n: int) -> str:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    cpu = backends.get("cpu")
    ops = type("Ops", (), {name: staticmethod(cpu.op(name)) for name in opdefs.OPS})
    d = n // ROWS
    g = torch.Generator().manual_seed(0)
    out, u = torch.randn(ROWS, d, generator=g), torch.randn(ROWS, 2, d, generator=g)
    t = torch.rand(ROWS, generator=g) * 0.98 + 0.01
    sde, seed, one = kernel_params(cf.CLD(), device), torch.tensor([3], dtype=torch.int64), torch.ones(())
    eps_v, unit = torch.randn(ROWS, d, generator=g), torch.empty(ROWS, d)
    args = (out, u, t, sde, 0, 1.0 / ROWS, 1)
    ways = {
        "regenerate": lambda: (ops.hsm_loss_fwd(*args, None, seed, 0, 0),
                               ops.hsm_loss_bwd(one, out, u, t, sde, 0, 1.0 / ROWS, None, seed, 0, 0)),
        "grad in fwd": lambda: (ops.hsm_loss_fwd_grad(*args, None, seed, 0, 0, unit), unit * one),
        "save noise (lower bound)": lambda: (ops.hsm_loss_fwd(*args, None, seed, 0, 0),
                                             ops.hsm_loss_bwd(one, out, u, t, sde, 0, 1.0 / ROWS, eps_v, None, 0, 0)),
    }
    load_start = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for name, call in ways.items():
        ms = common.measure(call, device, target_s=1.0, min_iters=3, max_iters=20, flush_l2=False).median_ms
        rows.append([name, f"{ms:.1f}"])
    info = common.device_info(device)
    load_end = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    head = [["device", info["device"]], ["torch", info["torch"]], ["git commit", info["commit"]],
            ["date", info["date"]], ["x", f"({ROWS}, {d}) float32"],
            ["load average (1 / 5 / 15 min)", f"{load_start} at start, {load_end} at the end, on {os.cpu_count()} "
                                              "CPUs: above the CPU count, other work slows every timing here"]]
    return ("# HSM loss forward + backward on the cpu backend: three splits\n\n"
            + common.md_table(["", ""], head, align="ll") + "\n\n"
            + common.md_table(["split", "forward + backward ms (median)"], rows, align="lr") + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loss-split-cpu.md"))
    args = p.parse_args(argv)
    text = run(args.numel)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
