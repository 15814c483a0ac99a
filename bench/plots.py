"""PNG plots of the kernel table (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Dict, List, Optional

from . import kernels

COLORS = {"official": "#7f7f7f", "compile": "#9467bd", "triton": "#1f77b4", "cuda": "#2ca02c", "cpu": "#ff7f0e",
          "torch": "#8c564b"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def Patch(**kw):  # noqa: N802 - matplotlib's legend proxy
    from matplotlib.patches import Patch as _Patch

    return _Patch(**kw)


def kernel_plots(results: List[kernels.Result], copy_gbps: float, device_label: str, stem: str) -> Dict[str, str]:
    """Write ``<stem>-kernels-gbps.png`` and ``<stem>-kernels-copyfrac.png``; returns {key: path}."""
    plt = _plt()
    ops = [op for op in kernels.OPS if any(r.op == op for r in results)]
    sizes = list(dict.fromkeys(r.size for r in results))
    impls = [i for i in kernels.IMPLS if any(r.impl == i and not r.na for r in results)]
    if not ops or not impls:
        return {}
    paths = {}
    for key, title, value, ylabel in (
        ("gbps", "Effective bandwidth per op call (higher is better)", lambda r: r.gbps("op"), "GB/s (op call)"),
        ("copyfrac", "Kernel bandwidth as a fraction of the measured copy bandwidth",
         lambda r: (r.gbps("kernel") if r.kernel_ms is not None else r.gbps("op")) / copy_gbps, "fraction of copy BW"),
    ):
        ncols = 2 if len(ops) > 1 else 1
        nrows = (len(ops) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 3.4 * nrows + 1.2), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax in flat[len(ops):]:
            ax.set_visible(False)
        for ax, op in zip(flat, ops):
            width = 0.8 / len(impls)
            for j, impl in enumerate(impls):
                ys: List[Optional[float]] = []
                for s in sizes:
                    r = next((r for r in results if r.op == op and r.size == s and r.impl == impl), None)
                    ys.append(value(r) if r is not None and not r.na and r.op_ms else None)
                xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(sizes))]
                ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                              color=COLORS.get(impl), label=kernels.IMPL_TITLES[impl],
                              hatch="//" if (key == "copyfrac" and impl == "official") else None)
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([s.name.replace(" ", "\n", 1) for s in sizes], fontsize=8)
            ax.set_title(kernels.OP_TITLES[op].split(" (")[0], fontsize=10)
            if key == "gbps":
                ax.set_yscale("log")
            else:
                ax.axhline(0.85, color="k", ls="--", lw=0.8)
                ax.text(len(sizes) - 0.5, 0.86, "85%", ha="right", va="bottom", fontsize=7)
                ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
            ax.grid(axis="y", alpha=0.3)
        for row in axes:
            row[0].set_ylabel(ylabel)
        handles = [Patch(facecolor=COLORS.get(i), label=kernels.IMPL_TITLES[i]) for i in impls]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(impls), 3), fontsize=8, frameon=False)
        sub = ("kernel = data pass with coefficients precomputed; official-style (hatched): whole call"
               if key == "copyfrac" else "minimum bytes moved / median time of the whole call")
        fig.suptitle(f"{title}\n{device_label} - {sub}", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.93))
        path = f"{stem}-kernels-{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[key] = path
    return paths
