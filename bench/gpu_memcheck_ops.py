"""Every op of ``cld_fast.opdefs.OPS`` on every GPU backend at small odd shapes: the workload for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python bench/gpu_memcheck_ops.py                 # bench/gpu_check.sh stage "memcheck"
    python bench/gpu_memcheck_ops.py --cpu-smoke         # the same calls on the CPU backends (CI)

Run it with PyTorch's caching allocator off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), so each tensor
is its own allocation and an access past its end is an error memcheck sees instead of a read of a
neighbouring cached block. Shapes: D = 1, odd D, an image-shaped (B, C, H, W) in channels_last, a
sliced (non-contiguous) input, and D = 5001 (a loss row longer than one block: the chunked
reduction); states float32 (and float64 where the backend takes it); network outputs float32,
bfloat16 and float16. Each public op runs in every noise mode it has (explicit eps, in-kernel Philox
seed, none / generator), and its result is compared with the ``torch`` reference backend on CPU
copies of the same inputs (float32 1e-4, half-precision outputs and seed mode 2e-2 / 1e-4), so a
kernel that reads the wrong memory without faulting fails too, while under the sanitizer only the
kernels under test (and the copies) run on the GPU. The ``--cpu-smoke`` run uses two shapes and
float32 / bfloat16 outputs only (the Triton interpreter is slow). Every op also runs on ``cld_fast.selftest``'s inputs
(``run_selftest`` for the backend and device), and backend ``op`` lookups are recorded: the run fails
unless every op of ``cld_fast.opdefs.OPS`` was called on every backend tested.

Exit status 0 when every call matched and every op was covered, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Set

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: don't let bench/*.py shadow top-level module names
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import cld_fast as cf  # noqa: E402
from cld_fast import backends, opdefs  # noqa: E402
from cld_fast.sde import CLD  # noqa: E402
from cld_fast.selftest import run_selftest  # noqa: E402
from cld_fast.samplers.gddim import gddim_table

SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
SHAPES_GPU = ["1x1", "3x7", "2x3x5x3:channels_last", "3x7:sliced", "2x5001"]
SHAPES_SMOKE = ["3x7:sliced", "2x3x5x3:channels_last"]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SEEDED_TOL = 1e-4  # in-kernel Philox normals are float32 on every backend (log, cos, sin rounding), any state dtype
SEED = 2 ** 33 + 17


class OpRecorder:
    """Wraps ``op`` of backend modules to record which ops of ``opdefs.OPS`` each one was asked for."""

    def __init__(self, names: List[str]):
        self.seen: Dict[str, Set[str]] = {n: set() for n in names}
        for name in names:
            mod = backends.get(name)
            original = mod.op

            def op(op_name, _orig=original, _name=name):
                self.seen[_name].add(op_name)
                return _orig(op_name)

            mod.op = op

    def missing(self, name: str) -> List[str]:
        return sorted(set(opdefs.OPS) - self.seen[name])


def parse_shape(spec: str):
    """'3x7' or '2x3x5x3:channels_last' / '3x7:sliced' -> (shape tuple, layout)."""
    dims, _, layout = spec.partition(":")
    return tuple(int(v) for v in dims.split("x")), layout or "contiguous"


def make(shape, layout, dtype, device, gen, scale=1.0):
    """A tensor of ``shape`` in ``layout`` on ``device`` (values from the CPU generator ``gen``)."""
    if layout == "sliced":
        full = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64) * scale
        return full.to(device=device, dtype=dtype)[..., ::2]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class Checker:
    """Counts calls and comparisons; collects failures with their tracebacks instead of stopping."""

    def __init__(self):
        self.calls = 0
        self.failures: List[str] = []

    def close(self, got, want, what, dtype, seeded=False):
        self.calls += 1
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
        if not bool(torch.isfinite(got).all()):
            raise AssertionError(f"{what}: non-finite values")
        tol = max(TOL[dtype], SEEDED_TOL) if seeded else TOL[dtype]
        if not torch.allclose(got, want, rtol=tol, atol=tol):
            raise AssertionError(f"{what}: max |diff| {float((got - want).abs().max()):.3g} > {tol:g}")

    def case(self, what, fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - report all failures
            self.failures.append(f"{what}\n{traceback.format_exc()}")
            print(f"FAIL  {what}", flush=True)


REF = torch.device("cpu")  # the torch reference runs here: under compute-sanitizer only the kernels under test launch


def ref(x):
    """A CPU copy (same strides) of a tensor for the reference, dicts of tensors element-wise; others as they are."""
    if isinstance(x, dict):
        return {k: ref(v) for k, v in x.items()}
    if isinstance(x, cf.Noise):
        return dataclasses.replace(x, eps=ref(x.eps), seed=ref(x.seed))
    return x.to(REF) if isinstance(x, torch.Tensor) else x


def run_backend(name: str, device: torch.device, shapes: List[str], check: Checker, half_outputs=(torch.bfloat16, torch.float16)) -> None:
    """Every public op, every mode, on backend ``name`` against the torch reference (on the CPU); float32
    states also with network outputs in each dtype of ``half_outputs``."""
    mod = backends.get(name)
    state_dtypes = [d for d in (torch.float32, torch.float64) if mod.supports(device, d)]
    gen = torch.Generator().manual_seed(0)
    ts = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.05], dtype=torch.float64, device=device)
    last = ts.numel() - 2
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    for spec in shapes:
        shape, layout = parse_shape(spec)
        b = shape[0]
        for sdt in state_dtypes:
            out_dtypes = [torch.float32, *half_outputs] if sdt == torch.float32 else [torch.float64]
            tag = f"{name} {spec} {str(sdt)[6:]}"
            x0 = make(shape, layout, sdt, device, gen)
            d = x0[0].numel()
            t = (torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.01).to(device, torch.float32)
            eps2 = make((b, 2, d), "contiguous", sdt, device, gen)
            eps4 = make((b, 4, d), "contiguous", sdt, device, gen)
            eps1 = make((b, d), "contiguous", sdt, device, gen)
            state_shape = (b, 2 * shape[1]) + tuple(shape[2:])

            def perturb_modes(x0=x0, t=t, eps2=eps2, tag=tag, sdt=sdt):
                for objective in ("hsm", "dsm"):
                    for mode in ("eps", "seed", "generator"):
                        kw = {"eps": eps2} if mode == "eps" else {"seed": seed} if mode == "seed" else {}
                        g1 = torch.Generator(device).manual_seed(5)
                        u, _ = cf.perturb(x0, t, SDE, objective=objective, generator=g1, backend=name, **kw)
                        if mode == "generator":
                            check.calls += 1
                            assert bool(torch.isfinite(u).all()), f"{tag} perturb {objective} generator: non-finite"
                            continue
                        # dsm draws v0 from the generator on the data's device: its reference runs there too
                        here = objective == "dsm"
                        g2 = torch.Generator(device if here else REF).manual_seed(5)
                        args = (x0, t) if here else (ref(x0), ref(t))
                        want, _ = cf.perturb(*args, SDE, objective=objective, generator=g2, backend="torch",
                                             **(kw if here else ref(kw)))
                        check.close(u, want, f"{tag} perturb {objective} {mode}", sdt, seeded=mode == "seed")

            check.case(f"{tag} perturb", perturb_modes)

            for odt in out_dtypes:
                def loss_modes(odt=odt, x0=x0, t=t, eps2=eps2, tag=f"{tag} out {str(odt)[6:]}", sdt=sdt):
                    out = make(x0.shape, layout, odt, device, gen, scale=0.5)
                    for mode in ("eps", "seed"):
                        kw = {"eps": eps2} if mode == "eps" else {"seed": seed}
                        u, noise = cf.perturb(x0, t, SDE, backend=name, **kw)
                        for weighting in ("reweightedv2", "likelihood"):
                            for reduction in ("none", "mean", "sum"):
                                o1 = out.detach().clone().requires_grad_(True)
                                o2 = ref(out.detach()).clone().requires_grad_(True)
                                loss = cf.hsm_loss(o1, u, t, SDE, noise, weighting=weighting, reduction=reduction,
                                                   backend=name)
                                want = cf.hsm_loss(o2, ref(u), ref(t), SDE, ref(noise), weighting=weighting,
                                                   reduction=reduction, backend="torch")
                                what = f"{tag} hsm_loss {mode} {weighting} {reduction}"
                                check.close(loss, want, what, sdt, seeded=mode == "seed")
                                loss.sum().backward()
                                want.sum().backward()
                                check.close(o1.grad, o2.grad, what + " backward", odt, seeded=mode == "seed")
                        check.close(cf.mixed_score(out, u, t, SDE, backend=name),
                                    cf.mixed_score(ref(out), ref(u), ref(t), SDE, backend="torch"),
                                    f"{tag} mixed_score", odt)

                check.case(f"{tag} out {str(odt)[6:]} loss/mixed_score", loss_modes)

                def step_modes(odt=odt, tag=f"{tag} out {str(odt)[6:]}", sdt=sdt, eps1=eps1, eps2=eps2, eps4=eps4):
                    u0 = make(state_shape, layout if layout != "sliced" else "contiguous", sdt, device, gen)
                    y = make(shape, layout, odt, device, gen, scale=0.5)

                    def both(fn, what, returns=False, **kw):
                        """``fn(state, y, ts, backend, **kw)`` on a copy of u0 with backend ``name`` and on a CPU
                        copy with the reference; compares the updated states (in-place ops) or the returned
                        tensors (``returns``)."""
                        a = u0.clone(memory_format=torch.preserve_format)
                        r = ref(u0).clone(memory_format=torch.preserve_format)
                        got, want = fn(a, y, ts, name, **kw), fn(r, ref(y), ref(ts), "torch", **ref(kw))
                        if not returns:
                            got, want = a, r
                        check.close(got, want, f"{tag} {what}", sdt, seeded=" seed " in f" {what} ")

                    for step in (0, last):
                        for mode, kw2, kw4, kw1 in (("eps", {"eps": eps2}, {"eps": eps4}, {"eps": eps1}),
                                                    ("seed", {"seed": seed}, {"seed": seed}, {"seed": seed}),
                                                    ("none", {}, {}, {})):
                            both(lambda w, y_, ts_, be, **kw: cf.half_step_(w, ts_, SDE, step=step, backend=be, **kw),
                                 f"half_step_ {mode} step {step}", **kw2)
                            for mixed in (False, True):
                                both(lambda w, y_, ts_, be, **kw: cf.sscs_step_(w, y_, ts_, SDE, step=step, mixed=mixed,
                                                                              backend=be, **kw),
                                     f"sscs_step_ {mode} mixed={mixed} step {step}", **kw4)
                                both(lambda w, y_, ts_, be, **kw: cf.em_step_(w, y_, ts_, SDE, step=step, mixed=mixed,
                                                                            backend=be, **kw),
                                     f"em_step_ {mode} mixed={mixed} step {step}", **kw1)
                        both(lambda w, y_, ts_, be: cf.em_step_(w, y_, ts_, SDE, step=step, denoise=True, backend=be),
                             f"em_step_ denoise step {step}")
                    for mixed in (False, True):
                        both(lambda w, y_, ts_, be: cf.pf_drift(w, y_, 0.3, SDE, mixed=mixed, backend=be),
                             f"pf_drift mixed={mixed}", returns=True)
                    if hasattr(cf, "gddim_step_"):  # the gDDIM multistep op: a whole run, so the ring buffer wraps
                        for order, predict in ((1, "eps"), (2, "eps"), (3, "eps"), (3, "x0")):
                            table = gddim_table(SDE, ts, order=order, predict=predict, mixed=True)
                            a, r = u0.clone(memory_format=torch.preserve_format), ref(u0).clone()
                            ha = cf.gddim_history(a, order, predict)
                            hr = ref(ha).clone()
                            for step in range(table.shape[0]):
                                cf.gddim_step_(a, y, ha, table.to(device), step=step, backend=name)
                                cf.gddim_step_(r, ref(y), hr, table, step=step, backend="torch")
                            what = f"gddim_step_ order {order} {predict}, {table.shape[0]} steps"
                            check.close(a, r, f"{tag} {what}", sdt)
                            check.close(ha, hr, f"{tag} {what} history", sdt)

                check.case(f"{tag} out {str(odt)[6:]} sampler steps", step_modes)
            if device.type == "cuda":
                torch.cuda.synchronize()  # a fault surfaces here, attributed to this case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the calls on the CPU backends (cpu; triton when TRITON_INTERPRET=1) instead of the GPU ones")
    p.add_argument("--backends", default=None, help="comma-separated (default: cuda,triton on a GPU; cpu,triton smoke)")
    p.add_argument("--shapes", default=None, help="comma-separated specs like 3x7 or 2x3x5x3:channels_last")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_memcheck_ops: no CUDA device (use --cpu-smoke for the CPU variant)", file=sys.stderr)
        return 2
    wanted = args.backends.split(",") if args.backends else (["cpu", "triton"] if smoke else ["cuda", "triton"])
    shapes = args.shapes.split(",") if args.shapes else (SHAPES_SMOKE if smoke else SHAPES_GPU)
    plan = []
    for name in wanted:
        device = torch.device("cpu") if smoke or name == "cpu" else torch.device("cuda")
        mod = backends.get(name)
        if not mod.is_available() or not mod.supports(device, torch.float32):
            why = mod.why_unavailable() or f"does not run on {device.type}"
            if smoke:
                print(f"SKIP  {name}: {why}")
                continue
            print(f"FAIL  {name}: unavailable on this GPU machine: {why}")
            return 1
        plan.append((name, device))
    if not plan:
        print("gpu_memcheck_ops: no backend to test", file=sys.stderr)
        return 1
    recorder = OpRecorder([name for name, _ in plan])
    check = Checker()
    ok = True
    for name, device in plan:
        t0 = time.perf_counter()
        before = check.calls
        run_backend(name, device, shapes, check, (torch.bfloat16,) if smoke else (torch.bfloat16, torch.float16))
        # every op again on cld_fast.selftest's inputs (a new op gets its inputs there, not here)
        report = run_selftest(device=device, backends=[name], quick=smoke)
        check.calls += len(report.rows)
        check.failures += [f"selftest {r.backend} {r.op} {r.mode} {r.dtype} {r.shape}: {r.note}" for r in report.failures()]
        missing = recorder.missing(name)
        print(f"{name:<7} {check.calls - before} checked calls on {device.type}, shapes {','.join(shapes)}, "
              f"ops called: {sorted(recorder.seen[name])} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if missing:
            ok = False
            print(f"FAIL  {name}: ops of cld_fast.opdefs.OPS never called: {missing}")
    for f in check.failures:
        print(f"\n--- {f}")
    ok = ok and not check.failures
    print(f"gpu_memcheck_ops: {'OK' if ok else 'FAILED'} ({len(check.failures)} failing cases, {check.calls} checks)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
