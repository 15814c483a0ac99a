"""Run the cld_fast benchmarks and write a Markdown report with PNG plots.

    python bench/run.py                  # full run (GPU sizes on a GPU; under 10 minutes on an H100)
    python bench/run.py --quick          # CPU CI run: small sizes, a few minutes on 2 cores
    python bench/run.py --only kernels,sampler --out /tmp/bench

Writes ``<out>/<device-slug>-<YYYY-MM-DD>.md`` (+ ``-kernels-gbps.png``, ``-kernels-copyfrac.png`` and
a ``.json`` of the raw numbers) and copies the report to ``<out>/latest-gpu.md`` or
``<out>/latest-cpu.md`` (the file the README links). Sections: kernels, paths (CPU: in-kernel noise and
``eps=`` against copy bandwidth, one and two threads, at the largest kernel size), sampler, train, quality.
Every column that cannot run here (no CUDA, no Triton on a GPU, a failing torch.compile) shows
"n/a" with a footnote saying why; nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)   # run as a script: don't let bench/*.py shadow top-level module names
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402

SECTIONS = ("kernels", "paths", "sampler", "train", "quality")
DEFAULT_OUT = _ROOT / "bench" / "results"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU CI run (a few minutes on 2 cores)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bench/results)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections out of {','.join(SECTIONS)}")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when present")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile column (shown as n/a)")
    p.add_argument("--impls", default=None, help="kernel table implementations (default: all of official,compile,"
                                                  "triton,cuda,cpu,torch)")
    p.add_argument("--sizes", default=None, help="kernel table sizes as shapes of x, e.g. '8x3x32x32,16x65536' "
                                                  "(default: the GPU or --quick CPU set)")
    p.add_argument("--target-s", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on a CPU (default: 1 with --quick, for numbers that survive a shared "
                        "CI machine, where every OpenMP barrier can wait a scheduler tick; else torch's default)")
    p.add_argument("--full-quality", action="store_true",
                   help="run bench/sampler_quality.py's full study (default: its --quick, to keep a full GPU run "
                        "under 10 minutes)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget: optional long items (compiled training, toy training) are skipped once "
                        "it is spent (default: 540 s for a full GPU run, none otherwise)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-latest", action="store_true", help="do not write latest-<kind>.md")
    p.add_argument("--expect-counts", default=None, metavar="REPORT",
                   help="a committed report (e.g. bench/results/latest-cpu.md): exit with status 1 when this run's "
                        "op-level counts differ from its table (stale results are caught in CI)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    return args


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sizes(spec: Optional[str], device, quick):
    from bench import kernels

    if not spec:
        return kernels.default_sizes(device, quick)
    out = []
    for s in spec.split(","):
        shape = tuple(int(v) for v in s.strip().lower().split("x"))
        out.append(kernels.Size(f"{'x'.join(map(str, shape))}", shape))
    return out


def _header(info: Dict[str, str], args, wall: Dict[str, float], argv) -> str:
    rows = [
        ["device", info["device"]],
        ["torch", info["torch"]],
        ["triton", info["triton"]],
        ["CUDA (torch build)", info["cuda"]],
        ["cld_fast", info["cld_fast"]],
        ["backends available", info["backends"]],
        ["git commit", info["commit"]],
        ["date", info["date"]],
        ["command", "`python bench/run.py " + " ".join(argv) + "`"],
        ["mode", "--quick (CPU CI sizes)" if args.quick else "full"],
        ["wall time", f"{sum(wall.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()) + ")"],
    ]
    if info["kind"] == "cpu" and args.quick and not args.threads:
        rows.append(["threads", "1 (the --quick default: on a shared 2-core machine a parallel region can stall for a "
                                "scheduler tick; --threads N to change)"])
    if info["kind"] == "cpu" and hasattr(os, "getloadavg"):
        la = info.get("loadavg")
        if la:
            end = " / ".join(f"{v:.1f}" for v in os.getloadavg())
            rows.append(["load average (1 / 5 / 15 min)", f"{la} at start, {end} at the end, on {os.cpu_count()} CPUs "
                                                          "(CPU timings on a shared machine are noisy; above the CPU "
                                                          "count, every timing here is slowed by other work)"])
    title = "GPU" if info["kind"] == "gpu" else "CPU"
    return (f"# cld_fast benchmarks ({title})\n\n" + common.md_table(["", ""], rows, align="ll") + "\n\n"
            "Speed is shown, never asserted. Median times; GPU timings use CUDA events after warm-up with the L2 "
            "cache flushed between calls, CPU timings use time.perf_counter. Each section's footnotes say "
            "exactly what is timed.\n")


def run(argv: Optional[List[str]] = None) -> Path:
    """Run the benchmarks named by ``argv`` (see ``--help``) and return the path of the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    saved_env = os.environ.get("BENCH_NO_COMPILE")
    if args.no_compile:
        os.environ["BENCH_NO_COMPILE"] = "1"
    try:
        return _run(args, argv)
    finally:
        if args.no_compile:
            if saved_env is None:
                os.environ.pop("BENCH_NO_COMPILE", None)
            else:
                os.environ["BENCH_NO_COMPILE"] = saved_env


def _run(args, argv) -> Path:
    device = _device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        threads = args.threads or (1 if args.quick else None)
        if threads:
            torch.set_num_threads(threads)
    budget = args.budget_s if args.budget_s is not None else (540.0 if device.type == "cuda" and not args.quick else None)
    common.set_budget(budget)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.device_info(device)
    if hasattr(os, "getloadavg"):
        info["loadavg"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    stem = out_dir / f"{info['slug']}-{info['day']}"
    notes = common.Footnotes()
    sections: List[str] = []
    wall: Dict[str, float] = {}
    raw: Dict[str, object] = {"info": info, "argv": argv}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"[bench] {info['device']} | torch {info['torch']} | out {out_dir}")

    if "kernels" in args.only:
        t0 = time.perf_counter()
        log("[bench] kernels")
        sections.append(_kernels_section(args, device, info, notes, stem, raw, log))
        wall["kernels"] = time.perf_counter() - t0
    if "paths" in args.only and device.type == "cpu":
        t0 = time.perf_counter()
        log("[bench] paths")
        sections.append(_section("CPU: in-kernel noise and eps= paths, one and two threads",
                                 lambda: _paths_section(args, device), notes))
        wall["paths"] = time.perf_counter() - t0
    if "sampler" in args.only:
        t0 = time.perf_counter()
        log("[bench] sampler")
        sections.append(_section("Sampler: SSCS throughput and same-noise agreement", lambda: _sampler_section(args, device, notes, raw, log), notes))
        wall["sampler"] = time.perf_counter() - t0
    if "train" in args.only:
        t0 = time.perf_counter()
        log("[bench] train")
        sections.append(_section("Training step throughput", lambda: _train_section(args, device, notes, raw, log), notes))
        wall["train"] = time.perf_counter() - t0
    if "quality" in args.only:
        t0 = time.perf_counter()
        log("[bench] quality")
        sections.append(_section("Quality", lambda: _quality_section(args, device, notes, stem, raw, log), notes))
        wall["quality"] = time.perf_counter() - t0

    text = _header(info, args, wall, argv) + "\n" + "\n\n".join(sections) + "\n\n## Notes\n\n" + notes.render() + "\n"
    report = Path(f"{stem}.md")
    report.write_text(text)
    raw["wall_s"] = wall
    Path(f"{stem}.json").write_text(json.dumps(raw, indent=1, default=str))
    if not args.no_latest:
        shutil.copyfile(report, out_dir / f"latest-{info['kind']}.md")
    log(f"[bench] wrote {report} ({sum(wall.values()):.0f} s)")
    if args.expect_counts:
        problems = count_differences(Path(args.expect_counts).read_text(), text)
        if problems:
            log(f"[bench] op-level counts differ from {args.expect_counts} (regenerate the committed results):")
            for line in problems:
                log("  " + line)
            raise SystemExit(1)
        log(f"[bench] op-level counts match {args.expect_counts}")
    return report


_FOOTNOTE = re.compile(r"\s*\[\^\d+\]")


def count_rows(report: str) -> Dict[str, List[str]]:
    """implementation -> cells of the "**Op-level counts**" table of a bench report (footnote marks dropped)."""
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("**Op-level counts**")), None)
    if start is None:
        return {}
    rows: Dict[str, List[str]] = {}
    table: List[str] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:  # the first line after the table ends it
            break
    for line in table[2:]:  # header and alignment rows first
        cells = [_FOOTNOTE.sub("", c).strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# Rows left out of the comparison: Inductor's kernel count follows the installed torch, not this code.
_UNCOMPARED = ("torch.compile",)


def count_differences(expected_report: str, report: str) -> List[str]:
    """Lines naming every implementation whose op-level counts differ between two reports (empty: they match).

    The torch.compile row is not compared (its count is Inductor's, which changes with torch), and
    an implementation only one report has (a backend the other machine could not run, such as Triton
    without the interpreter) is not either: that is a difference of machines, not of the code.
    """
    want, got = count_rows(expected_report), count_rows(report)
    want = {k: v for k, v in want.items() if not k.startswith(_UNCOMPARED)}
    got = {k: v for k, v in got.items() if not k.startswith(_UNCOMPARED)}
    if not want:
        return ["the committed report has no op-level count table"]
    if not got:
        return ["this run produced no op-level count table"]
    problems = []
    for impl in sorted(set(want) & set(got)):
        if want.get(impl) != got.get(impl):
            problems.append(f"{impl}: committed {want.get(impl)}, now {got.get(impl)}")
    return problems


def _section(title: str, body, notes: common.Footnotes) -> str:
    try:
        return f"## {title}\n\n" + body()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        import traceback

        traceback.print_exc()
        return f"## {title}\n\nn/a {notes.ref(f'this section failed: {common.short_error(exc)}')}"


def _kernels_section(args, device, info, notes, stem, raw, log) -> str:
    from bench import kernels

    try:
        sizes = _sizes(args.sizes, device, args.quick)
        impls = tuple(i.strip() for i in args.impls.split(",")) if args.impls else kernels.IMPLS
        unknown = [i for i in impls if i not in kernels.IMPLS]
        if unknown:
            raise ValueError(f"unknown implementation(s) {unknown}; choose from {kernels.IMPLS}")
        target = args.target_s if args.target_s is not None else (0.2 if device.type == "cuda" else 0.15)
        bw_bytes = (1 << 30) if device.type == "cuda" else (256 << 20 if not args.quick else 128 << 20)
        copy_bw = common.copy_bandwidth(device, bw_bytes)
        log(f"  copy bandwidth {copy_bw.gbps:.1f} GB/s ({copy_bw.methods})")
        results = kernels.run(device, sizes, impls=impls, target_s=target, log=log)
        plot_files = {}
        if not args.no_plots:
            try:
                from bench import plots

                label = info["device"].split(",")[0]
                paths = plots.kernel_plots(results, copy_bw.gbps, label, str(stem))
                plot_files = {k: os.path.basename(v) for k, v in paths.items()}
            except Exception as exc:  # noqa: BLE001
                log(f"  plots failed: {common.short_error(exc)}")
        raw["copy_bandwidth"] = {"gbps": copy_bw.gbps, "methods": copy_bw.methods, "bytes": copy_bw.nbytes}
        raw["kernels"] = [dict(op=r.op, size=r.size.name, shape=r.size.shape, impl=r.impl, op_ms=r.op_ms,
                               kernel_ms=r.kernel_ms, launches=r.launches, kernel_launches=r.kernel_launches,
                               syncs=r.syncs, op_gbps=r.gbps("op"), kernel_gbps=r.gbps("kernel"), na=r.na)
                          for r in results]
        return "## Kernels\n\n" + kernels.render(results, copy_bw, device, notes, plot_files)
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        return f"## Kernels\n\nn/a {notes.ref(f'the kernel table failed: {common.short_error(exc)}')}"


def _paths_section(args, device) -> str:
    from bench import eps_paths

    n = max(math.prod(size.shape) for size in _sizes(args.sizes, device, args.quick))
    return eps_paths.table(n - n % eps_paths.ROWS, threads=(1, 2))


def _sampler_section(args, device, notes, raw, log) -> str:
    from bench import sampler

    rows = sampler.run(device, args.quick, notes, log=log)
    raw["sampler"] = [dict(model=r.model, batch=r.batch, variant=r.variant, nfe=r.nfe, seconds=r.seconds,
                           rel_err=r.rel_err, max_abs=r.max_abs, na=r.na) for r in rows]
    return sampler.render(rows, notes)


def _train_section(args, device, notes, raw, log) -> str:
    from bench import training

    rows = training.run(device, args.quick, log=log)
    raw["train"] = [dict(model=r.model, batch=r.batch, variant=r.variant, precision=r.precision, steps=r.steps,
                         seconds=r.seconds, images_per_s=r.images_per_s, peak_mem=r.peak_mem, na=r.na) for r in rows]
    return training.render(rows, device, notes)


def _quality_section(args, device, notes, stem, raw, log) -> str:
    from bench import quality

    study = quality.run_sampler_quality(args.quick or not args.full_quality, device, f"{stem}-sampler-quality", log=log)
    log(f"  sampler_quality: {study.status} {study.detail}")
    toy = quality.run_toy(device, args.quick, log=log)
    raw["quality"] = {"study": {"status": study.status, "detail": study.detail, "seconds": study.seconds},
                      "toy": [dict(sde=r.sde, steps=r.train_steps, seconds=r.train_seconds, energy=r.energy,
                                   floor=r.floor, na=r.na) for r in toy]}
    return quality.render(study, toy, device, args.quick, notes)


def main(argv: Optional[List[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
