"""Sampler table: SSCS throughput (images/s, ms per NFE) and same-noise agreement with the official loop.

Variants, per network:

    (a) official   eager fp32 SSCS loop written like the official sampler (``official_style.SSCSSampler``)
    (b) cf.sample  fp32, ``cf.score_fn(net, sde)`` (one fused kernel per NFE)
    (c) + bf16     bf16 autocast (``cf.score_fn(..., autocast_dtype=torch.bfloat16)`` on CUDA) and a
                   channels_last network (4-D images only)
    (d) + graph    (c) plus ``cuda_graph=True`` on CUDA; on a CPU, (c) plus ``torch.compile`` of the network

Same noise. ``cf.sample`` draws the prior from its generator, then one Philox seed from the same
generator, and its fused kernels draw every half step's noise from (seed, step counter, op tag) by
the contract of ``cld_fast.philox``. The check re-creates that generator, draws the same prior and
seed, and feeds the official loop the very same normals, computed by the plain-torch reference
``cld_fast.philox.philox_normals`` (opening half step of step 0: tag HALF_STEP, step 0; the fused
call at counter k: (z0, z1) close step k, (z2, z3) open step k + 1). The official loop's
``sscs_num_stab`` is set to 0 for the check (our half-step covariances have no such term). Like is
compared with like: every ``cf.sample`` call uses the official loop's grid (``striding="linear"``)
and half-step spans (``sscs_official_half_steps=True``). Then every variant's samples x are
compared with the official loop's on that noise.

The official loop is timed separately with its own ``torch.randn_like`` noise (so its time is the
official structure's, not our noise replay's). Each timed run is one whole ``sample`` call after a
short warm-up call (CUDA graph capture, cuDNN autotuning and torch.compile happen in the warm-up or,
for the per-call graph capture, inside the timed call).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn as nn

import cld_fast as cf
from cld_fast import philox

from . import common
from . import official_style as off

SAMPLE_SEED = 20240607
TOL_FP32 = 1e-4    # relative L2 error of x vs the official loop on the same noise (fp32 variants)
TOL_BF16 = 5e-2    # the same for bf16 autocast variants
OFFICIAL_STRIDING = "linear"  # official_style.SSCSSampler's default grid


@dataclass
class Row:
    model: str
    batch: int
    variant: str
    steps: int
    nfe: Optional[int] = None
    seconds: Optional[float] = None
    rel_err: Optional[float] = None
    max_abs: Optional[float] = None
    tol: Optional[float] = None
    na: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def images_per_s(self):
        return None if not self.seconds else self.batch / self.seconds

    @property
    def ms_per_nfe(self):
        return None if not self.seconds or not self.nfe else 1e3 * self.seconds / self.nfe


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple
    steps: int
    na: Optional[str] = None


def model_specs(device: torch.device, quick: bool) -> List[ModelSpec]:
    from cld_fast.models import build_model

    toy_batch = 65536 if device.type == "cuda" else (4096 if quick else 16384)
    toy_steps = 50 if device.type == "cuda" or not quick else 20
    specs = [ModelSpec("toy MLP (toy2d)", lambda: build_model("toy2d"), (toy_batch, 2), toy_steps)]
    cifar = ModelSpec("NCSN++ cifar10", lambda: _revive(build_model("cifar10")), (128, 3, 32, 32), 50)
    if device.type != "cuda":
        cifar.na = ("GPU only: the NCSN++ CIFAR-10 network (108M parameters) at batch 128 takes minutes per "
                    "sample on a CPU; the CPU run covers the toy MLP")
    specs.append(cifar)
    return specs


def _revive(net: nn.Module) -> nn.Module:
    """Re-draw the weights the official init sets to ~0 (init_scale=0 -> 1e-10) with PyTorch's default init.

    An untrained NCSN++ otherwise outputs ~1e-10 and the same-noise check would not exercise the
    network path (bf16 error would be invisible). Timing does not depend on the weights.
    """
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1 and float(p.abs().max()) < 1e-6:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return net


class _Prepared(nn.Module):
    """The network as variant (c)/(d) runs it: channels_last input for images, CPU autocast where asked."""

    def __init__(self, net: nn.Module, channels_last: bool, cpu_bf16: bool):
        super().__init__()
        self.net = net
        self.channels_last = channels_last
        self.cpu_bf16 = cpu_bf16

    def forward(self, u, t):
        if self.channels_last and u.dim() == 4:
            u = u.contiguous(memory_format=torch.channels_last)
        if self.cpu_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(u, t).float()
        return self.net(u, t)


# ---- the same-noise replay for the official loop ------------------------------------------------


class _PhiloxReplay:
    """noise_fn for ``SSCSSampler``: the normals cf.sample's fused kernels draw, in official layout."""

    def __init__(self, seed: torch.Tensor, x_shape, device):
        self.seed, self.x_shape, self.device = seed, tuple(x_shape), device
        self.n = math.prod(self.x_shape)
        self.calls = 0
        self._pending = None

    def _pair(self, a, b):
        return torch.cat((a.view(self.x_shape), b.view(self.x_shape)), dim=1)

    def __call__(self, u):
        # official call order: step i opens (call 2i) then closes (call 2i + 1)
        j = self.calls
        self.calls += 1
        if j == 0:
            z = philox.philox_normals(self.n, self.seed, 0, philox.TAG_HALF_STEP, device=self.device)
            return self._pair(z[0], z[1])
        k = (j - 1) // 2                      # the fused call at counter k holds these normals
        z = philox.philox_normals(self.n, self.seed, k, philox.TAG_SSCS, device=self.device)
        return self._pair(z[0], z[1]) if j % 2 == 1 else self._pair(z[2], z[3])


def _prior_and_seed(shape, device):
    """The prior state and Philox seed that ``cf.sample`` draws from a generator seeded SAMPLE_SEED."""
    from cld_fast.samplers.core import prior

    g = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
    u0 = prior(cf.CLD(), shape, g, device, torch.float32)
    seed = philox.seed_from_generator(g, device)
    return u0, seed


def _compare(x, ref):
    d = (x.double() - ref.double())
    rel = float(d.norm() / ref.double().norm().clamp_min(1e-30))
    return rel, float(d.abs().max())


# ---- running ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _true_fp32(device):
    """TF32 off for cuDNN and matmuls inside the block (fp32 rows mean fp32), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run(device: torch.device, quick: bool, notes: common.Footnotes, log=print) -> List[Row]:
    with _true_fp32(device):
        return _run(device, quick, notes, log)


def _run(device: torch.device, quick: bool, notes: common.Footnotes, log=print) -> List[Row]:
    rows: List[Row] = []
    sde = cf.CLD()
    osde = off.OfficialCLD()
    for spec in model_specs(device, quick):
        variants = ["(a) official-style eager fp32", "(b) cf.sample fp32", "(c) + bf16 autocast, channels_last",
                    "(d) + CUDA graph" if device.type == "cuda" else "(d) + torch.compile"]
        na = spec.na or common.budget_note(90.0 if len(spec.shape) == 4 else 15.0)
        if na:
            rows += [Row(spec.name, spec.shape[0], v, spec.steps, na=na) for v in variants]
            continue
        try:
            rows += _run_model(spec, variants, device, sde, osde, notes, log)
        except Exception as exc:  # noqa: BLE001
            why = f"{spec.name} failed: {common.short_error(exc)}"
            log("  " + why)
            rows += [Row(spec.name, spec.shape[0], v, spec.steps, na=why) for v in variants]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _run_model(spec: ModelSpec, variants, device, sde, osde, notes, log) -> List[Row]:
    torch.manual_seed(0)
    net = spec.build().to(device).eval()
    shape, steps, batch = spec.shape, spec.steps, spec.shape[0]
    is_image = len(shape) == 4
    rows = [Row(spec.name, batch, v, steps) for v in variants]

    # (a) timed with its own randn_like noise
    u0, seed = _prior_and_seed(shape, device)
    sampler = off.SSCSSampler(osde, steps, eps=1e-3, denoising=True, striding=OFFICIAL_STRIDING)
    with torch.no_grad():
        off.SSCSSampler(osde, min(3, steps), eps=1e-3, denoising=True)(net, u0.clone())   # warm-up
        res_a = {}
        rows[0].seconds = common.time_block(lambda: res_a.setdefault("x", sampler(net, u0.clone())), device)
    rows[0].nfe = res_a["x"][2]
    log(f"  sampler {spec.name}: (a) {rows[0].seconds:.3f} s, {rows[0].nfe} NFE")
    # (a) again on cf.sample's noise: the reference for every check
    replay = _PhiloxReplay(seed, shape, device)
    check = off.SSCSSampler(osde, steps, eps=1e-3, denoising=True, striding=OFFICIAL_STRIDING, num_stab=0.0,
                             noise_fn=replay)
    with torch.no_grad():
        x_ref = check(net, u0.clone())[0]
    del res_a

    def run_variant(row: Row, score, **kw):
        kw = dict(striding=OFFICIAL_STRIDING, sscs_official_half_steps=True, **kw)  # the official loop's grid
        warm = dict(kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cf.sample(score, shape, sde, steps=min(3, steps), generator=torch.Generator(device=device).manual_seed(1),
                      device=device, **warm)
            out = {}

            def call():
                out["r"] = cf.sample(score, shape, sde, steps=steps, generator=torch.Generator(device=device).manual_seed(SAMPLE_SEED),
                                     device=device, **kw)

            row.seconds = common.time_block(call, device)
        for w in caught:   # e.g. cf.sample falling back from cuda_graph=True to the eager loop
            if "cuda_graph" in str(w.message):
                row.notes.append(notes.ref(f"cf.sample warned: {w.message}"))
                break
        res = out["r"]
        row.nfe = res.nfe
        row.rel_err, row.max_abs = _compare(res.x, x_ref)
        log(f"  sampler {spec.name}: {row.variant} {row.seconds:.3f} s, {row.nfe} NFE, rel err {row.rel_err:.2e}")

    # (b) fp32
    rows[1].tol = TOL_FP32
    _guard(rows[1], lambda: run_variant(rows[1], cf.score_fn(net, sde)))
    # (c) bf16 autocast + channels_last
    if is_image:
        net_c = copy.deepcopy(net).to(memory_format=torch.channels_last)
    else:
        net_c = net
        rows[2].notes.append(notes.ref("channels_last applies to 4-D image tensors; the toy MLP rows use bf16 autocast alone"))
    on_cuda = device.type == "cuda"
    if not on_cuda:
        rows[2].notes.append(notes.ref(
            "cf.score_fn's autocast_dtype applies on CUDA only; on the CPU the bench wraps the network in "
            "torch.autocast('cpu', dtype=torch.bfloat16) itself"))
    prepared = _Prepared(net_c, channels_last=is_image, cpu_bf16=not on_cuda).eval()
    score_c = cf.score_fn(prepared, sde, autocast_dtype=torch.bfloat16 if on_cuda else None)
    rows[2].tol = TOL_BF16
    _guard(rows[2], lambda: run_variant(rows[2], score_c))
    # (d) + CUDA graph (GPU) or + torch.compile (CPU)
    rows[3].tol = TOL_BF16
    if on_cuda:
        _guard(rows[3], lambda: run_variant(rows[3], score_c, cuda_graph=True))
    elif common.env_flag("BENCH_NO_COMPILE"):
        rows[3].na = "torch.compile switched off (BENCH_NO_COMPILE=1 or --no-compile)"
    else:
        compiled = torch.compile(prepared)
        rows[3].notes.append(notes.ref("CUDA graphs need a GPU; on the CPU variant (d) is (c) with the network under torch.compile"))
        _guard(rows[3], lambda: run_variant(rows[3], cf.score_fn(compiled, sde)))
    return rows


def _guard(row: Row, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a variant that can't run shows n/a
        row.na = f"{row.variant} failed: {common.short_error(exc)}"
        row.seconds = None


# ---- Markdown ---------------------------------------------------------------------------------------


def render(rows: List[Row], notes: common.Footnotes) -> str:
    n_check = notes.ref(
        "Agreement with (a) on the same noise: relative L2 error ||x - x_a|| / ||x_a|| of the samples x "
        f"(tolerance {TOL_FP32:g} for fp32 variants, {TOL_BF16:g} for bf16 ones); the official loop is replayed "
        "with exactly the prior and Philox normals cf.sample draws (see bench/sampler.py). Untrained networks: "
        "the NCSN++ layers the official init sets to ~0 are re-drawn with PyTorch's default init so its output "
        "is not ~0.")
    n_time = notes.ref(
        "One timed call of the whole sampler (prior, tables, every NFE including the final denoising step) "
        "after a 3-step warm-up call; with cuda_graph=True the per-call warm-up step and capture are inside "
        "the timed call. images/s = batch / seconds. ms/NFE = seconds / NFE. On a GPU the section runs with "
        "TF32 off (cuDNN and matmul), so the fp32 rows are true fp32.")
    header = ["network", "batch", "variant", "NFE", f"seconds {n_time}", "images/s", "ms / NFE",
              "speed-up vs (a)", f"rel. error vs (a) {n_check}", "max abs error", "within tolerance"]
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        mrows = [r for r in rows if r.model == model]
        base = mrows[0].seconds if mrows and mrows[0].seconds else None
        for r in mrows:
            extra = " " + " ".join(r.notes) if r.notes else ""
            if r.na:
                out.append([r.model, f"{r.batch:,}", r.variant + extra, str(r.steps), notes.na(r.na)] + ["-"] * 6)
                continue
            ok = "-" if r.rel_err is None else ("yes" if r.rel_err <= (r.tol or 0) else "**no**")
            out.append([r.model, f"{r.batch:,}", r.variant + extra, str(r.nfe), common.fmt(r.seconds),
                        common.fmt(r.images_per_s), common.fmt(r.ms_per_nfe),
                        f"{base / r.seconds:,.1f}x" if base else "-",
                        "reference" if r.rel_err is None and r.variant.startswith("(a)") else
                        (f"{r.rel_err:.2e}" if r.rel_err is not None else "-"),
                        f"{r.max_abs:.2e}" if r.max_abs is not None else "-", ok if not r.variant.startswith("(a)") else "-"])
    return common.md_table(header, out, align="llllrrrrrrl")
