"""The ``eps=`` paths and the in-kernel-noise paths of the cpu backend against single-core copy bandwidth.

    python -m bench.eps_paths [--numel 16777216] [--threads 1,2] [--out FILE]

``bench/run.py`` runs the same table as its ``paths`` section (``bench/results/latest-cpu.md``); this
entry point prints it alone, with its own header, and writes it to ``--out`` when given.

Default settings (value checks on), at each thread count (the first is the baseline). For each public op: median ms per call with the
noise drawn in-kernel (seed) and handed in as tensors (``eps=``), GB/s by the byte model of
``bench/kernels.py`` with the noise tensors counted as traffic (they are read), and the fraction
of the measured copy bandwidth (``bench.common.copy_bandwidth``, bytes read + written).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import cld_fast as cf
from bench import common

ROWS = 128  # rows of the flat (B, D) case


def _cases(n: int):
    """(op, noise, bytes per element of x, call) for the ops at x of shape (ROWS, n // ROWS)."""
    sde, d = cf.CLD(), n // ROWS
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(ROWS, d, generator=g), torch.randn(ROWS, d, generator=g)
    t = torch.rand(ROWS, generator=g) * 0.98 + 0.01
    eps2, eps4, eps1 = torch.randn(ROWS, 2, d, generator=g), torch.randn(ROWS, 4, d, generator=g), torch.randn(ROWS, d)
    seed = torch.tensor([5], dtype=torch.int64)
    ts, step = torch.linspace(1.0, 0.01, 11, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    u, noise = cf.perturb(x0, t, sde, seed=seed, backend="cpu")
    _, noise_eps = cf.perturb(x0, t, sde, eps=eps2, backend="cpu")
    out = torch.randn(ROWS, d, generator=g, requires_grad=True)
    one = torch.ones(())

    def loss(nz):
        return lambda: torch.autograd.grad(cf.hsm_loss(out, u, t, sde, nz, backend="cpu"), out, one)

    w = u.clone()
    return [
        ("perturb", "seed", 12, lambda: cf.perturb(x0, t, sde, seed=seed, backend="cpu")),
        ("perturb", "eps=", 20, lambda: cf.perturb(x0, t, sde, eps=eps2, backend="cpu")),
        ("loss forward + backward", "seed", 20, loss(noise)),
        ("loss forward + backward", "eps=", 28, loss(noise_eps)),
        ("SSCS step", "seed", 20, lambda: cf.sscs_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend="cpu")),
        ("SSCS step", "eps=", 36, lambda: cf.sscs_step_(w, y, ts, sde, step=step, mixed=True, eps=eps4, backend="cpu")),
        ("EM step", "seed", 20, lambda: cf.em_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend="cpu")),
        ("EM step", "eps=", 24, lambda: cf.em_step_(w, y, ts, sde, step=step, mixed=True, eps=eps1, backend="cpu")),
    ]


def measure(n: int, threads=(1, 2)) -> dict:
    """Every case timed at each thread count of ``threads`` (the first is the baseline), with the copy
    bandwidth at the baseline count: {"copy": common.CopyBandwidth, "rows": table rows, "cols": header}."""
    device = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads[0])
        copy = common.copy_bandwidth(device, 128 << 20)
        cases = _cases(n)
        ms = {}
        for k in threads:
            torch.set_num_threads(k)
            for op, noise, _, call in cases:
                ms[(op, noise, k)] = common.measure(call, device, target_s=1.0, min_iters=3, max_iters=20,
                                                    flush_l2=False).median_ms
    finally:
        torch.set_num_threads(before)
    rows = []
    for op, noise, per_elem, _ in cases:
        base = ms[(op, noise, threads[0])]
        gbps = per_elem * n / (base * 1e-3) / 1e9
        row = [op, noise, f"{per_elem}N", f"{base:.1f}", f"{gbps:.2f}", f"{100 * gbps / copy.gbps:.0f}%"]
        for k in threads[1:]:
            row += [f"{ms[(op, noise, k)]:.1f}", f"{base / ms[(op, noise, k)]:.2f}x"]
        rows.append(row)
    cols = ["op", "noise", "bytes", f"ms / call, {threads[0]} thread(s) (median)", "GB/s", "% copy"]
    for k in threads[1:]:
        cols += [f"ms, {k} threads", f"{k} vs {threads[0]} threads"]
    return {"copy": copy, "rows": rows, "cols": cols}


FOOTNOTE = ("Default settings (value checks on). Bytes: fp32 minimum traffic per element of x "
            "(bench/kernels.py's byte model), the noise tensors of the eps= rows included (perturb reads 2N of "
            "them, the loss N, SSCS 4N, EM N). % copy: against the copy bandwidth measured with the baseline "
            "thread count.")


def _body(m: dict) -> str:
    """The measured table and its footnote."""
    return common.md_table(m["cols"], m["rows"], align="lll" + "r" * (len(m["cols"]) - 3)) + "\n\n" + FOOTNOTE + "\n"


def table(n: int, threads=(1, 2)) -> str:
    """The measured table with a line naming x and the copy bandwidth, for bench/run.py's report."""
    m = measure(n, threads)
    return (f"x: ({ROWS}, {n // ROWS}) float32, {n} elements; copy bandwidth {m['copy'].gbps:.1f} GB/s with "
            f"{threads[0]} thread(s) (best of {', '.join(m['copy'].methods)}).\n\n" + _body(m))


def run(n: int, threads=(1, 2)) -> str:
    """The standalone report: device, versions, commit, date and load average around the table."""
    info = common.device_info(torch.device("cpu"))
    load_start = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    m = measure(n, threads)
    load_end = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    head = [["device", info["device"]], ["torch", info["torch"]], ["git commit", info["commit"]],
            ["date", info["date"]], ["x", f"({ROWS}, {n // ROWS}) float32, {n} elements"],
            ["copy bandwidth", f"{m['copy'].gbps:.1f} GB/s with {threads[0]} thread(s) (best of {', '.join(m['copy'].methods)})"],
            ["load average (1 / 5 / 15 min)", f"{load_start} at start, {load_end} at the end, on {os.cpu_count()} "
                                              "CPUs: above the CPU count, other work slows every timing here"]]
    return ("# cpu backend: in-kernel noise and eps= paths against copy bandwidth\n\n"
            + common.md_table(["", ""], head, align="ll") + "\n\n" + _body(m))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--threads", default="1,2", help="thread counts to time, the first being the baseline")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    text = run(args.numel, tuple(int(k) for k in args.threads.split(",")))
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
