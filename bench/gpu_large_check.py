"""Perturb, HSM loss (forward and backward) and an SSCS step past 2^32 elements, against the Philox contract.

    python bench/gpu_large_check.py                  # GPU: 65535 x 65540 = 4,295,163,900 elements (> 2^32)
    python bench/gpu_large_check.py --cpu-smoke      # the same checks at 3 x 37 on the CPU backends (CI)

Flat element indices i = b * D + d above 2^32 need the counter's high word (c1 = i >> 32) in every
kernel and 64-bit offsets everywhere; a kernel that truncates to 32 bits repeats the noise of index
i - 2^32 or writes into the wrong row. With seed mode (in-kernel Philox, ``cld_fast.philox``) the
expected values of any element are known without running the op on the whole tensor, so this checks
a few whole rows: the first, the row holding index 2^32 and the next, and the last; for each one
the normals are computed by ``cld_fast.philox.philox_bits(start=b * D)`` for just that row, and
the ``torch`` reference of ``cld_fast.opdefs`` runs on the one-row sub-problem with that explicit noise:

* ``perturb`` (seed mode, HSM): u[b] against ``opdefs.perturb_ref``;
* ``hsm_loss`` (reduction "none", reweightedv2): the row's loss against ``hsm_loss_fwd_ref`` and,
  after ``loss.sum().backward()``, the row's gradient against ``hsm_loss_bwd_ref``;
* ``sscs_step_`` (seed mode, mixed score, step 1 of a 4-point grid): in place on the whole state,
  the row against ``sscs_step_ref`` applied to a copy of the row taken before the step.

Memory: x0 (reused as the network output), u, and the output gradient, 4 B x (1 + 2 + 1) x B x D:
about 69 GB at the default size. Tolerances: 1e-4 (absolute and relative; the normals are float32).
Exit status 0 when every row matched on every backend, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: don't let bench/*.py shadow top-level module names
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import cld_fast as cf  # noqa: E402
from cld_fast import backends, opdefs, philox  # noqa: E402
from cld_fast.sde import CLD, WEIGHTING_CODES, kernel_params  # noqa: E402

SEED = 2 ** 40 + 977
SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04)
TOL = 1e-4
BYTES_PER_ELEMENT = 4 * (1 + 2 + 1)  # float32 x0 / out, u, grad


def row_normals(seed: int, step: int, tag: int, row: int, d: int, device) -> torch.Tensor:
    """(4, d) float32 normals z0..z3 of the Philox contract for the elements of one row (flat b * d .. b * d + d - 1)."""
    r0, r1, r2, r3 = philox.philox_bits(d, seed, step, tag, device=device, start=row * d)
    z0, z1 = philox.box_muller(philox.uniform_from_bits(r0), philox.uniform_from_bits(r1))
    z2, z3 = philox.box_muller(philox.uniform_from_bits(r2), philox.uniform_from_bits(r3))
    return torch.stack([z0, z1, z2, z3])


def check_rows(b: int, d: int) -> List[int]:
    """The rows checked: first, the one holding flat index 2^32 and the next (where they exist), last."""
    cross = min((2 ** 32) // d, b - 1)
    return sorted({0, cross, min(cross + 1, b - 1), b - 1})


def compare(got: torch.Tensor, want: torch.Tensor, what: str, failures: List[str]) -> float:
    """Max abs difference; appends to ``failures`` when beyond TOL (relative to the values' scale)."""
    got, want = got.detach().double(), want.detach().double()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    if not err <= TOL * scale:  # also catches NaN
        failures.append(f"{what}: max |diff| {err:.3g} > {TOL * scale:.3g}")
    return err


def run_backend(name: str, device: torch.device, b: int, d: int, log) -> List[str]:
    """Every check on backend ``name``; returns the failures."""
    failures: List[str] = []
    params = kernel_params(SDE, device)
    rows = check_rows(b, d)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    x0 = torch.randn((b, d), generator=gen, device=device, dtype=torch.float32)
    t = torch.rand(b, generator=gen, device=device, dtype=torch.float32) * 0.98 + 0.01
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    with cf.value_checks(False):
        u, noise = cf.perturb(x0, t, SDE, seed=seed, backend=name)
    z = {r: row_normals(SEED, 0, philox.TAG_PERTURB, r, d, device) for r in rows}
    for r in rows:
        want = torch.empty((1, 2, d), dtype=torch.float32, device=device)
        opdefs.perturb_ref(x0[r:r + 1], None, t[r:r + 1], params, 0, z[r][None, :2], None, want)
        err = compare(u[r].view(2, d), want[0], f"{name} perturb row {r}", failures)
        log(f"  {name:<6} perturb      row {r:>6} (flat {r * d:>13,} .. {(r + 1) * d - 1:>13,})  max |diff| {err:.2e}")

    out = x0.detach().requires_grad_(True)  # the "network output": x0's storage, no new 17 GB
    weighting = "reweightedv2"
    with cf.value_checks(False):
        loss = cf.hsm_loss(out, u, t, SDE, noise, weighting=weighting, reduction="none", backend=name)
        loss.sum().backward()
    grad = out.grad
    for r in rows:
        u3 = u[r:r + 1].view(1, 2, d)
        want_loss = opdefs.hsm_loss_fwd_ref(out[r:r + 1].detach(), u3, t[r:r + 1], params, WEIGHTING_CODES[weighting],
                                            1.0, 0, z[r][1][None], None)
        err = compare(loss[r:r + 1], want_loss, f"{name} hsm_loss row {r}", failures)
        want_grad = opdefs.hsm_loss_bwd_ref(torch.ones(1, device=device), out[r:r + 1].detach(), u3, t[r:r + 1], params,
                                            WEIGHTING_CODES[weighting], 1.0, z[r][1][None], None)
        err_g = compare(grad[r], want_grad[0], f"{name} hsm_loss backward row {r}", failures)
        log(f"  {name:<6} hsm_loss     row {r:>6}  loss {float(loss[r].detach()):.6g}  |diff| {err:.2e}, grad max |diff| {err_g:.2e}")
    del grad, loss
    out.grad = None

    ts = torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=torch.float64, device=device)
    step = torch.tensor([1], dtype=torch.int64, device=device)
    y = out.detach()
    before = {r: u[r:r + 1].view(1, 2, d).clone() for r in rows}
    with cf.value_checks(False):
        cf.sscs_step_(u, y, ts, SDE, step=step, mixed=True, seed=seed, backend=name)
    for r in rows:
        zs = row_normals(SEED, 1, philox.TAG_SSCS, r, d, device)
        opdefs.sscs_step_ref(before[r], y[r:r + 1], ts, step, params, True, zs[None], None)
        err = compare(u[r].view(2, d), before[r][0], f"{name} sscs_step_ row {r}", failures)
        log(f"  {name:<6} sscs_step_   row {r:>6}  max |diff| {err:.2e}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    log(f"  {name:<6} {'OK' if not failures else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny size on the CPU backends (plumbing only: no 2^32)")
    p.add_argument("--rows", type=int, default=None, help="B (default 65535; smoke 3)")
    p.add_argument("--cols", type=int, default=None, help="D (default 65540: B * D > 2^32; smoke 37)")
    p.add_argument("--backends", default=None, help="comma-separated (default: cuda,triton on a GPU; cpu,triton smoke)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_large_check: no CUDA device (use --cpu-smoke for the CPU variant)", file=sys.stderr)
        return 2
    b = args.rows or (3 if smoke else 65535)
    d = args.cols or (37 if smoke else 65540)
    wanted = args.backends.split(",") if args.backends else (["cpu", "triton"] if smoke else ["cuda", "triton"])
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke:
        if b * d <= 2 ** 32:
            print(f"gpu_large_check: WARNING: B * D = {b * d:,} does not exceed 2^32; indices stay in 32 bits")
        free, total = torch.cuda.mem_get_info()
        need = BYTES_PER_ELEMENT * b * d
        print(f"gpu_large_check: {torch.cuda.get_device_name()}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free, "
              f"needs ~{need / 2**30:.0f} GiB", flush=True)
        if need > free:
            print("gpu_large_check: FAILED: not enough GPU memory for this size (use --rows / --cols)")
            return 1
    print(f"gpu_large_check: B = {b:,}, D = {d:,}, B * D = {b * d:,} ({'>' if b * d > 2**32 else '<='} 2^32); "
          f"rows checked {check_rows(b, d)}", flush=True)
    failures: List[str] = []
    tested = 0
    for name in wanted:
        mod = backends.get(name)
        if not mod.is_available() or not mod.supports(device, torch.float32):
            why = mod.why_unavailable() or f"does not run on {device.type}"
            if smoke:
                print(f"  SKIP {name}: {why}")
                continue
            failures.append(f"{name}: unavailable on this GPU machine: {why}")
            continue
        tested += 1
        try:
            failures += run_backend(name, device, b, d, lambda msg: print(msg, flush=True))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report, try the next backend
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if tested == 0:
        failures.append("no backend could run")
    for f in failures:
        print(f"FAIL  {f}")
    print(f"gpu_large_check: {'OK' if not failures else 'FAILED'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
