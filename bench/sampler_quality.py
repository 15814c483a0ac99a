"""Sampler quality with an exact score: energy distance to fresh data vs NFE for SSCS, EM and the ODE.

The data is the 8-Gaussian mixture of ``cld_fast.toy`` (radius 0.7, std 0.08) and every sampler
uses its exact score, so the only error left is the sampler's discretisation (plus Monte-Carlo
noise, shown as the "data vs data" floor). CLD: SSCS (linear and quadratic striding), Euler-Maruyama,
gDDIM (orders 2 and 3; eps_R and x0_hat extrapolation) and the probability-flow ODE (adaptive RK45 at
several tolerances); the VP-SDE baseline: EM and ODE. A second table drives the CLD samplers with a
score that carries a fixed smooth error, to show how each reacts to an imperfect network.

    python bench/sampler_quality.py            # full study (a few minutes on 2 CPU cores)
    python bench/sampler_quality.py --quick    # fewer samples, seeds and NFE (well under 3 minutes)

Writes ``bench/results/sampler_quality-<device>.md`` (``-quick`` appended for --quick) and a log-log
PNG plot of energy distance vs NFE next to it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cld_fast as cf  # noqa: E402
from cld_fast.toy import GaussianMixture2D, energy_distance  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, seeds and NFE values")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default 8000, quick 2000)")
    p.add_argument("--seeds", type=int, default=None, help="runs averaged per point (default 4, quick 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (small ops: 1 is fastest)")
    p.add_argument("--out", default=None, help="output path without extension")
    return p.parse_args(argv)


PERTURBATION = "0.1 * sin(2 x + 1) * cos(1.5 v) / sqrt(s_vv(t)) added to the exact velocity score"


def perturbed_score(score, sde):
    """The exact score plus a fixed smooth error of relative size ~0.1 (``PERTURBATION``)."""

    def bad(u, t):
        s = score(u, t)
        k = sde.perturbation_kernel(t.double())
        d = u.shape[1] // 2
        err = torch.sin(2.0 * u[:, :d] + 1.0) * torch.cos(1.5 * u[:, d:])
        return s + (0.1 / torch.sqrt(k.s_vv)).to(s.dtype)[:, None] * err.to(s.dtype)

    return bad


def run(args):
    quick = args.quick
    batch = args.batch or (2000 if quick else 8000)
    seeds = list(range(args.seeds or (2 if quick else 4)))
    nfes = [5, 10, 20, 50, 100] if quick else [5, 10, 20, 50, 100, 200]
    tols = [1e-2, 1e-3, 1e-4] if quick else [1e-2, 1e-3, 1e-4, 1e-5]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    gm = GaussianMixture2D()
    cld = cf.CLD()
    vp = cf.VPSDE()
    cld_score = gm.cld_score(cld)
    vp_score = gm.vp_score(vp)
    refs = {s: gm.sample(batch, torch.Generator().manual_seed(10_000 + s)) for s in seeds}
    floor = [energy_distance(gm.sample(batch, torch.Generator().manual_seed(20_000 + s)), refs[s]) for s in seeds]

    configs = []
    for n in nfes:
        configs.append(("CLD SSCS (linear)", cld_score, cld, dict(method="sscs", steps=n, striding="linear"), f"{n} steps"))
    for n in nfes:
        configs.append(("CLD SSCS (quadratic)", cld_score, cld, dict(method="sscs", steps=n, striding="quadratic"), f"{n} steps"))
    for n in nfes:
        configs.append(("CLD EM", cld_score, cld, dict(method="em", steps=n), f"{n} steps"))
    for n in nfes:
        configs.append(("CLD gDDIM order 2", cld_score, cld, dict(method="gddim", steps=n, order=2), f"{n} steps"))
    for n in nfes:
        configs.append(("CLD gDDIM order 3", cld_score, cld, dict(method="gddim", steps=n, order=3), f"{n} steps"))
    for n in nfes:
        configs.append(("CLD gDDIM x0 order 2 (log)", cld_score, cld,
                        dict(method="gddim", steps=n, order=2, predict="x0", striding="log"), f"{n} steps"))
    for tol in tols:
        configs.append(("CLD ODE (RK45)", cld_score, cld, dict(method="ode", rtol=tol, atol=tol), f"tol {tol:g}"))
    # Robustness: the same samplers driven by a score with a fixed smooth error (PERTURBATION)
    bad = perturbed_score(cld_score, cld)
    for n in (10, 20, 50):
        for name, kw in (("SSCS (quadratic)", dict(method="sscs")), ("gDDIM order 2", dict(method="gddim", order=2)),
                         ("gDDIM order 3", dict(method="gddim", order=3)),
                         ("gDDIM x0 order 2 (log)", dict(method="gddim", order=2, predict="x0", striding="log"))):
            configs.append(("perturbed: " + name, bad, cld, dict(steps=n, **kw), f"{n} steps"))
    configs.append(("perturbed: ODE (RK45)", bad, cld, dict(method="ode", rtol=1e-5, atol=1e-5), "tol 1e-05"))
    for n in nfes:
        configs.append(("VP-SDE EM", vp_score, vp, dict(method="em", steps=n), f"{n} steps"))
    for tol in tols:
        configs.append(("VP-SDE ODE (RK45)", vp_score, vp, dict(method="ode", rtol=tol, atol=tol), f"tol {tol:g}"))

    rows = []
    for name, score, sde, kw, setting in configs:
        eds, nfe_list, secs = [], [], []
        for s in seeds:
            gen = torch.Generator(device=device).manual_seed(s)
            t0 = time.perf_counter()
            res = cf.sample(score, (batch, 2), sde, generator=gen, device=device, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs.append(time.perf_counter() - t0)
            eds.append(energy_distance(res.x.float().cpu(), refs[s]))
            nfe_list.append(res.nfe)
        row = dict(name=name, setting=setting, nfe=statistics.mean(nfe_list), ed=statistics.mean(eds),
                   ed_sd=statistics.stdev(eds) if len(eds) > 1 else 0.0, sec=statistics.mean(secs))
        rows.append(row)
        print(f"{name:22s} {setting:12s} NFE {row['nfe']:7.1f}  ED {row['ed']:.6f} ± {row['ed_sd']:.6f}  {row['sec']:.2f}s",
              flush=True)
    return dict(rows=rows, floor=floor, batch=batch, seeds=seeds, device=device, quick=quick)


def write_markdown(study, path):
    rows, floor = study["rows"], study["floor"]
    dev = "CPU" if study["device"].type == "cpu" else torch.cuda.get_device_name(study["device"])
    fl_mean = statistics.mean(floor)
    fl_sd = statistics.stdev(floor) if len(floor) > 1 else 0.0
    lines = [
        "# Sampler quality with the exact score (8-Gaussian mixture)",
        "",
        f"- device: {dev}" + (f" ({torch.get_num_threads()} torch thread(s))" if study["device"].type == "cpu" else ""),
        f"- torch {torch.__version__}, cld_fast {cf.__version__}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- mode: {'quick' if study['quick'] else 'full'}; {study['batch']} samples per run, "
        f"mean ± sd over {len(study['seeds'])} seeds",
        "- data: 8 Gaussians on a circle of radius 0.7, std 0.08; exact CLD / VP-SDE scores "
        "(`cld_fast.toy`), so the error is the sampler's alone",
        "- metric: energy distance E|X-Y| - E|X-X'|/2 - E|Y-Y'|/2 to fresh data samples (unbiased; "
        "can dip below 0 at the noise floor)",
        f"- noise floor (data vs data, same sample sizes): {fl_mean:.6f} ± {fl_sd:.6f} "
        f"(mean |.| {statistics.mean([abs(f) for f in floor]):.6f}, the dashed line of the plot)",
        "- CLD: beta0 = 4, beta1 = 0, M^-1 = 4, gamma = 0.04; VP-SDE: beta 0.1 -> 20; eps = 1e-3 and the "
        "official denoising step (counted in the NFE)",
        "",
        "| sampler | setting | NFE | energy distance | sd | time / run (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    exact = [r for r in rows if not r["name"].startswith("perturbed")]
    bad = [r for r in rows if r["name"].startswith("perturbed")]
    for r in exact:
        lines.append(f"| {r['name']} | {r['setting']} | {r['nfe']:.0f} | {r['ed']:.6f} | {r['ed_sd']:.6f} | {r['sec']:.2f} |")
    if bad:
        lines += ["", f"**Perturbed score** ({PERTURBATION}): the samplers now integrate a slightly wrong model, "
                  "so no row reaches the floor; the adaptive ODE at tol 1e-5 shows where the deterministic "
                  "samplers converge to, and a row far above it at the same NFE is a sampler amplifying the error.",
                  "", "| sampler | setting | NFE | energy distance | sd | time / run (s) |", "|---|---|---:|---:|---:|---:|"]
        for r in bad:
            lines.append(f"| {r['name']} | {r['setting']} | {r['nfe']:.0f} | {r['ed']:.6f} | {r['ed_sd']:.6f} | {r['sec']:.2f} |")
    lines += ["", "Lower is better. Times include the exact-score evaluation (float64 mixture math) and are "
              "only indicative on a shared CPU.", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def write_plot(study, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, floor = study["rows"], study["floor"]
    fl = max(statistics.mean([abs(f) for f in floor]), 1e-6)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    styles = {"CLD SSCS (linear)": ("C0", "o", "-"), "CLD SSCS (quadratic)": ("C0", "s", "--"),
              "CLD EM": ("C1", "o", "-"), "CLD ODE (RK45)": ("C2", "^", "-"),
              "CLD gDDIM order 2": ("C5", "D", "-"), "CLD gDDIM order 3": ("C5", "v", "--"),
              "CLD gDDIM x0 order 2 (log)": ("C6", "D", ":"),
              "VP-SDE EM": ("C3", "o", ":"), "VP-SDE ODE (RK45)": ("C4", "^", ":")}
    for name, (color, marker, ls) in styles.items():
        pts = [(r["nfe"], r["ed"], r["ed_sd"]) for r in rows if r["name"] == name]
        if not pts:
            continue
        pts.sort()
        x = [p[0] for p in pts]
        y = [max(p[1], fl / 3) for p in pts]
        ax.plot(x, y, color=color, marker=marker, ls=ls, label=name)
    ax.axhline(fl, color="gray", ls="--", lw=1, label="noise floor (|data vs data|)")
    ax.text(0.01, 0.01, "points below floor/3 (within the noise) are drawn at floor/3", transform=ax.transAxes,
            fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (score evaluations)")
    ax.set_ylabel("energy distance to data")
    dev = "CPU" if study["device"].type == "cpu" else "CUDA"
    ax.set_title(f"Exact-score 8-Gaussian mixture, {study['batch']} samples, {dev}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    study = run(args)
    dev = "cpu" if study["device"].type == "cpu" else "cuda"
    base = args.out or os.path.join(RESULTS, f"sampler_quality-{dev}" + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    write_markdown(study, base + ".md")
    write_plot(study, base + ".png")
    print(f"wrote {base}.md and {base}.png in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
