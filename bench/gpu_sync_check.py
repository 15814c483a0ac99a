"""No host synchronisation in a training step or a sampler loop, checked with ``torch.cuda.set_sync_debug_mode("error")``.

    python bench/gpu_sync_check.py                 # on a GPU (bench/gpu_check.sh stage "sync")
    python bench/gpu_sync_check.py --cpu-smoke     # the same code at toy size on the CPU (CI: it can't rot)

Checks, each after one unguarded warm-up (lazy CUDA initialisation, cuDNN and allocator warm-up may
synchronise once, legitimately):

* ``train``: ``--train-steps`` optimizer steps of ``cld_fast.train.Trainer`` with the ``toy`` preset
  (fused perturb + network + fused HSM loss + backward + clipping + Adam + EMA), guarded as a whole;
* ``sample-<method>``: ``cf.sample`` with SSCS and EM on the exact score of the 8-Gaussian mixture and
  on the trainer's network (``cf.score_fn``), guarded from the callback of step 0 to that of step
  ``steps - 2``, as tests/test_sampling.py::test_no_cuda_sync_inside_the_loop does.

Under the guard any synchronising CUDA call raises; the check fails and prints the traceback, which
names the offending line. On the CPU the guard is a no-op (there is nothing to synchronise); the
smoke run proves the calls still match the trainer's and the sampler's APIs. Exit status: 0 when
every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: don't let bench/*.py shadow top-level module names
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import cld_fast as cf  # noqa: E402
from cld_fast.config import get_preset  # noqa: E402
from cld_fast.toy import GaussianMixture2D  # noqa: E402
from cld_fast.train import Trainer  # noqa: E402


def sync_mode(device: torch.device, on: bool) -> None:
    """Turn the "error" sync-debug mode on or off (CUDA only; a no-op elsewhere)."""
    if device.type == "cuda":
        if on:
            torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error" if on else "default")


@contextlib.contextmanager
def no_sync(device: torch.device):
    """Raise on any synchronising CUDA call inside the block (CUDA only)."""
    sync_mode(device, True)
    try:
        yield
    finally:
        sync_mode(device, False)


def check_train(device: torch.device, steps: int, batch: int, run_dir: str):
    """``steps`` trainer steps under the guard after one warm-up step; returns (one-line result, the trainer)."""
    cfg = get_preset("toy", steps=steps + 1, batch_size=batch, precision="auto", device=str(device),
                     log_every=10 ** 6, ckpt_every=0, sample_every=0, quality_figure=False, eval_samples=64,
                     eval_steps=5, sample_count=64, sample_steps=5)
    trainer = Trainer(cfg, run_dir, progress=False, verbose=False)
    trainer.train_step()  # warm-up, unguarded
    with no_sync(device):
        for _ in range(steps):
            loss = trainer.train_step()
    value = float(loss.detach())  # host read after the guard
    if not math.isfinite(value):
        raise RuntimeError(f"training loss is not finite: {value}")
    return f"{steps} steps of batch {batch} on {device}, last loss {value:.4f}", trainer


def check_sample(device: torch.device, score, sde, method: str, steps: int, n: int) -> str:
    """One sampler run whose steps 0 .. steps-2 run under the guard (armed in the callback)."""
    armed = {"on": False}

    def callback(i, t, u):
        if i == 0:
            sync_mode(device, True)
            armed["on"] = True
        if i == steps - 2 and armed["on"]:
            sync_mode(device, False)
            armed["on"] = False

    gen = torch.Generator(device=device).manual_seed(3)
    cf.sample(score, (n, 2), sde, steps=steps, method=method, device=device, generator=gen)  # warm-up
    try:
        res = cf.sample(score, (n, 2), sde, steps=steps, method=method, device=device, generator=gen, callback=callback)
    finally:
        if armed["on"]:
            sync_mode(device, False)
    if not bool(torch.isfinite(res.u).all()):
        raise RuntimeError(f"{method}: non-finite samples")
    return f"{method}, {steps} steps, {n} samples, nfe {res.nfe}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run the same checks at toy size on the CPU (no guard)")
    p.add_argument("--train-steps", type=int, default=None, help="guarded trainer steps (default 20; smoke 2)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 1024; smoke 64)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; smoke 5)")
    p.add_argument("--n", type=int, default=None, help="samples per sampler run (default 4096; smoke 64)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_sync_check: no CUDA device (use --cpu-smoke for the CPU variant)", file=sys.stderr)
        return 2
    train_steps = args.train_steps or (2 if smoke else 20)
    batch = args.batch or (64 if smoke else 1024)
    steps = args.steps or (5 if smoke else 20)
    n = args.n or (64 if smoke else 4096)

    failures = 0
    trainer = None

    def run(name, fn):
        nonlocal failures
        t0 = time.perf_counter()
        try:
            out = fn()
            print(f"PASS  {name:<24} {out[0] if isinstance(out, tuple) else out}  ({time.perf_counter() - t0:.1f} s)")
            return out
        except Exception:  # noqa: BLE001 - report every check
            failures += 1
            print(f"FAIL  {name:<24} ({time.perf_counter() - t0:.1f} s)")
            traceback.print_exc()
            return None
        finally:
            sync_mode(device, False)

    with tempfile.TemporaryDirectory(prefix="cld_sync_") as tmp:
        out = run("train", lambda: check_train(device, train_steps, batch, tmp))
        trainer = out[1] if out else None
        sde = cf.CLD()
        exact = GaussianMixture2D().cld_score(sde)
        for method in ("sscs", "em"):
            run(f"sample-{method}-exact", lambda m=method: check_sample(device, exact, sde, m, steps, n))
            if trainer is not None:
                net_score = cf.score_fn(trainer.ema_network().eval(), trainer.sde)
                run(f"sample-{method}-network", lambda m=method: check_sample(device, net_score, trainer.sde, m, steps, n))
    mode = "CPU smoke (no guard: nothing to synchronise)" if smoke else f"sync debug mode 'error' on {torch.cuda.get_device_name()}"
    print(f"gpu_sync_check: {'OK' if failures == 0 else f'{failures} FAILED'} ({mode})")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
