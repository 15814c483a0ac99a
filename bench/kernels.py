"""Kernel table: perturb, HSM loss forward+backward, fused SSCS step and EM step, per implementation.

Implementations (columns that cannot run here show "n/a" with the reason in a footnote):

    official  eager PyTorch with the official CLD-SGM structure (``bench/official_style.py``)
    compile   ``torch.compile`` of our fused math in plain torch (``cld_fast.backends.torch_backend``)
    triton    our Triton kernels (CUDA only: on a CPU Triton runs only in its interpreter)
    cuda      our CUDA C++ kernels
    cpu       our C++/OpenMP kernels
    torch     our plain-PyTorch reference backend

Every implementation is timed twice where that makes sense:

* **op**: the whole call a training or sampling loop makes (``cf.perturb(x0, t, sde)``,
  ``cf.hsm_loss(...)`` + backward, ``cf.sscs_step_``, ``cf.em_step_``), including the per-call
  coefficient math and dispatch. The official-style baseline is only timed this way: its
  coefficient math is interleaved with the data passes.
* **kernel**: the data pass alone, coefficients precomputed (the backend function the op calls;
  for ``compile``, the compiled function).

Byte model (fp32, N = elements of x, minimum traffic each op must move; coefficient tables are
negligible): perturb reads x0, writes x and v: 12N bytes. Loss forward reads out and v, backward
reads out and v and writes the gradient: 20N. SSCS and EM steps read u = (x, v) and y, write u: 20N.
Noise drawn in-kernel (Philox) moves no bytes; implementations that draw it separately (the
official code, the torch and cpu backends, which get ``eps`` from ``torch.randn``) move more and
are charged only the minimum, so their GB/s is an *effective* rate.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import cld_fast as cf
from cld_fast import backends as cf_backends
from cld_fast import philox
from cld_fast.backends import torch_backend as tb

from . import common
from . import official_style as off

OPS = ("perturb", "loss", "sscs", "em")
OP_TITLES = {
    "perturb": "perturb (u = mean + L eps)",
    "loss": "HSM loss forward + backward",
    "sscs": "fused SSCS step (score step + 2 half steps)",
    "em": "Euler-Maruyama step",
}
BYTES_PER_ELEMENT = {"perturb": 12, "loss": 20, "sscs": 20, "em": 20}
IMPLS = ("official", "compile", "triton", "cuda", "cpu", "torch")
IMPL_TITLES = {
    "official": "eager, official-style",
    "compile": "torch.compile (our math)",
    "triton": "cld_fast triton",
    "cuda": "cld_fast cuda",
    "cpu": "cld_fast cpu (C++)",
    "torch": "cld_fast torch (reference)",
}
OUR_BACKENDS = ("triton", "cuda", "cpu", "torch")
PERTURB_SEED_BACKENDS = ("triton", "cuda")  # cf.perturb gives these a Philox seed, the others torch.randn noise
SAMPLER_STEPS = 50                          # grid of the SSCS / EM tables; the timed row is mid-grid


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
    launches: Optional[int] = None          # per op call
    kernel_launches: Optional[int] = None   # per kernel-only call
    syncs: Optional[int] = None
    na: Optional[str] = None            # why this implementation could not run
    notes: List[str] = field(default_factory=list)

    def bytes(self) -> int:
        return BYTES_PER_ELEMENT[self.op] * self.size.numel

    def gbps(self, which: str = "op") -> Optional[float]:
        ms = self.op_ms if which == "op" else self.kernel_ms
        return None if ms is None else self.bytes() / (ms * 1e-3) / 1e9


# ---- availability ------------------------------------------------------------------------------


def impl_unavailable(impl: str, device: torch.device) -> Optional[str]:
    """Why ``impl`` can't run on ``device`` (None when it can)."""
    if impl == "official":
        return None
    if impl == "compile":
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        if common.env_flag("BENCH_NO_COMPILE"):
            return "torch.compile switched off (BENCH_NO_COMPILE=1 or --no-compile)"
        return None
    if impl == "triton" and device.type != "cuda":
        return ("Triton is benchmarked on CUDA only: on a CPU it runs only under TRITON_INTERPRET=1, "
                "an interpreter far too slow to time")
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


# ---- compiled plain-torch versions of our fused math -------------------------------------------


# Seed mode throughout: the same math as the fused triton/cuda kernels, noise contract included (Philox
# from (seed, step, tag), Box-Muller, eps_v regenerated by the loss instead of stored).


def _perturb_plain(x2, coef, u3, seed):
    return tb.perturb(x2, coef, u3, seed=seed)


def _loss_plain(out2, u3, coef, seed, grad):
    return tb.hsm_loss_fwd(out2, u3, coef, None, seed).mean(), tb.hsm_loss_bwd(grad, out2, u3, coef, None, seed)


def _sscs_plain(u3, y2, table, step, seed):
    return tb.sscs_step_(u3, y2, table, step, seed=seed)


def _em_plain(u3, y2, table, step, seed):
    return tb.affine_step(u3, y2, table, step, u3, seed=seed)


_COMPILED: Dict[str, Callable] = {}


def compiled(op: str, device: torch.device) -> Callable:
    """One compiled function per op of the torch backend's seed-mode math."""
    key = f"{op}:{device.type}"
    if key not in _COMPILED:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):   # one graph per size and op
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        fn = {"perturb": _perturb_plain, "loss": _loss_plain, "sscs": _sscs_plain, "em": _em_plain}[op]
        # One dynamic-shape compile per op (the seed-mode graphs are large: compiling one per size would
        # cost minutes of the full GPU run's 10-minute budget)
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


# ---- one (op, size) case: inputs and the callables per implementation ----------------------------


class Case:
    """Inputs for one op at one size, and ``(op_fn, kernel_fn)`` for each implementation."""

    def __init__(self, op: str, size: Size, device: torch.device, seed: int = 0):
        self.op, self.size, self.device = op, size, device
        g = torch.Generator(device=device).manual_seed(seed)
        shape = size.shape
        self.B, self.D = shape[0], math.prod(shape[1:])
        self.sde = cf.CLD()
        self.osde = off.OfficialCLD()
        self.x0 = torch.randn(shape, generator=g, device=device)
        self.t32 = torch.rand(self.B, generator=g, device=device) * (1 - 1e-5) + 1e-5
        self.t64 = self.t32.double()
        self.seed = torch.tensor([1234], dtype=torch.int64, device=device)
        if op in ("sscs", "em"):
            self.u0 = self.sde.prior_sampling(shape, generator=g, device=device)
            self.y = torch.randn(shape, generator=g, device=device)
            self.sampler = off.SSCSSampler(self.osde, SAMPLER_STEPS + 1, eps=1e-3, denoising=True)
            ts = self.sampler.forward_times().to(device)
            self.k = SAMPLER_STEPS // 2
            if op == "sscs":
                self.table = self.sde.sscs_table(ts, mixed=True).float()
                self.step = torch.tensor([self.k], dtype=torch.int64, device=device)   # row k: score step at ts[k-1]
            else:
                h = ts[:-1] - ts[1:]
                mix = self.sde.mixed_score_coefficients(ts[:-1])
                self.table = self.sde.reverse_affine_coefficients(ts[:-1], h, "em", mixed=mix).float()
                self.step = torch.tensor([self.k], dtype=torch.int64, device=device)
        if op == "loss":
            self.out = torch.randn(shape, generator=g, device=device).requires_grad_(True)

    # -- official-style ---------------------------------------------------------------------------
    def official(self) -> Callable:
        osde, x0, t64 = self.osde, self.x0, self.t64
        if self.op == "perturb":
            return lambda: off.perturb(osde, x0, t64)
        if self.op == "loss":
            u, eps_v = off.perturb(osde, x0, t64)
            out = self.out
            model = lambda uu, tt: out  # noqa: E731 - the network output stands in for the network

            def run():
                loss = torch.mean(off.loss_from_model(osde, model, u, t64, eps_v))
                return torch.autograd.grad(loss, out)

            return run
        y, sampler, u0 = self.y, self.sampler, self.u0
        model = lambda uu, tt: y  # noqa: E731
        t = sampler.t
        i = self.k - 1 if self.op == "sscs" else self.k
        if self.op == "sscs":
            def run():
                # after the network: Euler score step of step i, its closing half step, the opening
                # half step of step i + 1 (what one fused launch does per NFE)
                dt = t[i + 1] - t[i]
                u = sampler.euler_score_dynamics(model, u0, t[i], dt)
                u = sampler.analytical_dynamics(u, t[i], dt, True)
                return sampler.analytical_dynamics(u, t[i + 1], t[i + 2] - t[i + 1], True)

            return run
        step_fn = osde.get_discrete_step_fn(off.get_score_fn(osde, model))
        return lambda: step_fn(u0, t[i], t[i + 1] - t[i])

    # -- our backends -------------------------------------------------------------------------------
    def ours(self, name: str) -> Tuple[Callable, Callable]:
        mod = cf_backends.get(name)
        sde, B, D, dev = self.sde, self.B, self.D, self.device
        if self.op == "perturb":
            use_seed = name in PERTURB_SEED_BACKENDS   # as cf.perturb decides
            x0, t32 = self.x0, self.t32
            coef = sde.perturbation_kernel(t32, "hsm").table().float()
            x2 = x0.reshape(B, -1)
            u3 = torch.empty((B, 2, D), device=dev)
            seed = self.seed
            if use_seed:
                kernel = lambda: mod.perturb(x2, coef, u3, seed=seed)  # noqa: E731
            else:
                kernel = lambda: mod.perturb(x2, coef, u3, eps=torch.randn((B, 2, D), device=dev))  # noqa: E731
            return (lambda: cf.perturb(x0, t32, sde, backend=name)), kernel
        if self.op == "loss":
            u, noise = cf.perturb(self.x0, self.t32, sde, backend=name)
            out, t32 = self.out, self.t32
            coef = sde.loss_coefficients(t32).float()
            u3, out2 = u.view(B, 2, D), out.detach().reshape(B, D)
            eps_v = None if noise.eps is None else noise.eps[:, 1].contiguous()
            grad = torch.full((B,), 1.0 / B, device=dev)

            def op():
                return torch.autograd.grad(cf.hsm_loss(out, u, t32, sde, noise, backend=name), out)

            def kernel():
                return (mod.hsm_loss_fwd(out2, u3, coef, eps_v, noise.seed).mean(),
                        mod.hsm_loss_bwd(grad, out2, u3, coef, eps_v, noise.seed))

            return op, kernel
        # SSCS / EM steps: a Philox seed for every backend, as cf.sample passes it
        u = self.u0.clone()
        u3, y, y2, table, step, seed = u.view(B, 2, D), self.y, self.y.reshape(B, D), self.table, self.step, self.seed
        if self.op == "sscs":
            return ((lambda: cf.sscs_step_(u, y, table, step, seed=seed, backend=name)),
                    (lambda: mod.sscs_step_(u3, y2, table, step, seed=seed)))
        return ((lambda: cf.em_step_(u, y, table, step, seed=seed, backend=name)),
                (lambda: mod.affine_step(u3, y2, table, step, u3, seed=seed)))

    # -- torch.compile of the torch backend's math ----------------------------------------------------
    def compiled(self) -> Tuple[Callable, Callable]:
        fn = compiled(self.op, self.device)
        sde, B, D, dev, seed = self.sde, self.B, self.D, self.device, self.seed
        if self.op in ("perturb", "loss"):
            x2, t32 = self.x0.reshape(B, -1), self.t32
            coef = sde.perturbation_kernel(t32, "hsm").table().float()
            u3 = torch.empty((B, 2, D), device=dev)
            if self.op == "perturb":
                def op():
                    c = sde.perturbation_kernel(t32, "hsm").table().float()
                    return fn(x2, c, torch.empty((B, 2, D), device=dev), philox.seed_from_generator(None, dev))

                return op, (lambda: fn(x2, coef, u3, seed))
            tb.perturb(x2, coef, u3, seed=seed)      # a state whose eps_v the loss regenerates
            out2 = self.out.detach().reshape(B, D)
            lcoef = sde.loss_coefficients(t32).float()
            grad = torch.full((B,), 1.0 / B, device=dev)

            def op():
                return fn(out2, u3, sde.loss_coefficients(t32).float(), seed, grad)

            return op, (lambda: fn(out2, u3, lcoef, seed, grad))
        u3 = self.u0.clone().view(B, 2, D)
        y2, table, step = self.y.reshape(B, D), self.table, self.step
        run = lambda: fn(u3, y2, table, step, seed)  # noqa: E731 - no per-call coefficient math for steps
        return run, run


# ---- running the table ------------------------------------------------------------------------------


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(device: torch.device, sizes: List[Size], impls=IMPLS, ops=OPS, target_s: float = 0.2,
        log=print) -> List[Result]:
    """Time every (op, size, implementation); failures become ``Result.na``, never exceptions."""
    results: List[Result] = []
    unavailable = {impl: impl_unavailable(impl, device) for impl in impls}
    with cf.value_checks(False):   # as the built-in trainer and samplers run the ops
        for op in ops:
            for size in sizes:
                try:
                    case = Case(op, size, device)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest size
                    for impl in impls:
                        results.append(Result(op, size, impl, na=f"inputs could not be built: {common.short_error(exc)}"))
                    continue
                for impl in impls:
                    res = Result(op, size, impl)
                    results.append(res)
                    if unavailable[impl]:
                        res.na = unavailable[impl]
                        continue
                    try:
                        if impl == "official":
                            op_fn, kernel_fn = case.official(), None
                        elif impl == "compile":
                            op_fn, kernel_fn = case.compiled()
                        else:
                            op_fn, kernel_fn = case.ours(impl)
                        res.op_ms = common.measure(op_fn, device, target_s=target_s, include_host=True).median_ms
                        if kernel_fn is not None:
                            res.kernel_ms = common.measure(kernel_fn, device, target_s=target_s).median_ms
                        lc = common.count_launches(op_fn, device)
                        res.launches, res.syncs = lc.launches, lc.syncs
                        if kernel_fn is not None:
                            res.kernel_launches = common.count_launches(kernel_fn, device).launches
                        log(f"  {op:8s} {size.name:18s} {impl:9s} op {res.op_ms:9.4f} ms"
                            + (f"  kernel {res.kernel_ms:9.4f} ms" if res.kernel_ms is not None else "")
                            + f"  launches {res.launches}/{res.kernel_launches}")
                    except Exception as exc:  # noqa: BLE001 - a column that can't run shows n/a
                        what = "torch.compile failed" if impl == "compile" else f"{impl} failed"
                        res.na = f"{what}: {common.short_error(exc)}"
                        res.op_ms = res.kernel_ms = None
                        log(f"  {op:8s} {size.name:18s} {impl:9s} n/a ({res.na})")
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                del case
                _free(device)
    return results


# ---- Markdown ------------------------------------------------------------------------------------


def render(results: List[Result], copy_bw: common.CopyBandwidth, device: torch.device,
           notes: common.Footnotes, plot_files: Dict[str, str]) -> str:
    lines = []
    methods = ", ".join(f"{k} {v:,.1f} GB/s" for k, v in copy_bw.methods.items())
    cache = ("" if device.type == "cuda" else
             " " + notes.ref("CPU caches are not flushed between calls, so sizes that fit in the caches can exceed the "
                             "copy bandwidth, which is measured on large buffers."))
    lines.append(f"Measured copy bandwidth (bytes read + written, {common.human_bytes(copy_bw.nbytes)} buffers): "
                 f"**{copy_bw.gbps:,.1f} GB/s** ({methods}). The \"% copy\" columns divide by this.{cache}")
    lines.append("")
    lines.append(summary(results, copy_bw, device))
    lines.append("")
    launch_what = ("CUDA kernel + memcpy/memset launches per call and host synchronisations per call "
                   "(torch.profiler)" if device.type == "cuda" else
                   "top-level operators dispatched per call (aten::* and cld_fast::* not nested in "
                   "another op; torch.profiler). Kernels generated by torch.compile are not dispatcher "
                   "ops, so its count shows only the ops around them. There are no host syncs on a CPU")
    n_launch = notes.ref(launch_what)
    n_bytes = notes.ref(
        "GB/s = minimum bytes the op must move / median time. Byte model (fp32, N = elements of x): "
        "perturb 12N (read x0, write x and v); loss forward + backward 20N (forward reads out and v, "
        "backward reads out and v and writes the gradient); SSCS step 20N and EM step 20N (read u = (x, v) "
        "and y, write u). Coefficients are negligible. Noise drawn outside the kernel (the official code; "
        "torch.randn noise handed to the cpu and torch backends by cld_fast.perturb, and the eps_v their loss reads "
        "back) is extra traffic that is not credited.")
    n_op = notes.ref(
        "op = the whole call a training/sampling loop makes (ours: cld_fast.perturb / hsm_loss + "
        "torch.autograd.grad / sscs_step_ / em_step_ with value checks off, as the built-in trainer and "
        "samplers run them; compile: our per-call coefficient math, then the compiled function). "
        "kernel = the data pass alone with coefficients precomputed (the backend function; for compile, "
        "the compiled function: one torch.compile per op, dynamic shapes). The official-style code interleaves "
        "coefficient math with data passes, so it has only an op time."
        + (" On the GPU, op times start from an idle GPU (synchronised after the cache flush), so host-side "
           "launch and coefficient work counts; kernel times are GPU time (the launch is enqueued while the "
           "flush runs)." if device.type == "cuda" else ""))
    n_noise = notes.ref(
        "Noise as the library draws it. perturb: cld_fast.perturb gives triton and cuda a Philox seed (noise drawn "
        "in-kernel; the HSM loss regenerates eps_v from it) and the cpu and torch backends torch.randn noise (their "
        "loss reads the stored eps_v). SSCS/EM steps: a Philox seed for every backend, as cf.sample passes it (cpu "
        "draws in-kernel, torch evaluates the Philox contract with plain tensor ops). compile: the torch backend's "
        "seed-mode math for every op, i.e. exactly the fused kernels' algorithm. official: torch.randn_like. SSCS/EM "
        "rows use the mixed-score tables of a 50-step linear grid (row 25); the official step recomputes the same "
        "coefficients from its time grid.")
    for op in OPS:
        rows = [r for r in results if r.op == op]
        if not rows:
            continue
        lines.append(f"#### {OP_TITLES[op]}")
        lines.append("")
        header = ["size", "implementation", "op ms", f"op GB/s {n_bytes}", "op % copy", "kernel ms",
                  "kernel GB/s", "kernel % copy", f"{'launches' if device.type == 'cuda' else 'ops'} op / kernel {n_launch}"]
        if device.type == "cuda":
            header.append("syncs")
        header.append("speed-up vs official (op)")
        table_rows = []
        sizes = []
        for r in rows:
            if r.size not in sizes:
                sizes.append(r.size)
        for size in sizes:
            base = next((r for r in rows if r.size == size and r.impl == "official" and r.op_ms), None)
            for r in (r for r in rows if r.size == size):
                name = IMPL_TITLES[r.impl]
                if r.na:
                    cells = [notes.na(r.na)] + ["-"] * (len(header) - 3)
                else:
                    og, kg = r.gbps("op"), r.gbps("kernel")
                    cells = [common.fmt(r.op_ms), common.fmt(og), _pct(og, copy_bw.gbps),
                             common.fmt(r.kernel_ms) if r.kernel_ms is not None else "-",
                             common.fmt(kg) if kg is not None else "-", _pct(kg, copy_bw.gbps),
                             _pair(r.launches, r.kernel_launches)]
                    if device.type == "cuda":
                        cells.append(str(r.syncs) if r.syncs is not None else "-")
                    cells.append(f"{base.op_ms / r.op_ms:,.1f}x" if base and r.op_ms else "-")
                shape = "x".join(map(str, size.shape))
                label = size.name if size.name == shape else f"{size.name} `{shape}`"
                table_rows.append([label, name] + cells)
        lines.append(common.md_table(header, table_rows))
        lines.append("")
    lines.append(f"Timing and noise conventions: {n_op} {n_noise}")
    lines.append("")
    lines.append(eps_v_savings(sorted({r.size for r in results}, key=lambda s: s.numel)))
    for key, title in (("gbps", "Effective GB/s per op call"), ("copyfrac", "Fraction of the measured copy bandwidth")):
        if key in plot_files:
            lines.append("")
            lines.append(f"![{title}]({plot_files[key]})")
    return "\n".join(lines)


def summary(results: List[Result], copy_bw: common.CopyBandwidth, device: torch.device) -> str:
    """At the largest size: kernel % of copy bandwidth and launches per op, per implementation (shown, not asserted)."""
    ok = [r for r in results if not r.na and r.op_ms]
    if not ok:
        return ""
    big = max((r.size for r in ok), key=lambda s: s.numel)
    unit = "launches" if device.type == "cuda" else "ops"
    rows = []
    for impl in IMPLS:
        mine = {r.op: r for r in ok if r.impl == impl and r.size == big}
        if not mine:
            continue
        cells = []
        for op in OPS:
            r = mine.get(op)
            if r is None:
                cells.append("-")
                continue
            g = r.gbps("kernel") if r.kernel_ms is not None else r.gbps("op")
            n = r.kernel_launches if r.kernel_launches is not None else r.launches
            cells.append(f"{_pct(g, copy_bw.gbps)}, {n} {unit}")
        p, l = mine.get("perturb"), mine.get("loss")
        both = "-"
        if p and l and p.launches is not None and l.launches is not None:
            kp = p.kernel_launches if p.kernel_launches is not None else p.launches
            kl = l.kernel_launches if l.kernel_launches is not None else l.launches
            both = f"{p.launches + l.launches} / {kp + kl}"
        rows.append([IMPL_TITLES[impl]] + cells + [both])
    shape = "x".join(map(str, big.shape))
    return (f"Summary at the largest size ({big.name}, x `{shape}`): kernel bandwidth as % of copy bandwidth and {unit} "
            "per kernel call (official-style: the whole call). Targets of the spec, for reference only: >= 85% of "
            "copy bandwidth at large sizes on a GPU, one launch per op, perturb + loss forward and backward in at most "
            "4 launches.\n\n" + common.md_table(["implementation"] + [OP_TITLES[o].split(" (")[0] for o in OPS]
                                                 + [f"perturb + loss {unit} (op / kernel)"], rows, align="lrrrrr"))


def _pair(a: Optional[int], b: Optional[int]) -> str:
    return f"{'-' if a is None else a} / {'-' if b is None else b}"


def _pct(gbps: Optional[float], ref: float) -> str:
    if gbps is None or not ref:
        return "-"
    return f"{100 * gbps / ref:.1f}%"


def eps_v_savings(sizes: List[Size]) -> str:
    """What regenerating eps_v from the Philox seed saves versus storing it (one (B, D) fp32 tensor)."""
    rows = []
    for s in sizes:
        n = s.numel
        rows.append([s.name, f"{n:,}", common.human_bytes(4 * n), common.human_bytes(12 * n),
                     f"{100 * 12 / 32:.1f}%", common.human_bytes(8 * n)])
    return ("**Regenerating eps_v instead of storing it.** The fused loss recomputes eps_v from the "
            "perturb call's Philox seed. Storing it would keep one (B, D) fp32 tensor alive from perturb to "
            "backward and move it three times (written by perturb, read by the loss forward and backward), "
            "i.e. 12N extra bytes on top of the 32N minimum of perturb + loss; the official code keeps the "
            "whole (B, 2C, ...) noise draw (8N bytes).\n\n"
            + common.md_table(["size", "N", "memory saved", "traffic saved / step",
                               "share of perturb + loss minimum", "official noise tensor"], rows))
