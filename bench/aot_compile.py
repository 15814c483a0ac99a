"""Compile every Triton kernel variant ahead of time for a GPU target, without a GPU.

Each op's real host launcher runs on meta tensors at representative shapes for every variant a call
can reach (dtypes, noise modes, enums); the launch is intercepted and specialised by Triton's own
binder (alignment, stride-1 and int specialisation as a real launch would do), then compiled for
``GPUTarget("cuda", ARCH, 32)`` with ptxas' ``-v`` report parsed for registers, spills and stack.

    python bench/aot_compile.py [--arch 90] [--quick] [--out table.md]

Exits 1 on a compile error or a spill in a float32 variant (float64-state spills are reported only).
--quick: the CIFAR-10 shape only (the GPU tile of every D >= 1024 is the same), else also D = 2 (toy).
Uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``) that exist
in Triton 3.6 through 3.9.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cld_aot_")  # every variant really compiles

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from cld_fast.triton_kernels import hsm_loss, mixed_score, perturb, sampler_steps  # noqa: E402

MODULES = (perturb, hsm_loss, mixed_score, sampler_steps)
SHAPES = {"cifar10-b128": (128, 3072), "toy-2d": (4096, 2)}
META = torch.device("meta")
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.S)


def _capture_launches(fn):
    """Run ``fn`` with every module's ``launch`` replaced by a recorder; the recorded launches."""
    calls = []
    saved = {m: m.launch for m in MODULES}
    for m in MODULES:
        m.launch = lambda kernel, grid, *a, **kw: calls.append((kernel, a, kw))
    try:
        fn()
    finally:
        for m, f in saved.items():
            m.launch = f
    return calls


def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def _op_calls(B: int, D: int):
    """(label, thunk) for every variant of every op at (B, D)."""
    sde, t, ts = _empty(5, dtype=torch.float64), _empty(B), _empty(11)
    step, seed = _empty(1, dtype=torch.int64), _empty(1, dtype=torch.int64)
    for sd in (torch.float32, torch.float64):
        s = str(sd).replace("torch.", "")
        u, x0 = _empty(B, 2, D, dtype=sd), _empty(B, D, dtype=sd)
        nets = (sd, torch.bfloat16)
        for noise_name, noise in (("none", None), ("eps", "eps"), ("seed", "seed")):
            for objective in (0, 1):
                for has_v0 in (False, True):
                    eps = _empty(B, 2, D, dtype=sd) if noise == "eps" else None
                    yield (f"perturb {s} obj={objective} v0={has_v0} {noise_name}",
                           lambda o=objective, v=has_v0, e=eps, n=noise: perturb.perturb(
                               x0, x0 if v else None, t, sde, o, e, seed if n == "seed" else None, u))
            eps2 = _empty(B, 2, D, dtype=sd) if noise == "eps" else None
            eps4 = _empty(B, 4, D, dtype=sd) if noise == "eps" else None
            eps1 = _empty(B, D, dtype=sd) if noise == "eps" else None
            sd_ = seed if noise == "seed" else None
            yield (f"half_step {s} {noise_name}",
                   lambda e=eps2, q=sd_: sampler_steps.half_step_(u, ts, step, sde, e, q))
            for y_dtype in nets:
                y = _empty(B, D, dtype=y_dtype)
                yn = str(y_dtype).replace("torch.", "")
                for mixed in (False, True):
                    yield (f"sscs {s} y={yn} mixed={mixed} {noise_name}",
                           lambda y=y, m=mixed, e=eps4, q=sd_: sampler_steps.sscs_step_(u, y, ts, step, sde, m, e, q))
                    for kind in ((0, 1, 2) if noise == "none" else (0,)):
                        yield (f"affine {s} y={yn} kind={kind} mixed={mixed} {noise_name}",
                               lambda y=y, m=mixed, k=kind, e=eps1, q=sd_: sampler_steps.affine_step(
                                   u, y, ts, step, sde, k, m, e, q, u))
        for out_dtype in nets:
            out = _empty(B, D, dtype=out_dtype)
            on = str(out_dtype).replace("torch.", "")
            yield f"mixed_score {s} out={on}", lambda o=out: mixed_score.mixed_score(o, u, t, sde)
            for noise_name, eps_v, sd_ in (("eps", _empty(B, D, dtype=sd), None), ("seed", None, seed)):
                for weighting in (0, 1):
                    for reduction in (0, 1):
                        yield (f"loss_fwd {s} out={on} w={weighting} red={reduction} {noise_name}",
                               lambda o=out, w=weighting, r=reduction, e=eps_v, q=sd_: hsm_loss.hsm_loss_fwd(
                                   o, u, t, sde, w, 0.5, r, e, q))
                    yield (f"loss_bwd {s} out={on} w={weighting} {noise_name}",
                           lambda o=out, w=weighting, e=eps_v, q=sd_: hsm_loss.hsm_loss_bwd(
                               _empty((), dtype=sd), o, u, t, sde, w, 0.5, e, q))


def _compile(kernel, args, kwargs, target, backend):
    """Compile one launch as Triton's launcher would; (registers, spill stores, spill loads, stack, seconds)."""
    kwargs = dict(kwargs)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):
        triton.compile(src, target=target, options=options.__dict__)
    m = _PTXAS.search(log.getvalue())
    if m is None:
        raise RuntimeError(f"no ptxas report in:\n{log.getvalue()[-2000:]}")
    stack, stores, loads, regs = (int(g) for g in m.groups())
    return regs, stores, loads, stack, time.time() - start


def _key(kernel, args, kwargs):
    """What makes a distinct compiled variant: the kernel, its constexprs and the argument dtypes."""
    types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    return kernel.fn.__name__, types, tuple(sorted(kwargs.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200) or 80")
    ap.add_argument("--quick", action="store_true", help="the CIFAR-10 shape only")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    triton.knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", args.arch, 32)
    backend = make_backend(target)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k == "cifar10-b128"}
    rows, seen, failures = [], set(), []
    for shape_name, (B, D) in shapes.items():
        for label, thunk in _op_calls(B, D):
            for kernel, a, kw in _capture_launches(thunk):
                key = _key(kernel, a, kw)
                if key in seen:
                    continue
                seen.add(key)
                f64 = bool(kw.get("F64", False)) or a[0].dtype == torch.float64  # a float64-state variant
                block = f"{kw.get('BLOCK_B', '')}x{kw.get('BLOCK_D', kw.get('BLOCK_C', ''))}"
                name = f"{kernel.fn.__name__} [{label}]"
                try:
                    regs, st, ld, stack, sec = _compile(kernel, a, kw, target, backend)
                except Exception as exc:  # noqa: BLE001 - report every failure, then fail
                    failures.append(f"{shape_name} {name}: compile error {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                rows.append((shape_name, name, block, kw.get("num_warps", ""), regs, st, ld, stack, sec))
                if (st or ld) and not f64:
                    failures.append(f"{shape_name} {name}: float32 variant spills ({st} B stores, {ld} B loads)")
    head = (f"Triton {triton.__version__}, sm_{args.arch}: {len(rows)} variants\n\n"
            "| shape | kernel [variant] | tile | warps | registers | spill stores (B) | spill loads (B) "
            "| stack (B) | compile (s) |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    table = head + "".join(f"| {s} | {n} | {b} | {w} | {r} | {st} | {ld} | {sk} | {sec:.1f} |\n"
                           for s, n, b, w, r, st, ld, sk, sec in rows)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
