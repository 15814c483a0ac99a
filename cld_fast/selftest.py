"""``cld-fast selftest``: every op of every backend on one device against the float64 torch reference.

For each op of ``cld_fast.opdefs.OPS`` the self-test builds inputs at a few odd shapes (``SHAPES``:
D = 1, a (3, 7, 5) image batch, and strided views with an expanded time vector), runs it on every
requested backend that can run here and supports the device and dtype (float32 and float64 states),
and compares the result with the op's torch ``reference`` evaluated in float64 on the CPU, fed the
same inputs rounded to the tested dtype. Every op is run in several variants (explicit noise, no
noise, seed mode, objectives, weightings, reductions, ``mixed``, affine kinds, the last grid step);
seed-mode variants (in-kernel Philox noise) form their own rows with a looser tolerance, since the
normals of different backends differ by float32 rounding of log / cos / sin. Separately, the raw
Philox words of each backend (``cld_fast._C._philox_probe``, ``triton_kernels.philox.philox_bits``,
the torch reference on the device) must equal the reference's bit for bit, and its normals must
agree with the reference's to float32 rounding.

Error measure (``max_err``): max over elements of |got - want| / max(|want|, ERR_FLOOR), i.e.
relative error, absolute below ERR_FLOOR = 1. Tolerances (measured maxima on CPU in brackets, in
the table of the report these are per row): float64 ``FLOAT64_TOL`` (3.6e-15), float32
``FLOAT32_TOL`` (1.4e-6), seed mode ``SEED_TOL`` (2.1e-6), Philox normals ``NORMALS_TOL`` (6.0e-7),
Philox words exact. Mutating ops run on fresh copies; write targets start as NaN and strided targets
must not be written outside their view. A backend that raises gives a failed row with the message.

    from cld_fast.selftest import run_selftest
    report = run_selftest()               # the current device (cuda if available), all backends
    print(report.to_text()); assert report.passed
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import backends as _registry
from . import opdefs, philox
from .sde import AFFINE_KIND_CODES, CLD, OBJECTIVE_CODES, OUTPUT_CODES, WEIGHTING_CODES, kernel_params
from .samplers.gddim import gddim_table

# ---- tolerances (see the module docstring for the error measure) --------------------------------

ERR_FLOOR = 1.0
"""|want| below this counts as this: the error is relative above 1 and absolute below."""
FLOAT64_TOL = 1e-10
"""float64 state, explicit or no noise: measured <= 3.6e-15 on the cpu / torch / triton backends."""
FLOAT32_TOL = 2e-5
"""float32 state, explicit or no noise: measured <= 1.4e-6 (float32 rounding of coefficients and FMAs)."""
SEED_TOL = 2e-5
"""Seed mode (in-kernel Philox normals), either state dtype: measured <= 2.1e-6."""
NORMALS_TOL = 2e-6
"""Philox normals of a backend against the reference's (float32 log / cos / sin): measured <= 1.8e-7 on
triton / cuda, 6.0e-7 on cpu (its Box-Muller does not round the angle 2 pi u2 to float32 first)."""
TOLERANCES = {torch.float64: FLOAT64_TOL, torch.float32: FLOAT32_TOL}

MODE_EXPLICIT = "explicit"  # explicit noise tensors, or no noise
MODE_SEED = "seed"  # in-kernel Philox noise from a seed tensor
PHILOX = "philox"  # the op column of the Philox rows (modes "bits" and "normals")

SDE = CLD(beta0=3.0, beta1=5.0, numerical_eps=1e-6)
"""The CLD of every op input (beta1 != 0 so the time-dependent beta terms are exercised)."""
TS = (1.0, 0.7, 0.45, 0.2, 0.05)
"""The sampler time grid (4 steps; step 3 is the last one: no opening half step after it)."""
SEED = 2 ** 40 + 12345  # seed of the seed-mode variants (both Philox key words non-zero)
PROBE_SEED = 2 ** 62 - 12347
PROBE_STEP = 2 ** 32 + 7  # counter word c2 takes the low 32 bits
PROBE_TAG = philox.TAG_SSCS
PROBE_N = 64
PROBE_STARTS = (0, 2 ** 32 - PROBE_N // 2)  # the second crosses into the high counter word c1


@dataclass(frozen=True)
class Shape:
    """One input shape: ``batch`` samples of data shape ``data`` (D = prod(data) elements each).

    ``sliced``: every float tensor argument is a stride-2 view of a NaN-filled buffer (in-place and
    output targets too). ``expanded_t``: t is one value expanded to (B,) (stride 0). ``step``: the
    step of the sampler ops on ``TS``. ``time_dtype``: the dtype of t.
    """

    label: str
    batch: int
    data: Tuple[int, ...]
    step: int
    time_dtype: torch.dtype = torch.float32
    sliced: bool = False
    expanded_t: bool = False

    @property
    def d(self) -> int:
        return math.prod(self.data)


SHAPES = (
    Shape("3x1", 3, (1,), step=0, time_dtype=torch.float32),
    Shape("5x3x7x5", 5, (3, 7, 5), step=2, time_dtype=torch.float64),
    Shape("4x13 sliced", 4, (13,), step=3, time_dtype=torch.float32, sliced=True, expanded_t=True),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[2])


@dataclass
class SelftestRow:
    """One line of the report: ``passed`` is True / False, or None for a skipped check."""

    backend: str
    op: str
    dtype: str
    shape: str
    max_err: Optional[float]
    tol: Optional[float]
    passed: Optional[bool]
    note: str = ""
    mode: str = ""

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else ("pass" if self.passed else "FAIL")


_COLUMNS = ("backend", "op", "mode", "dtype", "shape", "max_err", "tol", "result", "note")


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


@dataclass
class SelftestReport:
    """The rows of a self-test run on ``device``; ``passed`` when nothing failed and something ran."""

    device: str
    rows: List[SelftestRow] = field(default_factory=list)
    backends_run: List[str] = field(default_factory=list)
    backends_skipped: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_passed(self) -> int:
        return sum(r.passed is True for r in self.rows)

    @property
    def n_failed(self) -> int:
        return sum(r.passed is False for r in self.rows)

    @property
    def n_skipped(self) -> int:
        return sum(r.passed is None for r in self.rows)

    @property
    def passed(self) -> bool:
        return self.n_failed == 0 and self.n_passed > 0

    def failures(self) -> List[SelftestRow]:
        return [r for r in self.rows if r.passed is False]

    def summary(self) -> str:
        """The final line: ``selftest: N passed, M failed, K skipped``."""
        return f"selftest: {self.n_passed} passed, {self.n_failed} failed, {self.n_skipped} skipped"

    def _cells(self) -> List[List[str]]:
        return [[r.backend, r.op, r.mode or "-", r.dtype, r.shape, _fmt(r.max_err), _fmt(r.tol), r.status,
                 r.note] for r in self.rows]

    def to_text(self) -> str:
        """The rows as a plain text table with aligned columns."""
        cells = [list(_COLUMNS)] + self._cells()
        widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS) - 1)]
        lines = []
        for c in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths)) + ("  " + c[-1] if c[-1] else ""))
        return "\n".join(line.rstrip() for line in lines)

    def to_markdown(self) -> str:
        """A Markdown document: device, backends, the table and the summary line."""
        ran = ", ".join(self.backends_run) or "none"
        out = [f"# cld-fast selftest on {self.device}", "", f"backends run: {ran}"]
        for name, why in self.backends_skipped.items():
            out.append(f"- {name} skipped: {why}")
        out += ["", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        for c in self._cells():
            out.append("| " + " | ".join(v.replace("|", "\\|") for v in c) + " |")
        out += ["", f"{self.summary()} ({self.seconds:.1f} s)", ""]
        return "\n".join(out)


# ---- op inputs ----------------------------------------------------------------------------------


class _State:
    """A float argument in the state dtype: (B, D) / (B, K, D) / (B,) / 0-d, laid out per shape."""

    def __init__(self, value: torch.Tensor, sliced: bool = False):
        self.value, self.sliced = value, sliced and value.dim() >= 1

    def make(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        v = self.value.to(dtype)
        if not self.sliced:
            return v.to(device).clone()
        buf = torch.full(v.shape[:-1] + (2 * v.shape[-1],), float("nan"), dtype=dtype, device=device)
        view = buf[..., ::2]
        view.copy_(v)
        return view

    def ref(self, dtype: torch.dtype) -> torch.Tensor:
        return self.value.to(dtype).to(torch.float64, copy=True)  # a copy: in-place references write it


class _Fixed:
    """A tensor passed as it is (ts, step, seed), moved to the device."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def make(self, dtype, device):
        return self.value.to(device).clone()

    def ref(self, dtype):
        return self.value.clone()


class _Times:
    """t: (B,) in the shape's time dtype, or one value expanded to (B,)."""

    def __init__(self, value: torch.Tensor, shape: Shape):
        self.shape = shape
        self.value = value[:1] if shape.expanded_t else value

    def make(self, dtype, device):
        t = self.value.to(self.shape.time_dtype).to(device, copy=True)
        return t.expand(self.shape.batch) if self.shape.expanded_t else t

    def ref(self, dtype):
        return self.make(dtype, torch.device("cpu"))


class _Params:
    """The (5,) float64 ``sde`` tensor of ``SDE`` on the device."""

    def make(self, dtype, device):
        return kernel_params(SDE, device)

    def ref(self, dtype):
        return kernel_params(SDE, "cpu")


def _make(args, dtype, device):
    return [a.make(dtype, device) if hasattr(a, "make") else a for a in args]


def _ref(args, dtype):
    return [a.ref(dtype) if hasattr(a, "ref") else a for a in args]


@dataclass
class _Variant:
    mode: str
    label: str
    args: list


def _variants(name: str, shape: Shape, gen: torch.Generator) -> List[_Variant]:
    """The calls of op ``name`` at ``shape``: explicit-noise / noise-free ones, then seed-mode ones."""
    b, d, sl = shape.batch, shape.d, shape.sliced

    def randn(*size):
        return _State(torch.randn(*size, generator=gen, dtype=torch.float64), sl)

    def target(*size):  # an output buffer: NaN, so an element the kernel does not write fails
        return _State(torch.full(size, float("nan"), dtype=torch.float64), sl)

    t = _Times(torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.01, shape)
    p = _Params()
    ts = _Fixed(torch.tensor(TS, dtype=torch.float64))
    step = _Fixed(torch.tensor([shape.step], dtype=torch.int64))
    seed = _Fixed(torch.tensor([SEED], dtype=torch.int64))
    x0, v0, u, out, y = randn(b, d), randn(b, d), randn(b, 2, d), randn(b, d), randn(b, d)
    eps1, eps2, eps4 = randn(b, d), randn(b, 2, d), randn(b, 4, d)
    grad_b = _State(torch.rand(b, generator=gen, dtype=torch.float64) + 0.5, sl)
    grad_0 = _State(torch.tensor(0.75, dtype=torch.float64))
    hsm, dsm = OBJECTIVE_CODES["hsm"], OBJECTIVE_CODES["dsm"]
    rw, lik, rw1 = WEIGHTING_CODES["reweightedv2"], WEIGHTING_CODES["likelihood"], WEIGHTING_CODES["reweightedv1"]
    mix, eps_out, score_out = OUTPUT_CODES["mixed"], OUTPUT_CODES["eps"], OUTPUT_CODES["score"]
    em, den, pf = AFFINE_KIND_CODES["em"], AFFINE_KIND_CODES["denoise"], AFFINE_KIND_CODES["pf_drift"]
    E, S = MODE_EXPLICIT, MODE_SEED

    def pout():
        return target(b, 2, d)

    def obs(noise):  # an inpainting condition: x_obs, a 0/1 mask[, the replacement noise]
        v = torch.randn(b, 4 if noise else 2, d, generator=gen, dtype=torch.float64)
        v[:, 1] = (torch.rand(b, d, generator=gen) < 0.5).double()
        return _State(v, sl)

    if name == "perturb":  # (x0, v0, t, sde, objective, eps, seed, out)
        return [_Variant(E, "hsm eps", [x0, None, t, p, hsm, eps2, None, pout()]),
                _Variant(E, "hsm mean", [x0, None, t, p, hsm, None, None, pout()]),
                _Variant(E, "dsm v0 eps", [x0, v0, t, p, dsm, eps2, None, pout()]),
                _Variant(S, "hsm seed", [x0, None, t, p, hsm, None, seed, pout()]),
                _Variant(S, "dsm v0 seed", [x0, v0, t, p, dsm, None, seed, pout()])]
    if name == "hsm_loss_fwd":  # (out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output)
        return [_Variant(E, "reweightedv2 none", [out, u, t, p, rw, 1.0, 0, eps1, None, hsm, mix]),
                _Variant(E, "likelihood sum", [out, u, t, p, lik, 0.5, 1, eps1, None, hsm, mix]),
                _Variant(E, "reweightedv1 dsm none", [out, u, t, p, rw1, 1.0, 0, eps1, None, dsm, mix]),
                _Variant(E, "likelihood dsm eps-output none", [out, u, t, p, lik, 1.0, 0, eps1, None, dsm, eps_out]),
                _Variant(E, "reweightedv2 score-output sum", [out, u, t, p, rw, 0.5, 1, eps1, None, hsm, score_out]),
                _Variant(S, "reweightedv2 sum seed", [out, u, t, p, rw, 1.0 / b, 1, None, seed, hsm, mix]),
                _Variant(S, "likelihood none seed", [out, u, t, p, lik, 0.25, 0, None, seed, hsm, mix]),
                _Variant(S, "reweightedv1 dsm score-output none seed",
                         [out, u, t, p, rw1, 0.25, 0, None, seed, dsm, score_out])]
    if name == "hsm_loss_bwd":  # (grad, out, u, t, sde, weighting, scale, eps_v, seed, objective, output)
        return [_Variant(E, "reweightedv2 grad (B,)", [grad_b, out, u, t, p, rw, 1.0, eps1, None, hsm, mix]),
                _Variant(E, "likelihood grad ()", [grad_0, out, u, t, p, lik, 0.5, eps1, None, hsm, mix]),
                _Variant(E, "reweightedv1 dsm grad (B,)", [grad_b, out, u, t, p, rw1, 1.0, eps1, None, dsm, mix]),
                _Variant(E, "likelihood score-output grad ()",
                         [grad_0, out, u, t, p, lik, 0.5, eps1, None, dsm, score_out]),
                _Variant(S, "reweightedv2 grad () seed", [grad_0, out, u, t, p, rw, 1.0 / b, None, seed, hsm, mix]),
                _Variant(S, "likelihood grad (B,) seed", [grad_b, out, u, t, p, lik, 0.25, None, seed, hsm, mix]),
                _Variant(S, "reweightedv1 eps-output grad (B,) seed",
                         [grad_b, out, u, t, p, rw1, 0.25, None, seed, hsm, eps_out])]
    if name == "hsm_loss_fwd_grad":  # hsm_loss_fwd's arguments, then grad_out (B, D): the gradient is compared
        return [_Variant(E, "reweightedv2 none", [out, u, t, p, rw, 1.0, 0, eps1, None, hsm, mix, target(b, d)]),
                _Variant(E, "likelihood dsm eps-output sum",
                         [out, u, t, p, lik, 0.5, 1, eps1, None, dsm, eps_out, target(b, d)]),
                _Variant(S, "reweightedv2 sum seed", [out, u, t, p, rw, 1.0 / b, 1, None, seed, hsm, mix, target(b, d)]),
                _Variant(S, "reweightedv1 score-output none seed",
                         [out, u, t, p, rw1, 0.25, 0, None, seed, hsm, score_out, target(b, d)])]
    if name == "mixed_score":  # (out, u, t, sde, objective, output)
        return [_Variant(E, f"{obj} {outp}", [out, u, t, p, OBJECTIVE_CODES[obj], OUTPUT_CODES[outp]])
                for obj in OBJECTIVE_CODES for outp in OUTPUT_CODES]
    if name == "half_step_":  # (u, ts, step, sde, eps, seed, obs)
        return [_Variant(E, "eps", [u, ts, step, p, eps2, None]),
                _Variant(E, "no noise", [u, ts, step, p, None, None]),
                _Variant(E, "eps obs eps", [u, ts, step, p, eps2, None, obs(True)]),
                _Variant(E, "no noise obs mean", [u, ts, step, p, None, None, obs(False)]),
                _Variant(S, "seed", [u, ts, step, p, None, seed]),
                _Variant(S, "seed obs seed", [u, ts, step, p, None, seed, obs(False)])]
    y_un, w = randn(b, d), 1.5  # classifier-free guidance: y_uncond, guide_weight
    if name == "sscs_step_":  # (u, y, ts, step, sde, mixed, eps, seed, official_half, obs, y_uncond, guide_weight)
        return [_Variant(E, "eps", [u, y, ts, step, p, False, eps4, None, False]),
                _Variant(E, "mixed eps", [u, y, ts, step, p, True, eps4, None, False]),
                _Variant(E, "mixed no noise", [u, y, ts, step, p, True, None, None, False]),
                _Variant(E, "mixed eps official half steps", [u, y, ts, step, p, True, eps4, None, True]),
                _Variant(E, "mixed eps obs eps", [u, y, ts, step, p, True, eps4, None, False, obs(True)]),
                _Variant(S, "mixed seed obs seed", [u, y, ts, step, p, True, None, seed, False, obs(False)]),
                _Variant(S, "seed", [u, y, ts, step, p, False, None, seed, False]),
                _Variant(S, "mixed seed", [u, y, ts, step, p, True, None, seed, False]),
                _Variant(S, "official half steps seed", [u, y, ts, step, p, False, None, seed, True]),
                _Variant(E, "mixed eps guided", [u, y, ts, step, p, True, eps4, None, False, None, y_un, w]),
                _Variant(S, "mixed seed obs seed guided",
                         [u, y, ts, step, p, True, None, seed, False, obs(False), y_un, w])]
    if name == "affine_step":  # (u, y, ts, step, sde, kind, mixed, eps, seed, out, obs, y_uncond, guide_weight)
        return [_Variant(E, "em eps", [u, y, ts, step, p, em, False, eps1, None, pout()]),
                _Variant(E, "em mixed eps", [u, y, ts, step, p, em, True, eps1, None, pout()]),
                _Variant(E, "denoise", [u, y, ts, step, p, den, False, None, None, pout()]),
                _Variant(E, "denoise mixed", [u, y, ts, step, p, den, True, None, None, pout()]),
                _Variant(E, "pf_drift", [u, y, ts, step, p, pf, False, None, None, pout()]),
                _Variant(E, "pf_drift mixed", [u, y, ts, step, p, pf, True, None, None, pout()]),
                _Variant(S, "em seed", [u, y, ts, step, p, em, False, None, seed, pout()]),
                _Variant(S, "em mixed seed", [u, y, ts, step, p, em, True, None, seed, pout()]),
                _Variant(E, "em mixed eps obs eps", [u, y, ts, step, p, em, True, eps1, None, pout(), obs(True)]),
                _Variant(E, "denoise mixed obs", [u, y, ts, step, p, den, True, None, None, pout(), obs(False)]),
                _Variant(S, "em mixed seed obs seed", [u, y, ts, step, p, em, True, None, seed, pout(), obs(False)]),
                _Variant(E, "em mixed eps guided", [u, y, ts, step, p, em, True, eps1, None, pout(), None, y_un, w]),
                _Variant(E, "denoise mixed obs guided",
                         [u, y, ts, step, p, den, True, None, None, pout(), obs(False), y_un, w]),
                _Variant(S, "em seed guided", [u, y, ts, step, p, em, False, None, seed, pout(), None, y_un, w])]
    if name == "gddim_step_":  # (u, hist, y, table, step, ts, sde, seed, obs, y_uncond, guide_weight); a real table,
        # a ring with earlier values
        table = _Fixed(gddim_table(SDE, torch.tensor(TS, dtype=torch.float64), 3, "eps", mixed=True))
        return [_Variant(E, "order 3 eps_R", [u, randn(2, b, 2, d), y, table, step]),
                _Variant(E, "order 2 x0_hat", [u, randn(1, b, 1, d), y, table, step]),
                _Variant(E, "order 1", [u, randn(0, b, 2, d), y, table, step]),
                _Variant(E, "order 2 eps_R obs eps", [u, randn(1, b, 2, d), y, table, step, ts, p, None, obs(True)]),
                _Variant(E, "order 2 eps_R obs mean", [u, randn(1, b, 2, d), y, table, step, ts, p, None, obs(False)]),
                _Variant(S, "order 2 eps_R obs seed", [u, randn(1, b, 2, d), y, table, step, ts, p, seed, obs(False)]),
                _Variant(E, "order 3 eps_R guided",
                         [u, randn(2, b, 2, d), y, table, step, None, None, None, None, y_un, w]),
                _Variant(S, "order 2 x0_hat obs seed guided",
                         [u, randn(1, b, 1, d), y, table, step, ts, p, seed, obs(False), y_un, w])]
    raise NotImplementedError(f"selftest: no inputs for op {name!r}; add them to cld_fast/selftest.py")


def _output_index(d: opdefs.OpDef) -> Optional[int]:
    """Position of the argument the op writes (None: the op returns its result)."""
    if not d.mutates:
        return None
    names = [a.name for a in torch._C.parse_schema(d.qualified_schema()).arguments]
    return names.index(d.mutates[0])


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(|want|, ERR_FLOOR) in float64 on the CPU; inf for a non-finite mismatch."""
    g = got.detach().to("cpu", torch.float64)
    w = want.detach().to("cpu", torch.float64)
    if g.numel() == 0:
        return 0.0
    finite = torch.isfinite(w)
    if not bool(torch.equal(torch.isfinite(g), finite)):
        return math.inf
    diff = ((g - w).abs() / w.abs().clamp(min=ERR_FLOOR))[finite]
    return float(diff.max()) if diff.numel() else 0.0


def _short(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split())
    msg = f"{type(exc).__name__}: {msg}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _run_variant(fn: Callable, d: opdefs.OpDef, variant: _Variant, dtype, device, want) -> Tuple[float, str]:
    """(error, problem) of one backend call against the reference output ``want``."""
    args = _make(variant.args, dtype, device)
    index = _output_index(d)
    res = fn(*args)
    if index is not None:
        got = args[index]
        base = got._base
        if base is not None and base.shape[-1] == 2 * got.shape[-1]:  # a strided target: gaps untouched
            if not bool(base[..., 1::2].isnan().all()):
                return math.inf, "wrote outside the strided view"
    else:
        got = res
        expected = d.fake(*args)
        if not isinstance(got, torch.Tensor):
            return math.inf, f"returned {type(got).__name__}, not a tensor"
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return math.inf, (f"returned {tuple(got.shape)} {got.dtype}, declared "
                              f"{tuple(expected.shape)} {expected.dtype}")
    if got.device.type != torch.device(device).type:
        return math.inf, f"result on {got.device}, expected {device}"
    return _error(got, want), ""


def _reference(d: opdefs.OpDef, variant: _Variant, dtype) -> torch.Tensor:
    """The reference output in float64 on the CPU for the inputs of ``variant`` rounded to ``dtype``."""
    args = _ref(variant.args, dtype)
    res = d.reference(*args)
    index = _output_index(d)
    return args[index] if index is not None else res


# ---- Philox -------------------------------------------------------------------------------------


def _probe_tensors(device):
    seed = torch.tensor([PROBE_SEED], dtype=torch.int64, device=device)
    step = torch.tensor([PROBE_STEP], dtype=torch.int64, device=device)
    return seed, step


def _reference_bits(start: int) -> torch.Tensor:
    """(4, PROBE_N) int64 reference words for the probe seed, step and tag from element ``start``."""
    return torch.stack(philox.philox_bits(PROBE_N, PROBE_SEED, PROBE_STEP, PROBE_TAG, start=start))


def _reference_normals(start: int) -> torch.Tensor:
    """(4, PROBE_N) float32 reference normals z0..z3 for the probe seed, step and tag from element ``start``."""
    r = _reference_bits(start)
    z0, z1 = philox.box_muller(philox.uniform_from_bits(r[0]), philox.uniform_from_bits(r[1]))
    z2, z3 = philox.box_muller(philox.uniform_from_bits(r[2]), philox.uniform_from_bits(r[3]))
    return torch.stack([z0, z1, z2, z3])


def _bits_check(backend: str, device: torch.device) -> Tuple[Optional[float], str]:
    """(number of differing words, note) of the backend's raw Philox words; (None, why) if it has no probe."""
    starts = ", ".join(str(s) for s in PROBE_STARTS)
    note = f"{len(PROBE_STARTS)} x 4 x {PROBE_N} words from element {starts}"
    bad = 0
    if backend == "torch":
        if device.type == "cpu":
            return 0.0, "the reference itself"
        seed, step = _probe_tensors(device)
        for start in PROBE_STARTS:
            got = torch.stack(philox.philox_bits(PROBE_N, seed, step, PROBE_TAG, start=start)).cpu()
            bad += int((got != _reference_bits(start)).sum())
        return float(bad), note + " (torch ops on the device)"
    if backend == "cpu":
        from ._extension import load_extension

        ext, why = load_extension()
        if ext is None or not hasattr(ext, "_philox_probe"):
            return None, f"no cld_fast._C._philox_probe ({why or 'not built'})"
        for start in PROBE_STARTS:
            bits, unif = ext._philox_probe(PROBE_SEED, start, PROBE_N, PROBE_STEP, PROBE_TAG)
            ref = _reference_bits(start)
            bad += int((bits != ref).sum()) + int((unif != philox.uniform_from_bits(ref)).sum())
        return float(bad), note + " and their uniforms (cld_fast._C._philox_probe)"
    if backend == "triton":
        from .triton_kernels import philox as tk_philox

        seed, step = _probe_tensors(device)
        for start in PROBE_STARTS:
            got = tk_philox.philox_bits(PROBE_N, seed, step, tag=PROBE_TAG, start=start).cpu()
            bad += int((got != _reference_bits(start)).sum())
        return float(bad), note + " (triton_kernels.philox.philox_bits)"
    return None, ("no device-side probe of the raw words; the host build of the same header is the cpu row, "
                  "the device draw is checked by the normals row and the seed-mode ops")


def _normals_check(backend: str, device: torch.device) -> Tuple[float, str]:
    """(error, note) of the backend's Philox normals against the reference's (float32)."""
    n = PROBE_N
    seed, step = _probe_tensors(device)
    if backend == "triton":
        from .triton_kernels import philox as tk_philox

        err = 0.0
        for start in PROBE_STARTS:
            got = tk_philox.philox_normals(n, seed, step, tag=PROBE_TAG, start=start)
            err = max(err, _error(got, _reference_normals(start)))
        return err, "z0..z3 (triton_kernels.philox.philox_normals)"
    if backend == "torch":
        if device.type == "cpu":
            return 0.0, "the reference itself"
        got = philox.philox_normals(n, seed, step, PROBE_TAG)
        return _error(got, philox.philox_normals(n, PROBE_SEED, PROBE_STEP, PROBE_TAG)), "torch ops on the device"
    # cpu / cuda: no probe of the normals; a half step from u = 0 in seed mode must equal the same
    # half step fed the reference's normals as explicit noise (a wrong word gives an O(1) error).
    b, dd, k = 4, 16, 1
    ts = torch.tensor(TS, dtype=torch.float64, device=device)
    kstep = torch.tensor([k], dtype=torch.int64, device=device)
    p = kernel_params(SDE, device)
    z = philox.philox_normals(b * dd, torch.tensor([SEED]), torch.tensor([k]), philox.TAG_HALF_STEP)
    eps = z[:2].view(2, b, dd).transpose(0, 1).contiguous().to(device)
    fn = _registry.get(backend).op("half_step_")
    seeded, fed = torch.zeros(b, 2, dd, device=device), torch.zeros(b, 2, dd, device=device)
    fn(seeded, ts, kstep, p, None, torch.tensor([SEED], dtype=torch.int64, device=device))
    fn(fed, ts, kstep, p, eps, None)
    return _error(seeded, fed), "half_step_ from u = 0: seed mode vs the reference normals as eps"


def _philox_rows(backend: str, device: torch.device) -> List[SelftestRow]:
    rows = []
    try:
        bad, note = _bits_check(backend, device)
        if bad is None:
            rows.append(SelftestRow(backend, PHILOX, "int64", f"4x{PROBE_N}", None, None, None, note, mode="bits"))
        else:
            rows.append(SelftestRow(backend, PHILOX, "int64", f"4x{PROBE_N}", bad, 0.0, bad == 0,
                                    note if bad == 0 else f"{int(bad)} words differ; {note}", mode="bits"))
    except Exception as exc:  # noqa: BLE001 - a failed row, never a crash
        rows.append(SelftestRow(backend, PHILOX, "int64", f"4x{PROBE_N}", math.inf, 0.0, False, _short(exc),
                                mode="bits"))
    try:
        err, note = _normals_check(backend, device)
        rows.append(SelftestRow(backend, PHILOX, "float32", f"4x{PROBE_N}", err, NORMALS_TOL, err <= NORMALS_TOL,
                                note, mode="normals"))
    except Exception as exc:  # noqa: BLE001
        rows.append(SelftestRow(backend, PHILOX, "float32", f"4x{PROBE_N}", math.inf, NORMALS_TOL, False,
                                _short(exc), mode="normals"))
    return rows


# ---- driver -------------------------------------------------------------------------------------


def _dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
    key = str(value).strip().lower().replace("torch.", "")
    if key not in names:
        raise ValueError(f"selftest: dtype must be float32 or float64, got {value!r}")
    return names[key]


def _backend_names(value: Optional[Iterable[str]]) -> List[str]:
    if value is None:
        return list(_registry.BACKEND_NAMES)
    if isinstance(value, str):
        value = [value]
    names = []
    for item in value:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in _registry.BACKEND_NAMES:
                raise ValueError(f"selftest: unknown backend {name!r}; expected one of {_registry.BACKEND_NAMES}")
            if name not in names:
                names.append(name)
    return names


def default_device() -> torch.device:
    """cuda (the current GPU) when available, else cpu."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_selftest(device: Union[str, torch.device, None] = None, backends: Optional[Sequence[str]] = None,
                 dtypes: Optional[Sequence[Union[str, torch.dtype]]] = None, quick: bool = False) -> SelftestReport:
    """Run every op of ``opdefs.OPS`` on every requested backend against the float64 torch reference.

    Args:
        device: where the backends run ("cpu", "cuda", "cuda:1", ...; default: cuda if available,
            else cpu). The reference always runs on the CPU in float64.
        backends: backend names (default: all of ``cld_fast.backends.BACKEND_NAMES``); one that can't
            run here, or does not support the device or a dtype, gives a skipped row saying why.
        dtypes: state dtypes, torch.float32 / torch.float64 or their names (default: both).
        quick: only the shapes of ``QUICK_SHAPES`` (D = 1 and the strided one).
    Returns:
        A ``SelftestReport``: one row per (backend, op, mode, dtype, shape) with the largest error over
        the op's variants (``max_err``, see the module docstring for the measure), the tolerance, and
        pass / fail / skip; plus two Philox rows per backend (raw words: number of differing words,
        tolerance 0; normals: float32 error). A backend that fails or raises gives failed rows.
    Raises:
        ValueError: an unknown backend or dtype name, or a device that is not cpu / an available cuda.
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"selftest: device {device} requested but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"selftest: device must be cpu or cuda, got {device}")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    names = _backend_names(backends)
    dts = [_dtype(x) for x in (dtypes if dtypes is not None else (torch.float32, torch.float64))]
    shapes = QUICK_SHAPES if quick else SHAPES
    report = SelftestReport(device=str(device))
    references: Dict[tuple, torch.Tensor] = {}
    for name in names:
        mod = _registry.get(name)
        if not mod.is_available():
            why = mod.why_unavailable() or "not available"
            report.backends_skipped[name] = why
            report.rows.append(SelftestRow(name, "*", "-", "-", None, None, None, f"unavailable: {why}"))
            continue
        ran = False
        for dtype in dts:
            dname = str(dtype).replace("torch.", "")
            if not mod.supports(device, dtype):
                report.rows.append(SelftestRow(name, "*", dname, "-", None, None, None,
                                               f"does not support {dname} states on {device.type}"))
                continue
            ran = True
            report.rows.extend(_op_rows(name, mod, device, dtype, shapes, references))
        if ran:
            report.backends_run.append(name)
            report.rows.extend(_philox_rows(name, device))
        else:
            report.backends_skipped[name] = f"does not support {device.type}"
    report.seconds = time.perf_counter() - start
    return report


def _op_rows(name, mod, device, dtype, shapes, references) -> List[SelftestRow]:
    rows = []
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        for oi, (op_name, d) in enumerate(opdefs.OPS.items()):
            gen = torch.Generator().manual_seed(1000 * SHAPES.index(shape) + oi)
            variants = _variants(op_name, shape, gen)
            try:
                fn = mod.op(op_name)
            except Exception as exc:  # noqa: BLE001
                fn, op_error = None, _short(exc)
            for mode in (MODE_EXPLICIT, MODE_SEED):
                group = [v for v in variants if v.mode == mode]
                if not group:
                    continue
                tol = TOLERANCES[dtype] if mode == MODE_EXPLICIT else max(TOLERANCES[dtype], SEED_TOL)
                results, problems = [], []
                for v in group:
                    label = v.label or op_name
                    if fn is None:
                        err, problem = math.inf, op_error
                    else:
                        try:
                            key = (op_name, shape.label, mode, v.label, dtype)
                            if key not in references:
                                references[key] = _reference(d, v, dtype)
                            err, problem = _run_variant(fn, d, v, dtype, device, references[key])
                        except Exception as exc:  # noqa: BLE001 - the backend raised: a failed row
                            err, problem = math.inf, _short(exc)
                    if problem or not err <= tol:
                        problems.append(f"{label}: {problem or 'max_err ' + _fmt(err)}")
                    results.append((err if err == err else math.inf, label))
                    if fn is None:
                        break
                worst, worst_label = max(results, key=lambda r: r[0])
                passed = not problems and worst <= tol
                note = "; ".join(problems) if problems else (f"worst: {worst_label}" if len(group) > 1 else "")
                rows.append(SelftestRow(name, op_name, dname, shape.label, worst, tol, passed, note, mode=mode))
    return rows
