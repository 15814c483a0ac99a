"""Compile every Triton kernel variant ahead of time for a GPU target, without a GPU.

Each op's real host launcher runs on meta tensors at representative shapes for every variant a call
can reach (dtypes, noise modes, enums; each kernel module's ``aot_variants``); the launch is intercepted and specialised by Triton's own
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

from cld_fast import opdefs  # noqa: E402
from cld_fast.backends import triton_backend  # noqa: E402

# every module holding an op's launcher (found as the backend finds them), so a new kernel file is compiled too
MODULES = tuple({sys.modules[f.__module__]: None for f in triton_backend._bodies().values()})
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
    """(label, thunk) for every variant of every op at (B, D): each kernel module's ``aot_variants``.

    Raises when an op of ``cld_fast.opdefs.OPS`` has no variant, so a new op cannot skip the check.
    """
    labels = []
    for module in MODULES:
        for label, thunk in module.aot_variants(B, D, _empty):
            labels.append(label)
            yield label, thunk
    missing = sorted(set(opdefs.OPS) - {label.split()[0] for label in labels})
    if missing:
        raise RuntimeError(f"no AOT variants for {missing}: add them to the kernel module's aot_variants()")


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
