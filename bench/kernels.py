"""Kernel table: each public op, per implementation, as a whole call (op level) and as a bare kernel.

Ops (the calls a training or sampling loop makes, with the default settings: value checks on, which
read no device value and dispatch no op):

    perturb   ``cf.perturb(x0, t, sde)``
    loss_fwd  ``cf.hsm_loss(out, u, t, sde, noise)`` with ``out`` requiring grad (the training forward)
    loss_bwd  ``torch.autograd.grad`` of that loss w.r.t. ``out`` (an explicit 0-d grad of 2, graph retained:
              a scaled loss; for the grad 1 of ``loss.backward()`` the cpu backend's backward launches
              nothing, which the forward + backward row ``loss`` shows)
    loss      both, as one training step makes them (grad 1)
    sscs      ``cf.sscs_step_(u, y, ts, sde, step=k, mixed=True, seed=...)``: one fused SSCS step
    em        ``cf.em_step_(u, y, ts, sde, step=k, mixed=True, seed=...)``: one Euler-Maruyama step

Implementations (columns that cannot run here show "n/a" with the reason in a footnote):

    official  eager PyTorch with the official CLD-SGM structure (``bench/official_style.py``)
    compile   ``torch.compile`` of the same math: the op's torch reference (``cld_fast.opdefs``),
              coefficients from t and the CLD parameters and Philox noise included (seed mode)
    triton    our Triton kernels (timed on CUDA; on a CPU under TRITON_INTERPRET=1 only counted)
    cuda      our CUDA C++ kernels
    cpu       our C++/OpenMP kernels
    torch     our plain-PyTorch reference backend

Two levels:

* **op**: the public call above, everything included (input checks, allocation, the seed draw).
* **kernel**: ``cld_fast.backends.get(name).op(opname)(...)`` with the ``cld_fast.opdefs`` schema
  arguments made beforehand (for compile, the compiled reference; the official code has no kernel).

Counts: ``bench.common.count_ops``, the non-view aten/custom ops dispatched per call (a
``TorchDispatchMode``). Allocations are shown separately, since ``tests/test_launch_counts.py`` counts
launches as ops minus allocations. A compiled region is invisible to a dispatch mode, so the compile
column counts the kernels Inductor generated for the graph (plus the ops dispatched around it).
On a GPU the torch.profiler's device launches and host syncs are shown too.

Byte model (fp32, N = elements of x, minimum traffic; the (B,) times and the (5,) parameters are
negligible): perturb reads x0 and writes x and v: 12N. Loss forward reads out and v: 8N; backward
reads out and v and writes the gradient: 12N. SSCS and EM steps read u = (x, v) and y, write u: 20N.
Noise drawn in-kernel (Philox) moves no bytes; noise handed in as tensors (the official code, the
torch backend's ``torch.randn`` eps) is extra traffic that is not credited, so their GB/s is an
*effective* rate.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import cld_fast as cf
from cld_fast import backends as cf_backends
from cld_fast import opdefs, philox
from cld_fast.sde import AFFINE_KIND_CODES, OBJECTIVE_CODES, OUTPUT_CODES, kernel_params

from . import common
from . import official_style as off

OPS = ("perturb", "loss_fwd", "loss_bwd", "loss", "sscs", "em")
COUNTED_OPS = ("perturb", "loss_fwd", "loss_bwd", "sscs")   # the op-level count table
OP_TITLES = {
    "perturb": "perturb: cf.perturb(x0, t, sde)",
    "loss_fwd": "HSM loss forward: cf.hsm_loss(out, u, t, sde, noise)",
    "loss_bwd": "HSM loss backward: torch.autograd.grad(loss, out, 2.0), graph retained",
    "loss": "HSM loss forward + backward: torch.autograd.grad(cf.hsm_loss(...), out), as one training step makes it",
    "sscs": "fused SSCS step: cf.sscs_step_",
    "em": "Euler-Maruyama step: cf.em_step_",
}
OP_SHORT = {"perturb": "perturb", "loss_fwd": "hsm_loss fwd", "loss_bwd": "hsm_loss bwd", "loss": "hsm_loss fwd+bwd",
            "sscs": "sscs_step_", "em": "em_step_"}
# the public ops of a training / sampling loop: what the summary compares (the loss as forward + backward,
# since a backend may move work between its two halves)
PUBLIC_OPS = ("perturb", "loss", "sscs", "em")
OPDEF_NAME = {"perturb": "perturb", "loss_fwd": "hsm_loss_fwd", "loss_bwd": "hsm_loss_bwd", "sscs": "sscs_step_",
              "em": "affine_step"}
BYTES_PER_ELEMENT = {"perturb": 12, "loss_fwd": 8, "loss_bwd": 12, "loss": 20, "sscs": 20, "em": 20}
IMPLS = ("official", "compile", "triton", "cuda", "cpu", "torch")
IMPL_TITLES = {
    "official": "eager, official-style",
    "compile": "torch.compile (same math)",
    "triton": "cld_fast triton",
    "cuda": "cld_fast cuda",
    "cpu": "cld_fast cpu (C++)",
    "torch": "cld_fast torch (reference)",
}
OUR_BACKENDS = ("triton", "cuda", "cpu", "torch")
SAMPLER_STEPS = 50                          # the SSCS / EM grid; the timed step is mid-grid
WEIGHTING = 0                               # reweightedv2


@dataclass(frozen=True)
class Size:
    name: str
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def batch(self) -> int:
        return self.shape[0]


def default_sizes(device: torch.device, quick: bool) -> List[Size]:
    """GPU: CIFAR-10 b128, CelebA-HQ-256 b16, 64M elements. CPU --quick: small sizes for CI."""
    if device.type == "cuda":
        return [Size("CIFAR-10 b128", (128, 3, 32, 32)), Size("CelebA-HQ-256 b16", (16, 3, 256, 256)),
                Size("64M elements", (64, 1 << 20))]
    if quick:
        return [Size("CIFAR-10 b8", (8, 3, 32, 32)), Size("CIFAR-10 b32", (32, 3, 32, 32)),
                Size("1M elements", (16, 1 << 16))]
    return [Size("CIFAR-10 b128", (128, 3, 32, 32)), Size("CelebA-HQ-256 b16", (16, 3, 256, 256)),
            Size("16M elements", (16, 1 << 20))]


@dataclass
class Result:
    op: str
    size: Size
    impl: str
    op_ms: Optional[float] = None
    kernel_ms: Optional[float] = None
    ops: Optional[int] = None               # dispatched non-view ops per op call (compile: see module doc)
    kernel_ops: Optional[int] = None        # the same per kernel call
    allocs: Optional[int] = None            # of ``ops``, allocations (empty*)
    op_names: List[str] = field(default_factory=list)
    launches: Optional[int] = None          # GPU: device launches per op call (profiler)
    kernel_launches: Optional[int] = None
    syncs: Optional[int] = None
    compile_s: Optional[float] = None       # compile: seconds of the call that compiled the graph
    na: Optional[str] = None                # why this implementation could not run at all
    timing_na: Optional[str] = None         # counted, but not timed (the Triton interpreter)

    def bytes(self) -> int:
        return BYTES_PER_ELEMENT[self.op] * self.size.numel

    def gbps(self, which: str = "op") -> Optional[float]:
        ms = self.op_ms if which == "op" else self.kernel_ms
        return None if ms is None else self.bytes() / (ms * 1e-3) / 1e9

    @property
    def launch_ops(self) -> Optional[int]:
        """Dispatched ops that run a kernel: ``ops`` minus allocations (tests/test_launch_counts.py)."""
        return None if self.ops is None else self.ops - (self.allocs or 0)


# ---- availability ------------------------------------------------------------------------------


def triton_interpreted() -> bool:
    """Whether this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def impl_unavailable(impl: str, device: torch.device) -> Optional[str]:
    """Why ``impl`` can't run on ``device`` (None when it can)."""
    if impl == "official":
        return None
    if impl == "compile":
        return common.compile_unavailable(kernels=True)
    if impl == "triton" and device.type != "cuda" and not triton_interpreted():
        return ("Triton needs CUDA; on a CPU it runs only under TRITON_INTERPRET=1 (then this table counts its ops "
                "but does not time the interpreter)")
    if impl == "cuda" and device.type != "cuda":
        return ("this run times CPU tensors (--device cpu)" if torch.cuda.is_available()
                else "no CUDA device on this machine")
    if impl == "cpu" and device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    mod = cf_backends.get(impl)
    if not mod.is_available():
        return f"backend {impl!r} unavailable: {mod.why_unavailable() or 'not importable'}"
    if not mod.supports(device, torch.float32):
        return f"backend {impl!r} does not support float32 tensors on {device.type}"
    return None


def timing_unavailable(impl: str, device: torch.device) -> Optional[str]:
    """Why ``impl`` is counted but not timed here (None when it is timed)."""
    if impl == "triton" and device.type == "cpu":
        return ("TRITON_INTERPRET=1: the Triton interpreter runs the kernels in numpy, far too slow to time; the op "
                "counts are real (counted at the smallest size)")
    return None


# ---- torch.compile of the references ------------------------------------------------------------------


@dataclass
class Compiled:
    """One compiled op reference: the callable, and what compiling it cost (set on the compiling call)."""

    fn: Callable
    kernels: Optional[int] = None
    compile_s: Optional[float] = None


_COMPILED: Dict[str, Compiled] = {}


def compiled(op: str, device: torch.device) -> Compiled:
    """One ``torch.compile`` per op (dynamic shapes) of its ``cld_fast.opdefs`` torch reference."""
    key = f"{op}:{device.type}"
    if key not in _COMPILED:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        if op == "loss":  # the forward and the backward reference in one graph, as a training step calls them
            fwd, bwd = opdefs.OPS["hsm_loss_fwd"].reference, opdefs.OPS["hsm_loss_bwd"].reference

            def ref(fwd_args, bwd_args):
                return fwd(*fwd_args), bwd(*bwd_args)
        else:
            ref = opdefs.OPS[OPDEF_NAME[op]].reference
        _COMPILED[key] = Compiled(torch.compile(ref, dynamic=True))
    return _COMPILED[key]


def _inductor_kernel_count() -> Optional[int]:
    try:
        from torch._inductor import metrics

        return int(metrics.generated_kernel_count)
    except Exception:  # noqa: BLE001 - a torch without the metric
        return None


def first_call(comp: Compiled, args: Tuple) -> None:
    """Call ``comp.fn(*args)``; if that compiled a graph, record its kernel count and compile time."""
    k0 = _inductor_kernel_count()
    t0 = time.perf_counter()
    comp.fn(*args)
    dt = time.perf_counter() - t0
    k1 = _inductor_kernel_count()
    if k0 is not None and k1 is not None and k1 > k0:
        comp.kernels, comp.compile_s = k1 - k0, dt


# ---- one (op, size) case: inputs and the callables per implementation ------------------------------


@dataclass
class Callables:
    """What one implementation runs: the op-level call, the kernel call (or None), and for compile the
    ops dispatched around the compiled region (``outside``) and the compiled op."""

    op: Callable[[], object]
    kernel: Optional[Callable[[], object]] = None
    outside: Optional[Callable[[], object]] = None
    comp: Optional[Compiled] = None
    comp_args: Optional[Tuple] = None


class Case:
    """Inputs for one op at one size, and the ``Callables`` of each implementation."""

    def __init__(self, op: str, size: Size, device: torch.device, seed: int = 0):
        self.op, self.size, self.device = op, size, device
        g = torch.Generator(device=device).manual_seed(seed)
        shape = size.shape
        self.B, self.D = shape[0], math.prod(shape[1:])
        self.sde = cf.CLD()
        self.osde = off.OfficialCLD()
        self.params = kernel_params(self.sde, device)
        self.x0 = torch.randn(shape, generator=g, device=device)
        self.t32 = torch.rand(self.B, generator=g, device=device) * (1 - 1e-5) + 1e-5
        self.t64 = self.t32.double()
        self.seed = torch.tensor([1234], dtype=torch.int64, device=device)
        self.scale = 1.0 / self.B                      # reduction "mean", as hsm_loss passes it
        # d loss / d loss for the backward: 1 as loss.backward() passes it; 2 for loss_bwd alone, whose
        # graph is retained across calls (a cpu backward hands over the unit gradient once, then recomputes)
        self.grad = torch.full((), 2.0 if op == "loss_bwd" else 1.0, device=device)
        if op in ("sscs", "em"):
            self.u0 = self.sde.prior_sampling(shape, generator=g, device=device)
            self.y = torch.randn(shape, generator=g, device=device)
            self.sampler = off.SSCSSampler(self.osde, SAMPLER_STEPS + 1, eps=1e-3, denoising=True)
            self.ts = self.sampler.forward_times().to(device)   # float64, decreasing; step k: ts[k] -> ts[k + 1]
            self.k = SAMPLER_STEPS // 2
            self.step = torch.tensor([self.k], dtype=torch.int64, device=device)
        if op in ("loss_fwd", "loss_bwd", "loss"):
            self.out = torch.randn(shape, generator=g, device=device).requires_grad_(True)

    # -- official-style ---------------------------------------------------------------------------
    def official(self) -> Callables:
        osde, x0, t64 = self.osde, self.x0, self.t64
        if self.op == "perturb":
            return Callables(lambda: off.perturb(osde, x0, t64))
        if self.op in ("loss_fwd", "loss_bwd", "loss"):
            return Callables(self._official_loss())
        return Callables(self._official_step())

    def _official_loss(self) -> Callable:
        osde, t64, out, grad = self.osde, self.t64, self.out, self.grad
        u, eps_v = off.perturb(osde, self.x0, t64)
        model = lambda uu, tt: out  # noqa: E731 - the network output stands in for the network
        forward = lambda: torch.mean(off.loss_from_model(osde, model, u, t64, eps_v))  # noqa: E731
        if self.op == "loss_fwd":
            return forward
        if self.op == "loss":
            return lambda: torch.autograd.grad(forward(), out, grad)
        loss = forward()
        return lambda: torch.autograd.grad(loss, out, grad, retain_graph=True)

    def _official_step(self) -> Callable:
        y, sampler, u0, i = self.y, self.sampler, self.u0, self.k
        model = lambda uu, tt: y  # noqa: E731
        t = sampler.t   # reverse time: t[i] = 1 - ts[i]
        if self.op == "sscs":
            def run():
                # after the network at step i: its Euler score step and closing half step, then the
                # opening half step of step i + 1 (what one fused launch does per NFE)
                dt = t[i + 1] - t[i]
                u = sampler.euler_score_dynamics(model, u0, t[i], dt)
                u = sampler.analytical_dynamics(u, t[i], dt, True)
                return sampler.analytical_dynamics(u, t[i + 1], t[i + 2] - t[i + 1], True)

            return run
        step_fn = self.osde.get_discrete_step_fn(off.get_score_fn(self.osde, model))
        return lambda: step_fn(u0, t[i], t[i + 1] - t[i])

    # -- the kernel arguments (opdefs schema order) ----------------------------------------------------
    def kernel_args(self, noise: Optional[cf.Noise] = None, u: Optional[torch.Tensor] = None,
                    eps: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                    op: Optional[str] = None) -> Tuple:
        """The schema arguments of this op's kernel (or of ``op``'s); ``noise``/``u`` from a perturb call
        for the loss, ``eps`` or ``seed`` for perturb (seed mode when both are None)."""
        B, D, p = self.B, self.D, self.params
        op = op or self.op
        if op == "perturb":
            seed = self.seed if (eps is None and seed is None) else seed
            return (self.x0.reshape(B, D), None, self.t32, p, 0, eps, seed,
                    torch.empty((B, 2, D), device=self.device))
        if op in ("loss_fwd", "loss_bwd"):
            out2, u3 = self.out.detach().reshape(B, D), u.view(B, 2, D)
            eps_v = None if noise.eps is None else noise.eps[:, 1]
            tail = (self.t32, p, WEIGHTING, self.scale)
            modes = (OBJECTIVE_CODES["hsm"], OUTPUT_CODES["mixed"])
            if op == "loss_fwd":
                return (out2, u3) + tail + (1, eps_v, noise.seed) + modes
            return (self.grad, out2, u3) + tail + (eps_v, noise.seed) + modes
        u3, y2 = u.view(B, 2, D), self.y.reshape(B, D)
        if op == "sscs":
            return (u3, y2, self.ts, self.step, p, True, None, self.seed, False)
        return (u3, y2, self.ts, self.step, p, AFFINE_KIND_CODES["em"], True, None, self.seed, u3)

    # -- our backends -------------------------------------------------------------------------------
    def ours(self, name: str) -> Callables:
        kernel = cf_backends.get(name).op(OPDEF_NAME[self.op]) if self.op in OPDEF_NAME else None
        sde, t32 = self.sde, self.t32
        if self.op == "perturb":
            x0 = self.x0
            # cf.perturb hands the torch backend torch.randn eps and every other backend a Philox seed;
            # the kernel call gets the same kind of noise, made beforehand
            eps = torch.randn((self.B, 2, self.D), device=self.device) if name == "torch" else None
            args = self.kernel_args(eps=eps)
            return Callables(lambda: cf.perturb(x0, t32, sde, backend=name), lambda: kernel(*args))
        if self.op in ("loss_fwd", "loss_bwd", "loss"):
            u, noise = cf.perturb(self.x0, t32, sde, backend=name)
            out, grad = self.out, self.grad
            forward = lambda: cf.hsm_loss(out, u, t32, sde, noise, backend=name)  # noqa: E731
            if self.op == "loss":
                return Callables(lambda: torch.autograd.grad(forward(), out, grad))
            args = self.kernel_args(noise=noise, u=u)
            if self.op == "loss_fwd":
                return Callables(forward, lambda: kernel(*args))
            loss = forward()
            return Callables(lambda: torch.autograd.grad(loss, out, grad, retain_graph=True), lambda: kernel(*args))
        u = self.u0.clone()
        args = self.kernel_args(u=u)
        y, ts, step, seed = self.y, self.ts, self.step, self.seed
        if self.op == "sscs":
            op = lambda: cf.sscs_step_(u, y, ts, sde, step=step, mixed=True, seed=seed, backend=name)  # noqa: E731
        else:
            op = lambda: cf.em_step_(u, y, ts, sde, step=step, mixed=True, seed=seed, backend=name)  # noqa: E731
        return Callables(op, lambda: kernel(*args))

    # -- torch.compile of the reference ----------------------------------------------------------------
    def compiled(self) -> Callables:
        comp = compiled(self.op, self.device)
        if self.op in ("loss_fwd", "loss_bwd", "loss"):
            from cld_fast.backends import torch_backend

            u = torch.empty((self.B, 2, self.D), device=self.device)
            noise_seed = self.seed
            torch_backend.op("perturb")(self.x0.reshape(self.B, self.D), None, self.t32, self.params, 0, None,
                                        noise_seed, u)   # a state whose eps_v the loss regenerates from the seed
            noise = cf.Noise(eps=None, seed=noise_seed, backend="torch", objective="hsm", numel=u.numel() // 2)
            if self.op == "loss":
                args = (self.kernel_args(noise=noise, u=u, op="loss_fwd"), self.kernel_args(noise=noise, u=u, op="loss_bwd"))
            else:
                args = self.kernel_args(noise=noise, u=u)
        elif self.op == "perturb":
            args = self.kernel_args()
        else:
            args = self.kernel_args(u=self.u0.clone())
        fn = comp.fn
        if self.op != "perturb":
            return Callables(lambda: fn(*args), lambda: fn(*args), comp=comp, comp_args=args)
        x2, t32, p, B, D, dev = args[0], self.t32, self.params, self.B, self.D, self.device

        def outside():
            """What cf.perturb dispatches around its kernel: the output and the seed."""
            return torch.empty((B, 2, D), device=dev), philox.seed_from_generator(None, dev)

        def op():
            u3, seed = outside()
            return fn(x2, None, t32, p, 0, None, seed, u3)

        return Callables(op, lambda: fn(*args), outside=outside, comp=comp, comp_args=args)


# ---- running the table ------------------------------------------------------------------------------


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _count(res: Result, impl: str, calls: Callables, device: torch.device) -> None:
    """Fill the op and kernel counts of ``res`` (and the GPU launch counts)."""
    if impl == "compile":
        outside = common.count_ops(calls.outside) if calls.outside is not None else 0
        k = calls.comp.kernels
        res.ops = None if k is None else outside + k
        res.kernel_ops = k
        res.allocs = sum(1 for n in common.dispatched_ops(calls.outside) if common.is_allocation(n)) if calls.outside else 0
        res.compile_s = calls.comp.compile_s
    else:
        res.op_names = common.dispatched_ops(calls.op)
        res.ops = len(res.op_names)
        res.allocs = sum(1 for n in res.op_names if common.is_allocation(n))
        if calls.kernel is not None:
            res.kernel_ops = common.count_ops(calls.kernel)
    if device.type == "cuda":
        lc = common.count_launches(calls.op, device)
        res.launches, res.syncs = lc.launches, lc.syncs
        if calls.kernel is not None:
            res.kernel_launches = common.count_launches(calls.kernel, device).launches


def _time(res: Result, calls: Callables, device: torch.device, target_s: float) -> None:
    res.op_ms = common.measure(calls.op, device, target_s=target_s, include_host=True).median_ms
    if calls.kernel is not None:
        res.kernel_ms = common.measure(calls.kernel, device, target_s=target_s).median_ms


def _callables(case: Case, impl: str) -> Callables:
    if impl == "official":
        return case.official()
    if impl == "compile":
        calls = case.compiled()
        first_call(calls.comp, calls.comp_args)
        return calls
    return case.ours(impl)


def _run_one(case: Case, impl: str, device: torch.device, target_s: float, first_size: bool) -> Result:
    res = Result(case.op, case.size, impl)
    res.timing_na = timing_unavailable(impl, device)
    if res.timing_na and not first_size:
        res.na = "the Triton interpreter: counted at the smallest size only, not timed"
        return res
    calls = _callables(case, impl)
    if not res.timing_na:
        _time(res, calls, device, target_s)
    _count(res, impl, calls, device)
    return res


def _log_result(res: Result, log) -> None:
    head = f"  {res.op:8s} {res.size.name:18s} {res.impl:9s}"
    if res.na:
        log(f"{head} n/a ({res.na})")
        return
    times = "not timed" if res.op_ms is None else f"op {res.op_ms:9.4f} ms" + (
        f"  kernel {res.kernel_ms:9.4f} ms" if res.kernel_ms is not None else "")
    log(f"{head} {times}  ops {res.ops}/{res.kernel_ops}" + (f"  compiled in {res.compile_s:.1f} s" if res.compile_s else ""))


def run(device: torch.device, sizes: List[Size], impls=IMPLS, ops=OPS, target_s: float = 0.2,
        log=print) -> List[Result]:
    """Time and count every (op, size, implementation); failures become ``Result.na``, never exceptions."""
    results: List[Result] = []
    unavailable = {impl: impl_unavailable(impl, device) for impl in impls}
    for op in ops:
        for n, size in enumerate(sizes):
            try:
                case = Case(op, size, device)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest size
                for impl in impls:
                    results.append(Result(op, size, impl, na=f"inputs could not be built: {common.short_error(exc)}"))
                continue
            for impl in impls:
                if unavailable[impl]:
                    results.append(Result(op, size, impl, na=unavailable[impl]))
                    continue
                try:
                    res = _run_one(case, impl, device, target_s, first_size=(n == 0))
                except Exception as exc:  # noqa: BLE001 - a column that can't run shows n/a
                    what = "torch.compile failed" if impl == "compile" else f"{impl} failed"
                    res = Result(op, size, impl, na=f"{what}: {common.short_error(exc)}")
                results.append(res)
                _log_result(res, log)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            del case
            _free(device)
    return results


# ---- Markdown ------------------------------------------------------------------------------------


def _pct(gbps: Optional[float], ref: float) -> str:
    if gbps is None or not ref:
        return "-"
    return f"{100 * gbps / ref:.1f}%"


def _pair(a: Optional[int], b: Optional[int]) -> str:
    return f"{'-' if a is None else a} / {'-' if b is None else b}"


def _sizes_of(results: List[Result]) -> List[Size]:
    return list(dict.fromkeys(r.size for r in results))


def headline_size(results: List[Result]) -> Optional[Size]:
    """The size the op-level tables show: the largest size with a timed result."""
    timed = [r.size for r in results if not r.na and r.op_ms]
    return max(timed, key=lambda s: s.numel) if timed else None


def _counted(results: List[Result], op: str, impl: str, size: Optional[Size]) -> Optional[Result]:
    """The result with counts for (op, impl): at ``size`` if counted there, else the first size counted."""
    mine = [r for r in results if r.op == op and r.impl == impl and not r.na and r.ops is not None]
    return next((r for r in mine if r.size == size), mine[0] if mine else None)


def _count_cell(r: Optional[Result], size: Optional[Size], notes: common.Footnotes) -> str:
    if r is None:
        return "-"
    text = f"{r.ops} ({r.launch_ops})"
    if size is not None and r.size != size:
        text += " " + notes.ref(f"counted at {r.size.name} (x `{'x'.join(map(str, r.size.shape))}`): the Triton "
                                "interpreter is too slow for larger sizes; the count does not depend on the size")
    return text


def count_table(results: List[Result], notes: common.Footnotes) -> str:
    """The op-level count table: dispatched ops per public call, per implementation."""
    size = headline_size(results)
    n_ops = notes.ref(
        "ops = non-view aten/custom ops dispatched per public call (bench.common.count_ops, a TorchDispatchMode), "
        "allocations included; in brackets the same without allocations (empty*), i.e. the launches "
        "tests/test_launch_counts.py asserts. Default settings (value checks on). compile: Inductor's generated kernels "
        "for the graph plus the ops dispatched around it (a dispatch mode cannot see inside a compiled region). The "
        "spec's goal: "
        "perturb 1 kernel + the seed draw, hsm_loss forward 1 (+1 final reduce if split), backward 1, one SSCS step 1.")
    rows = []
    for impl in IMPLS:
        cells = [_count_cell(_counted(results, op, impl, size), size, notes) for op in COUNTED_OPS]
        if any(c != "-" for c in cells):
            rows.append([IMPL_TITLES[impl]] + cells)
    header = ["implementation"] + [f"`{OP_SHORT[o]}`" for o in COUNTED_OPS]
    return (f"**Op-level counts** {n_ops}\n\n" + common.md_table(header, rows, align="l" + "r" * len(COUNTED_OPS)))


def op_level_table(results: List[Result], copy_bw: common.CopyBandwidth, device: torch.device,
                   notes: common.Footnotes) -> str:
    """Per public op at the headline size: ops, time, GB/s and % of copy bandwidth per implementation."""
    size = headline_size(results)
    if size is None:
        return ""
    gpu = device.type == "cuda"
    header = ["op", "implementation", "ops (launches)", "ms / call", "GB/s", "% copy"]
    if gpu:
        header += ["CUDA launches", "syncs"]
    header.append("speed-up vs official")
    rows = []
    for op in COUNTED_OPS:
        base = next((r for r in results if r.op == op and r.size == size and r.impl == "official" and r.op_ms), None)
        for impl in IMPLS:
            r = next((r for r in results if r.op == op and r.size == size and r.impl == impl), None)
            if r is None:
                continue
            if r.na:
                cells = [notes.na(r.na)] + ["-"] * (len(header) - 3)
            else:
                c = _counted(results, op, impl, size)
                g = r.gbps("op")
                cells = [_count_cell(c, size, notes),
                         common.fmt(r.op_ms) if r.op_ms else notes.na(r.timing_na or "not timed"),
                         common.fmt(g), _pct(g, copy_bw.gbps)]
                if gpu:
                    cells += [str(r.launches) if r.launches is not None else "-", str(r.syncs) if r.syncs is not None else "-"]
                cells.append(f"{base.op_ms / r.op_ms:,.1f}x" if base and r.op_ms else "-")
            rows.append([f"`{OP_SHORT[op]}`", IMPL_TITLES[impl]] + cells)
    shape = "x".join(map(str, size.shape))
    return (f"**Op level at {size.name} (x `{shape}`)**: the public call as a training or sampling loop makes it.\n\n"
            + common.md_table(header, rows))


def summary_table(results: List[Result], copy_bw: common.CopyBandwidth) -> str:
    """Each public op of a loop (the loss as forward + backward) at every size, for each of our timed
    backends: time, % of copy bandwidth, and the speed-up against the eager official-style code and
    against torch.compile of the same math (>= 1.0x: at least as fast)."""
    rows = []
    for op in PUBLIC_OPS:
        for size in sorted({r.size for r in results if r.op == op}, key=lambda z: z.numel):
            cell = {r.impl: r for r in results if r.op == op and r.size == size and r.op_ms and not r.na}
            for impl in OUR_BACKENDS:
                r = cell.get(impl)
                if r is None:
                    continue
                vs = [f"{cell[b].op_ms / r.op_ms:,.2f}x" if b in cell else "-" for b in ("official", "compile")]
                rows.append([f"`{OP_SHORT[op]}`", size.name, IMPL_TITLES[impl], common.fmt(r.op_ms),
                             _pct(r.gbps("op"), copy_bw.gbps)] + vs)
    if not rows:
        return ""
    return ("**Public ops against the eager code and torch.compile** (the public call with default settings; "
            "speed-up = their time / ours):\n\n"
            + common.md_table(["op", "size", "implementation", "ms / call", "% copy", "vs eager official",
                               "vs torch.compile"], rows, align="lllrrrr"))


def breakdown(results: List[Result]) -> str:
    """What each of our backends dispatches per public call (names, first counted size)."""
    rows = []
    for op in COUNTED_OPS:
        for impl in OUR_BACKENDS:
            r = _counted(results, op, impl, headline_size(results))
            if r is not None and r.op_names:
                rows.append([f"`{OP_SHORT[op]}`", IMPL_TITLES[impl], str(r.ops), common.short_op_names(r.op_names)])
    if not rows:
        return ""
    return ("Ops dispatched per public call (non-view, in order of first appearance):\n\n"
            + common.md_table(["op", "backend", "ops", "dispatched"], rows, align="llrl"))


def compile_costs(results: List[Result]) -> str:
    """One line: how long each compiled reference took to compile (first call), and its kernel count."""
    parts = [f"{OP_SHORT[r.op]} {r.compile_s:.1f} s ({r.kernel_ops} kernels)"
             for r in results if r.impl == "compile" and r.compile_s]
    if not parts:
        return ""
    return ("torch.compile cost (first call, one dynamic-shape graph per op, this machine): " + "; ".join(parts)
            + ". Our fused kernels need no compile step.")


def detail_tables(results: List[Result], copy_bw: common.CopyBandwidth, device: torch.device,
                  notes: common.Footnotes) -> List[str]:
    """One table per op: every size x implementation, op and kernel level."""
    gpu = device.type == "cuda"
    n_bytes = notes.ref(
        "GB/s = minimum bytes the op must move / median time. Byte model (fp32, N = elements of x): perturb 12N "
        "(read x0, write x and v); loss forward 8N (read out and v); loss backward 12N (read out and v, write the "
        "gradient); loss forward + backward 20N (the two added); SSCS and EM steps 20N (read u = (x, v) and y, write u). Noise drawn outside the kernel (the "
        "official code, the torch backend's torch.randn eps and the eps_v its loss reads back) is extra traffic "
        "that is not credited.")
    n_levels = notes.ref(
        "op = the public call (cf.perturb / cf.hsm_loss / torch.autograd.grad of it / both / cf.sscs_step_ / "
        "cf.em_step_, default settings: value checks on). kernel = cld_fast.backends.get(name).op(opname) called with the cld_fast.opdefs schema "
        "arguments made beforehand (for compile: the compiled opdefs reference; one torch.compile per op, dynamic "
        "shapes). The official-style code has no separate kernel." + (
            " On the GPU, op times start from an idle GPU (synchronised after the cache flush), so host-side work "
            "counts; kernel times are GPU time." if gpu else ""))
    tables = []
    for op in OPS:
        rows = [r for r in results if r.op == op]
        if not rows:
            continue
        header = ["size", "implementation", "op ms", f"op GB/s {n_bytes}", "op % copy", f"kernel ms {n_levels}",
                  "kernel GB/s", "kernel % copy", "ops op / kernel"]
        if gpu:
            header += ["launches op / kernel", "syncs"]
        header.append("speed-up vs official (op)")
        table_rows = []
        for size in _sizes_of(rows):
            base = next((r for r in rows if r.size == size and r.impl == "official" and r.op_ms), None)
            for r in (r for r in rows if r.size == size):
                table_rows.append(_size_label(size) + [IMPL_TITLES[r.impl]] + _detail_cells(r, base, copy_bw, gpu, notes,
                                                                                            len(header)))
        tables.append(f"#### {OP_TITLES[op]}\n\n" + common.md_table(header, table_rows))
    return tables


def _size_label(size: Size) -> List[str]:
    shape = "x".join(map(str, size.shape))
    return [size.name if size.name == shape else f"{size.name} `{shape}`"]


def _detail_cells(r: Result, base: Optional[Result], copy_bw, gpu: bool, notes, width: int) -> List[str]:
    if r.na:
        return [notes.na(r.na)] + ["-"] * (width - 3)
    og, kg = r.gbps("op"), r.gbps("kernel")
    op_ms = common.fmt(r.op_ms) if r.op_ms is not None else notes.na(r.timing_na or "not timed")
    cells = [op_ms, common.fmt(og), _pct(og, copy_bw.gbps),
             common.fmt(r.kernel_ms) if r.kernel_ms is not None else "-",
             common.fmt(kg) if kg is not None else "-", _pct(kg, copy_bw.gbps), _pair(r.ops, r.kernel_ops)]
    if gpu:
        cells += [_pair(r.launches, r.kernel_launches), str(r.syncs) if r.syncs is not None else "-"]
    cells.append(f"{base.op_ms / r.op_ms:,.1f}x" if base and r.op_ms else "-")
    return cells


def render(results: List[Result], copy_bw: common.CopyBandwidth, device: torch.device,
           notes: common.Footnotes, plot_files: Dict[str, str]) -> str:
    methods = ", ".join(f"{k} {v:,.1f} GB/s" for k, v in copy_bw.methods.items())
    cache = ("" if device.type == "cuda" else
             " " + notes.ref("CPU caches are not flushed between calls, so sizes that fit in the caches can exceed the "
                             "copy bandwidth, which is measured on large buffers."))
    n_noise = notes.ref(
        "Noise as the library draws it. perturb: cf.perturb hands the torch backend torch.randn eps (its loss reads "
        "the stored eps_v) and every other backend a Philox seed (noise drawn in-kernel; the loss regenerates eps_v "
        "from it). SSCS/EM steps: a Philox seed for every backend, as cf.sample passes it. compile: the opdefs "
        "references in seed mode (coefficients from t and the CLD parameters, Philox in torch ops), i.e. the fused "
        "kernels' algorithm. official: torch.randn_like. SSCS/EM: step 25 of a 50-step linear grid, mixed score "
        "folded in; the official step recomputes the same coefficients from its time grid.")
    parts = [
        f"Measured copy bandwidth (bytes read + written, {common.human_bytes(copy_bw.nbytes)} buffers): "
        f"**{copy_bw.gbps:,.1f} GB/s** ({methods}). The \"% copy\" columns divide by this.{cache}",
        summary_table(results, copy_bw),
        count_table(results, notes),
        op_level_table(results, copy_bw, device, notes),
        breakdown(results),
        compile_costs(results),
    ]
    parts += detail_tables(results, copy_bw, device, notes)
    parts.append(f"Noise and step conventions: {n_noise}")
    parts.append(eps_v_savings(sorted({r.size for r in results}, key=lambda s: s.numel)))
    for key, title in (("gbps", "Effective GB/s per op call"), ("copyfrac", "Fraction of the measured copy bandwidth")):
        if key in plot_files:
            parts.append(f"![{title}]({plot_files[key]})")
    return "\n\n".join(p for p in parts if p)


def eps_v_savings(sizes: List[Size]) -> str:
    """What regenerating eps_v from the Philox seed saves versus storing it (one (B, D) fp32 tensor)."""
    rows = []
    for s in sizes:
        n = s.numel
        rows.append([s.name, f"{n:,}", common.human_bytes(4 * n), common.human_bytes(12 * n),
                     f"{100 * 12 / 32:.1f}%", common.human_bytes(8 * n)])
    return ("#### Regenerating eps_v instead of storing it\n\nThe fused loss recomputes eps_v from the "
            "perturb call's Philox seed. Storing it would keep one (B, D) fp32 tensor alive from perturb to "
            "backward and move it three times (written by perturb, read by the loss forward and backward), "
            "i.e. 12N extra bytes on top of the 32N minimum of perturb + loss; the official code keeps the "
            "whole (B, 2C, ...) noise draw (8N bytes).\n\n"
            + common.md_table(["size", "N", "memory saved", "traffic saved / step",
                               "share of perturb + loss minimum", "official noise tensor"], rows))
