"""PNG figures written during training and sampling (matplotlib, Agg backend; no display needed).

Every figure is written atomically (``cld_fast.fileio.atomic_writer``).

* :func:`scatter_2d`     samples over data for 2-D sets.
* :func:`image_grid`     a grid of images in [-1, 1] (the centred training range).
* :func:`quality_figure` samples over data, and energy distance vs. sampler steps per method.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .fileio import atomic_writer

__all__ = ["scatter_2d", "image_grid", "quality_figure", "grid_array", "grid_scale", "log_floor_note"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _limits(*arrays, pad: float = 0.1) -> Tuple[float, float]:
    finite = [a[np.isfinite(a).all(axis=1)] for a in arrays if a is not None and len(a)]
    if not finite or not any(len(a) for a in finite):
        return (-1.5, 1.5)
    allp = np.concatenate(finite, axis=0)
    lo, hi = np.quantile(allp, 0.001), np.quantile(allp, 0.999)
    span = max(hi - lo, 1e-3)
    return float(lo - pad * span), float(hi + pad * span)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def scatter_2d(samples, path: str, data=None, title: str = "", limits: Optional[Tuple[float, float]] = None) -> str:
    """Scatter ``samples`` (n, 2) (orange) over ``data`` (m, 2) (grey) into ``path``; returns ``path``."""
    plt = _plt()
    s = _np(samples)
    d = _np(data) if data is not None else None
    lim = limits or _limits(s, d)
    fig, ax = plt.subplots(figsize=(5, 5))
    if d is not None:
        ax.scatter(d[:, 0], d[:, 1], s=2, c="0.6", alpha=0.5, label="data", linewidths=0)
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:orange", alpha=0.7, label="samples", linewidths=0)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def grid_scale(h: int, w: int, min_side: int = 64) -> int:
    """Integer nearest-neighbour upscaling factor so that an h x w image is at least ``min_side`` pixels
    on its longer side (1 for images that are already that large)."""
    return max(1, int(math.ceil(min_side / max(h, w, 1))))


def grid_array(images, nrow: Optional[int] = None, pad: int = 2, scale: Optional[int] = None) -> np.ndarray:
    """(n, C, H, W) images in [-1, 1] -> one (H', W', 3) uint8 grid.

    ``scale``: every pixel becomes a scale x scale block (nearest neighbour, no smoothing), so that
    16x16 or 32x32 samples are visible in an image viewer; None: ``grid_scale(H, W)`` (4 for 16x16,
    2 for 32x32, 1 from 64x64 on).
    """
    x = _np(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {x.shape}")
    x = np.clip((x + 1.0) * 0.5, 0.0, 1.0)
    n, c, h, w = x.shape
    scale = grid_scale(h, w) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    elif c != 3:
        x = x[:, :3] if c > 3 else np.concatenate([x, np.zeros((n, 3 - c, h, w), x.dtype)], axis=1)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i].transpose(1, 2, 0)
    grid = (grid * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1) if scale > 1 else grid


def image_grid(images, path: str, nrow: Optional[int] = None, scale: Optional[int] = None) -> str:
    """Save (n, C, H, W) images in [-1, 1] as one PNG grid, upscaled as ``grid_array`` says; returns ``path``."""
    plt = _plt()
    arr = grid_array(images, nrow, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_writer(path) as f:
        plt.imsave(f, arr, format="png")
    return path


LOG_FLOOR = 1e-6  # the lowest value a log-scale quality plot draws


def log_floor_note(values: Sequence[float], floor: float = LOG_FLOOR) -> str:
    """'' when every value can be drawn on a log axis, else a note saying which values (<= ``floor``,
    e.g. negative energy distances within the estimator noise) are drawn at ``floor``."""
    low = [v for v in values if not v > floor]
    if not low:
        return ""
    shown = ", ".join(f"{v:.2g}" for v in sorted(low)[:3]) + (", ..." if len(low) > 3 else "")
    return (f"{len(low)} value(s) <= {floor:g} ({shown}; below 0 means within the estimator noise) "
            f"drawn at {floor:g} as hollow markers")


def quality_figure(path: str, samples, data, curves: Dict[str, Sequence[Tuple[int, float]]],
                   floor: Optional[float] = None, baseline: Optional[float] = None, title: str = "") -> str:
    """Left: ``samples`` over ``data``. Right: energy distance vs. steps, one line per method in ``curves``
    (``{method: [(steps, ed), ...]}``), with the estimator noise ``floor`` (|data vs. data|) and the
    ``baseline`` of a Gaussian fitted to the data."""
    plt = _plt()
    s, d = _np(samples), _np(data)
    lim = _limits(s, d)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4.6))
    a0.scatter(d[:, 0], d[:, 1], s=2, c="0.6", alpha=0.5, label="data", linewidths=0)
    a0.scatter(s[:, 0], s[:, 1], s=2, c="tab:orange", alpha=0.7, label="samples", linewidths=0)
    a0.set_xlim(*lim)
    a0.set_ylim(*lim)
    a0.set_aspect("equal")
    a0.legend(loc="upper right", markerscale=4, fontsize=8)
    a0.set_title(title or "samples vs. data", fontsize=9)
    for name, pts in curves.items():
        pts = sorted(pts)
        line, = a1.plot([p[0] for p in pts], [max(p[1], LOG_FLOOR) for p in pts], marker="o", label=name)
        low = [p for p in pts if not p[1] > LOG_FLOOR]
        if low:  # clamped points: hollow, so they can't be read as measured values
            a1.plot([p[0] for p in low], [LOG_FLOOR] * len(low), ls="none", marker="o", ms=9, mfc="white",
                    mec=line.get_color())
    if floor is not None:
        a1.axhline(max(abs(floor), LOG_FLOOR), color="0.5", ls="--", lw=1, label="|data vs. data| (estimator noise)")
    if baseline is not None:
        a1.axhline(max(baseline, LOG_FLOOR), color="tab:red", ls=":", lw=1.2, label="Gaussian fitted to the data")
    note = log_floor_note([p[1] for pts in curves.values() for p in pts]
                          + ([baseline] if baseline is not None else []))
    if note:
        a1.text(0.01, 0.01, note, transform=a1.transAxes, fontsize=6.5, color="0.3", wrap=True)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("sampler steps (network evaluations)")
    a1.set_ylabel("energy distance to fresh data")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
