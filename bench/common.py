"""Shared benchmark plumbing: device description, timers, op and launch counting, copy bandwidth, Markdown.

Timing rules (every table uses them):

* GPU: CUDA events around each call, after warm-up calls and a ``torch.cuda.synchronize()``; the
  L2 cache is flushed (a 256 MiB ``zero_``) before each timed call, outside the events, so large
  and small sizes both read from HBM. The reported time is the median over the repeats.
* CPU: ``time.perf_counter`` around each call, median over the repeats.

Speed is shown, never asserted.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]


# ---- device and version description ------------------------------------------------------------


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slugify(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:60] or "device"


def git_commit() -> str:
    """Short commit of the repository, with ``+dirty`` when the working tree has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git here
        return "unknown"


def device_info(device: torch.device) -> Dict[str, str]:
    """Everything the report header shows about this machine and software."""
    import cld_fast

    info: Dict[str, str] = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        info["kind"] = "gpu"
        info["slug"] = slugify(props.name)
    else:
        n = torch.get_num_threads()
        info["device"] = f"CPU: {cpu_model_name()}, {n} thread{'s' if n != 1 else ''} (no GPU used)"
        info["kind"] = "cpu"
        info["slug"] = "cpu-" + slugify(cpu_model_name())
    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = "not installed"
    info["cuda"] = torch.version.cuda or "none (CPU build of torch)"
    info["cld_fast"] = getattr(cld_fast, "__version__", "unknown")
    try:
        info["backends"] = ", ".join(cld_fast.backends())
    except Exception as exc:  # noqa: BLE001
        info["backends"] = f"unknown ({exc})"
    info["commit"] = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    info["date"] = now.strftime("%Y-%m-%d %H:%M UTC")
    info["day"] = now.strftime("%Y-%m-%d")
    info["python"] = platform.python_version()
    return info


# ---- time budget ---------------------------------------------------------------------------------

_BUDGET = {"deadline": None, "seconds": None}


def set_budget(seconds: Optional[float]) -> None:
    """Start a soft time budget for the run (None: unlimited)."""
    _BUDGET["seconds"] = seconds
    _BUDGET["deadline"] = None if seconds is None else time.perf_counter() + seconds


def time_left() -> float:
    """Seconds left in the run's budget (inf without one)."""
    return float("inf") if _BUDGET["deadline"] is None else _BUDGET["deadline"] - time.perf_counter()


def budget_note(needed_s: float) -> Optional[str]:
    """A reason to skip an item expected to take ``needed_s`` seconds, or None when it fits."""
    if time_left() >= needed_s:
        return None
    return (f"skipped: the run's {_BUDGET['seconds']:.0f} s time budget (--budget-s) had less than "
            f"{needed_s:.0f} s left for it")


# ---- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH: Dict[str, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(64 * 2**20, dtype=torch.float32, device=device)  # 256 MiB > any L2
    return _FLUSH[key]


@dataclass
class Timing:
    median_ms: float
    iters: int
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")


def measure(fn: Callable[[], object], device: torch.device, *, target_s: float = 0.2, min_iters: int = 5,
            max_iters: int = 200, warmup: int = 2, flush_l2: bool = True, include_host: bool = False) -> Timing:
    """Median wall time of ``fn()`` in ms (CUDA events on GPU, perf_counter on CPU).

    The repeat count adapts to the call's cost: about ``target_s`` seconds of timed calls, clamped
    to [min_iters, max_iters]. GPU: ``include_host=False`` times the GPU work (the host enqueues the
    call while the GPU is still busy with the cache flush, so launch overhead is hidden);
    ``include_host=True`` synchronises after the flush, so a call that is slower to enqueue than to
    run (many small launches, host syncs) is timed by its host side: the latency seen from an idle GPU.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(min_iters, target_s / est)))
    times: List[float] = []
    if device.type == "cuda":
        flush = _l2_flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            if flush is not None:
                flush.zero_()
            if include_host:
                torch.cuda.synchronize(device)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), iters, q(0.2), q(0.8))


def time_block(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one ``fn()`` call, synchronised on both ends (for long runs: sampling, training)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- copy bandwidth ----------------------------------------------------------------------------


@dataclass
class CopyBandwidth:
    gbps: float                      # the reference: best of the methods below (bytes read + written)
    methods: Dict[str, float] = field(default_factory=dict)
    nbytes: int = 0


def copy_bandwidth(device: torch.device, nbytes: int) -> CopyBandwidth:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written (2 x size).

    GPU: ``dst.copy_(src)`` between two device buffers. CPU: ``torch.Tensor.copy_`` (parallel over
    torch's threads) and a single ``memcpy`` (``ctypes.memmove``); the larger is the reference.
    """
    n = nbytes // 4
    src = torch.randn(n, device=device) if device.type == "cuda" else torch.ones(n)
    dst = torch.empty_like(src)
    methods = {}
    t = measure(lambda: dst.copy_(src), device, target_s=0.3, min_iters=5, max_iters=50, flush_l2=False)
    methods["torch copy_"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    if device.type == "cpu":
        s_ptr, d_ptr = src.data_ptr(), dst.data_ptr()
        t = measure(lambda: ctypes.memmove(d_ptr, s_ptr, n * 4), device, target_s=0.3, min_iters=5, max_iters=50)
        methods["memcpy"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    del src, dst
    return CopyBandwidth(max(methods.values()), methods, nbytes)


# ---- op counting (dispatcher) and launch counting (profiler, GPU) -------------------------------

ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})


class _OpRecorder(TorchDispatchMode):
    """Records every non-view op (aten and custom ops alike) dispatched while it is active.

    Ops that run *inside* an op (a custom op's implementation, a decomposition) are not seen: while
    the mode handles one call it is switched off, so each public-level dispatch counts once.
    """

    def __init__(self):
        super().__init__()
        self.names: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object], warmup: bool = True) -> List[str]:
    """Names (``aten.mul.Tensor``, ``cld_fast.perturb.default``, ...) of the non-view ops one ``fn()`` dispatches.

    ``warmup`` first runs ``fn()`` once unobserved, so one-time work (a cached parameter tensor, a
    lazily registered op) is not counted. A ``torch.compile``d region is not traced under a dispatch
    mode (Dynamo runs it eagerly), so compiled code must be counted another way.
    """
    if warmup:
        fn()
    recorder = _OpRecorder()
    with recorder:
        fn()
    return recorder.names


def count_ops(fn: Callable[[], object], warmup: bool = True) -> int:
    """Number of dispatched non-view aten/custom ops per ``fn()`` call (see ``dispatched_ops``)."""
    return len(dispatched_ops(fn, warmup=warmup))


def is_allocation(name: str) -> bool:
    """Whether a ``dispatched_ops`` name is a pure allocation (``empty`` and friends: no kernel runs)."""
    return name.split(".")[1] in ALLOCATION_OPS if name.count(".") >= 1 else False


def short_op_names(names: Sequence[str]) -> str:
    """``aten.mul.Tensor`` x 3 -> ``mul x3``, in first-seen order (for a readable breakdown)."""
    counts: Dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = parts[1] if parts[0] == "aten" and len(parts) > 1 else ".".join(parts[:2])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} x{c}" for k, c in counts.items())


_SYNC_NAMES = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cuStreamSynchronize",
               "cuEventSynchronize", "cuMemcpyDtoH", "cuMemcpyHtoD")


@dataclass
class LaunchCount:
    launches: int                    # kernels + memcpy/memset on the GPU
    syncs: int                       # host synchronisations (stream/event syncs, blocking memcpy)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_launches(fn: Callable[[], object], device: torch.device) -> LaunchCount:
    """GPU only: device activities (kernels, memcpy, memset) and host syncs of one ``fn()`` (torch.profiler).

    Unlike ``count_ops`` this also sees the kernels inside compiled regions and custom ops.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise ValueError("count_launches counts GPU activity; use count_ops on a CPU")
    fn()
    sync(device)
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    syncs = [e for e in events if e.device_type == DeviceType.CPU and e.name.split("_v")[0] in _SYNC_NAMES]
    return LaunchCount(len(gpu), len(syncs))


# ---- torch.compile policy ----------------------------------------------------------------------

_COMPILE = {"kernels_skip": None}


def set_kernel_compile_skip(reason: Optional[str]) -> None:
    """Why the kernel table's torch.compile column is skipped this run (None: it runs)."""
    _COMPILE["kernels_skip"] = reason


def compile_unavailable(kernels: bool = False) -> Optional[str]:
    """Why torch.compile can't or shouldn't run (None when it may); ``kernels``: for the kernel table."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if env_flag("BENCH_NO_COMPILE"):
        return "torch.compile switched off (BENCH_NO_COMPILE=1 or --no-compile)"
    return _COMPILE["kernels_skip"] if kernels else None


# ---- Markdown ----------------------------------------------------------------------------------


class Footnotes:
    """Numbered footnotes; the same text gets the same number."""

    def __init__(self):
        self.notes: List[str] = []

    def ref(self, text: str) -> str:
        text = " ".join(str(text).split())
        if text not in self.notes:
            self.notes.append(text)
        return f"[^{self.notes.index(text) + 1}]"

    def na(self, text: str) -> str:
        return "n/a " + self.ref(text)

    def render(self) -> str:
        return "\n".join(f"[^{i + 1}]: {t}" for i, t in enumerate(self.notes))


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    align = align or ("l" * min(2, len(header)) + "r" * max(0, len(header) - 2))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt(x: Optional[float], digits: int = 3) -> str:
    """A number with ``digits`` significant digits ('-' for None)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = int(math.floor(math.log10(abs(x))))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")
