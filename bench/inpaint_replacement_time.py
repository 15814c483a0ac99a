"""When should SSCS draw the inpainting replacement? Three rules compared on the toy, in float64 torch.

    python -m bench.inpaint_replacement_time       # writes bench/results/inpaint-replacement-time-cpu.md

SSCS evaluates the score on the state after the opening half step of each step (``ts[i] -> ts[i] - h/2``)
and tells the network the time ``ts[i]``. The observed coordinates can be replaced by a perturbation of
x_obs

- ``open``: after the opening half step, drawn at ``ts[i] - h/2`` (where the linear flow left the state;
  the rule the fused kernels implement),
- ``net``: after the opening half step, drawn at ``ts[i]`` (the time the network is told),
- ``before``: before the opening half step, drawn at ``ts[i]`` (the half step then moves them).

The loop here is a plain float64 re-implementation of SSCS (``CLD.half_step_coefficients``,
``CLD.score_step_coefficients``) with the mixture's exact score, independent of the kernels; the table
gives the energy distance of the inpainted coordinate to exact conditional samples (``bench.inpaint_toy``).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from . import common
from .inpaint_toy import energy_1d, exact_conditional, mixtures

RESULTS = common.ROOT / "bench" / "results"
RULES = ("open", "net", "before")


def _draw(sde, x_obs, t, g):
    k = sde.perturbation_kernel(torch.tensor([t], dtype=torch.float64), "hsm")
    zx, zv = (torch.randn(x_obs.shape, generator=g, dtype=torch.float64) for _ in range(2))
    return k.a_xx * x_obs + k.l11 * zx, k.a_vx * x_obs + k.l21 * zx + k.l22 * zv


def _half(sde, x, v, t, h, g):
    r = sde.half_step_coefficients(torch.tensor([t], dtype=torch.float64), torch.tensor([h], dtype=torch.float64))[0]
    zx, zv = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    return r[0] * x + r[1] * v + r[4] * zx, r[2] * x + r[3] * v + r[5] * zx + r[6] * zv


def sscs_inpaint(gm, sde, a: float, n: int, steps: int, rule: str, g: torch.Generator) -> torch.Tensor:
    """(n,) x2 of SSCS (``steps`` NFE with the denoising step) with x1 = a replaced by ``rule``."""
    from cld_fast.sde import time_grid

    score = gm.cld_score(sde)
    ts = time_grid(steps - 1, 1e-3, "quadratic").tolist()
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    v = torch.randn(n, 2, generator=g, dtype=torch.float64) * math.sqrt(1.0 / sde.m_inv)
    xo = torch.full((n,), a, dtype=torch.float64)

    def replace(t):
        x[:, 0], v[:, 0] = _draw(sde, xo, t, g)

    def opening(i):
        nonlocal x, v
        t, h = ts[i], ts[i] - ts[i + 1]
        if rule == "before":
            replace(t)
        x, v = _half(sde, x, v, t, h / 2, g)
        if rule != "before":
            replace(t - h / 2 if rule == "open" else t)

    opening(0)
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i] - ts[i + 1]
        y = score(torch.cat([x, v], 1).float(), torch.full((n,), t)).double()
        ak = sde.score_step_coefficients(torch.tensor([t], dtype=torch.float64), torch.tensor([h], dtype=torch.float64))[0]
        v = ak[0] * v + ak[1] * y
        x, v = _half(sde, x, v, t - h / 2, h / 2, g)
        if i + 1 < len(ts) - 1:
            opening(i + 1)
    return x[:, 1]  # the denoising step moves x2 by O(eps); x1 is x_obs after it


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--nfe", default="10,20,50,200")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    nfes = [int(v) for v in args.nfe.split(",")]
    info = common.device_info(torch.device("cpu"))
    t0 = time.time()
    rows = []
    for name, (gm, sde, values) in mixtures().items():
        a = values[0]
        g = torch.Generator().manual_seed(0)
        exact = exact_conditional(gm, a, args.n, g)
        for steps in nfes:
            cells = [f"{energy_1d(sscs_inpaint(gm, sde, a, args.n, steps, rule, g), exact):.4f}" for rule in RULES]
            rows.append([name, f"{a:g}", str(steps)] + cells)
            print(rows[-1], flush=True)
    lines = ["# SSCS inpainting: when to draw the replacement", "",
             f"- device: {info['device']}", f"- torch {info['torch']}, python {info['python']}, cld_fast {info['cld_fast']}",
             f"- commit {common.git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- written by `python -m bench.inpaint_replacement_time --n {args.n} --nfe {args.nfe}` in "
             f"{time.time() - t0:.0f} s", "",
             "Energy distance of the inpainted coordinate to exact conditional samples (one seed, "
             f"{args.n} samples; mixtures and SDEs of `bench.inpaint_toy`). `open`: drawn after the opening half "
             "step at its end time (the kernels' rule); `net`: after it, at the network's time ts[i]; `before`: "
             "before it, at ts[i].", "",
             common.md_table(["mixture", "x1", "NFE"] + list(RULES), rows), ""]
    with open(RESULTS / "inpaint-replacement-time-cpu.md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
