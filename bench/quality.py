"""Quality table: the exact-score sampler study (``bench/sampler_quality.py``, owned by the samplers
work) and a short toy training run, CLD (HSM) vs the VP-SDE baseline (DSM), compared at equal NFE.

Toy training: ``cld_fast.train.Trainer`` with the ``toy`` and ``toy-vpsde`` presets (the official
multimodal swiss roll, the official toy MLP, fp32), the same fixed number of optimizer steps for
both; then EMA samples with ``cf.sample`` at a few NFE budgets (CLD: SSCS and EM; VP-SDE: EM, its
fixed-step sampler) and the energy distance to fresh data (lower is better; the data-vs-data value
is the floor a perfect model reaches with this many samples).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import common


# ---- the samplers engineer's exact-score study ---------------------------------------------------------


@dataclass
class StudyResult:
    status: str                     # "ok", "not available", "failed"
    markdown: str = ""
    seconds: float = 0.0
    detail: str = ""


_ENTRY_POINTS = ("main", "run", "run_study", "study")


def run_sampler_quality(quick: bool, device: torch.device, out_base: str, log=print) -> StudyResult:
    """Import ``bench.sampler_quality`` and call its main function; never raises.

    An argparse-style ``main(argv)`` gets ``--quick``, ``--device`` and ``--out <out_base>`` (the flags
    its parser accepts); the Markdown it writes to ``<out_base>.md`` is embedded in the report and its
    ``<out_base>.png`` linked. torch's thread count is restored afterwards (the study sets its own).
    """
    skip = common.budget_note(60.0)
    if skip:
        return StudyResult("not run", detail=skip)
    try:
        mod = importlib.import_module("bench.sampler_quality")
    except Exception as exc:  # noqa: BLE001 - not written yet, or broken
        return StudyResult("not available", detail=f"bench/sampler_quality.py could not be imported ({common.short_error(exc)})")
    fn = next((getattr(mod, n) for n in _ENTRY_POINTS if callable(getattr(mod, n, None))), None)
    if fn is None:
        return StudyResult("not available", detail=f"bench/sampler_quality.py has none of {', '.join(_ENTRY_POINTS)}")
    kwargs = _study_kwargs(mod, fn, quick, device, out_base)
    buf = io.StringIO()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            ret = fn(**kwargs)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return StudyResult("failed", seconds=time.perf_counter() - t0,
                               detail=f"sampler_quality.{fn.__name__} exited with {exc.code}: {buf.getvalue()[-300:]}")
        ret = None
    except Exception as exc:  # noqa: BLE001
        return StudyResult("failed", seconds=time.perf_counter() - t0,
                           detail=f"sampler_quality.{fn.__name__} raised {common.short_error(exc)}")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    shown = {k: ([os.path.basename(a) if a == out_base else a for a in v] if isinstance(v, list) else v)
             for k, v in kwargs.items()}
    call = f"bench.sampler_quality.{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
    md_file, png_file = f"{out_base}.md", f"{out_base}.png"
    if os.path.isfile(md_file):
        lines = [ln for ln in open(md_file).read().splitlines() if not ln.startswith("# ")]
        text = "\n".join(lines).strip()
        if os.path.isfile(png_file):
            text += f"\n\n![Energy distance vs NFE]({os.path.basename(png_file)})"
        return StudyResult("ok", markdown=text, seconds=seconds, detail=call)
    return StudyResult("ok", markdown=_as_markdown(ret, buf.getvalue()), seconds=seconds, detail=call)


def _study_kwargs(mod, fn, quick: bool, device: torch.device, out_base: str) -> Dict[str, Any]:
    """The arguments the study's entry point accepts, among the ones this bench can give."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "argv" in params or "args" in params:
        key = "argv" if "argv" in params else "args"
        wanted = (["--quick"] if quick else []) + ["--device", device.type, "--out", out_base]
        parse = getattr(mod, "parse_args", None)
        if callable(parse):   # keep only the flags its parser knows
            kept = []
            for flag in ([wanted[:1]] if quick else []) + [["--device", device.type], ["--out", out_base]]:
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        parse(kept + flag)
                    kept += flag
                except SystemExit:
                    pass
            wanted = kept
        return {key: wanted}
    offer = {"quick": quick, "device": str(device), "out": out_base, "out_dir": os.path.dirname(out_base)}
    return {k: v for k, v in offer.items() if k in params}


def _as_markdown(ret, stdout: str) -> str:
    if isinstance(ret, str):
        return ret.strip()
    for attr in ("markdown", "to_markdown", "render"):
        val = getattr(ret, attr, None)
        if callable(val):
            try:
                text = val()
                if isinstance(text, str):
                    return text.strip()
            except Exception:  # noqa: BLE001
                pass
        elif isinstance(val, str):
            return val.strip()
    if isinstance(ret, dict):
        for key in ("markdown", "table", "md"):
            if isinstance(ret.get(key), str):
                return ret[key].strip()
        rows = [[str(k), _short(v)] for k, v in ret.items()]
        return common.md_table(["key", "value"], rows, align="ll")
    if isinstance(ret, (list, tuple)) and ret and all(isinstance(r, dict) for r in ret):
        keys = list(dict.fromkeys(k for r in ret for k in r))
        return common.md_table(keys, [[_short(r.get(k, "")) for k in keys] for r in ret], align="l" * len(keys))
    text = stdout.strip()
    return text if text else "(the study returned nothing printable; see its own output files)"


def _short(v) -> str:
    if isinstance(v, float):
        return common.fmt(v, 4)
    s = str(v)
    return s if len(s) < 120 else s[:117] + "..."


# ---- toy training: CLD vs VP-SDE at equal NFE -----------------------------------------------------------


@dataclass
class ToyResult:
    sde: str
    train_steps: int
    train_seconds: float
    energy: Dict[str, Dict[int, float]] = field(default_factory=dict)   # method -> NFE -> energy distance
    floor: Optional[float] = None
    na: Optional[str] = None


def toy_budget(device: torch.device, quick: bool):
    """(optimizer steps, eval samples, NFE list)."""
    if device.type == "cuda":
        return 6000, 4000, (20, 50, 100)
    return (1500, 2000, (20, 50)) if quick else (6000, 4000, (20, 50, 100))


def run_toy(device: torch.device, quick: bool, log=print, workdir: Optional[str] = None) -> List[ToyResult]:
    try:
        from cld_fast.config import get_preset
        from cld_fast.toy import energy_distance
        from cld_fast.train import Trainer
    except Exception as exc:  # noqa: BLE001
        why = f"cld_fast.train is not available ({common.short_error(exc)})"
        return [ToyResult("cld", 0, 0.0, na=why), ToyResult("vpsde", 0, 0.0, na=why)]
    steps, n, nfes = toy_budget(device, quick)
    out = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)   # the tiny MLP trains fastest on one thread (no OpenMP barriers)
    with _restore_threads(threads), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for preset, sde_name, methods in (("toy", "cld", ("sscs", "em")), ("toy-vpsde", "vpsde", ("em",))):
            res = ToyResult(sde_name, steps, 0.0)
            out.append(res)
            skip = common.budget_note(45.0)
            if skip:
                res.na = skip
                continue
            try:
                cfg = get_preset(preset, steps=steps, device=str(device), precision="fp32", log_every=10**9,
                                 ckpt_every=0, sample_every=0, quality_figure=False, seed=0)
                trainer = Trainer(cfg, f"{tmp}/{preset}", progress=False, verbose=False)
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                common.sync(device)
                res.train_seconds = time.perf_counter() - t0
                net = trainer.ema_network()
                g = torch.Generator(device=device).manual_seed(777)
                ref = trainer.data.reference(n, g)
                res.floor = energy_distance(trainer.data.reference(n, g), ref)
                for m in methods:
                    res.energy[m] = {}
                    for nfe in nfes:
                        smp = trainer.sample(n, nfe, m, seed=2024, network=net)
                        res.energy[m][nfe] = energy_distance(smp.x, ref)
                log(f"  toy {sde_name}: {steps} steps in {res.train_seconds:.1f} s; " +
                    "; ".join(f"{m} " + ", ".join(f"{k}:{v:.4f}" for k, v in d.items()) for m, d in res.energy.items()))
            except Exception as exc:  # noqa: BLE001
                res.na = f"toy {sde_name} training failed: {common.short_error(exc)}"
                log("  " + res.na)
    return out


@contextlib.contextmanager
def _restore_threads(n: int):
    try:
        yield
    finally:
        torch.set_num_threads(n)


def render(study: StudyResult, toy: List[ToyResult], device: torch.device, quick: bool, notes: common.Footnotes) -> str:
    lines = ["#### Exact-score sampler study (`bench/sampler_quality.py`)", ""]
    if study.status == "ok":
        lines.append(f"Called `{study.detail}` ({study.seconds:.0f} s); `python bench/sampler_quality.py` runs the "
                     "full study.")
        lines.append("")
        lines.append(study.markdown)
    else:
        lines.append(f"{study.status} {notes.ref(study.detail)}")
    lines.append("")
    lines.append("#### Toy training: CLD (HSM, SSCS / EM) vs VP-SDE (DSM, EM) at equal NFE")
    lines.append("")
    steps, n, nfes = toy_budget(device, quick)
    n_ed = notes.ref(
        f"Energy distance between {n:,} EMA samples and {n:,} fresh data points (multimodal swiss roll), lower is "
        "better; 'data vs data' is the same statistic between two fresh data sets (the floor). Both models: the "
        f"official toy MLP, {steps:,} Adam steps at batch 512, fp32, cld_fast.train.Trainer presets 'toy' and "
        "'toy-vpsde'" + (" (one torch thread on a CPU)" if device.type == "cpu" else "") + ". Short budget: this compares the two SDEs at equal training cost and equal NFE, it does not "
        "reproduce the paper's numbers.")
    header = ["SDE / sampler", "train steps", "train s"] + [f"NFE {k}" for k in nfes] + [f"data vs data {n_ed}"]
    rows = []
    for r in toy:
        if r.na:
            rows.append([r.sde, "-", "-"] + [notes.na(r.na)] + ["-"] * len(nfes))
            continue
        for m, d in r.energy.items():
            label = ("CLD" if r.sde == "cld" else "VP-SDE") + f" / {m.upper()}"
            rows.append([label, f"{r.train_steps:,}", common.fmt(r.train_seconds)]
                        + [common.fmt(d.get(k), 3) for k in nfes] + [common.fmt(r.floor, 3)])
    lines.append(common.md_table(header, rows))
    return "\n".join(lines)
