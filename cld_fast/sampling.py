"""Samplers: SSCS, Euler-Maruyama and the probability-flow ODE for CLD; EM and ODE for the VP-SDE baseline.

    res = cf.sample(score_fn, (B, C, H, W), sde, steps=50)        # SSCS, the default for CLD
    res.x, res.v, res.nfe, res.u

Conventions (the official CLD-SGM sampler's): ``steps`` is the number of score evaluations (NFE)
including the optional final denoising step, so the SSCS / EM loop runs n = steps - 1 steps when
``denoise=True``. The grid comes from ``cld_fast.sde.time_grid`` (forward time t from 1 down to eps,
linear or quadratic striding), or is the caller's ``timesteps``; ``u=`` starts from a given state. All coefficients come from ``cld_fast.sde``; the loops only drive the
fused ops of ``cld_fast.ops`` with per-step tables, a (1,) int64 device step counter read in-kernel
and one Philox seed per run, so an SSCS or EM loop launches one fused kernel per network evaluation
and never synchronises with the host. The ODE solver (adaptive Dormand-Prince 5(4), written here)
keeps its state, step size and error norm on the device and reads back one small tensor per
attempted step: the accept/reject decision (one host synchronisation per attempted step).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import checks, ops, philox
from .score import NetworkScore
from .sde import CLD, GDDIM_PREDICTIONS, STRIDINGS, VPSDE, time_grid

_DTYPES = (torch.float32, torch.float64)
MAX_STEPS = 1_000_000  # far beyond any useful run; above it the per-step tables alone need gigabytes
ODE_MAX_NFE = 10_000   # default score-evaluation budget of method="ode"


class SamplingError(RuntimeError):
    """A sampler could not produce usable samples (see the subclasses)."""


class NonFiniteSamplesError(SamplingError):
    """The final samples hold NaN or inf (checked once, after the loop). ``result``: the SampleResult."""

    def __init__(self, message: str, result: "SampleResult"):
        super().__init__(message)
        self.result = result


class NFEBudgetError(SamplingError):
    """The ODE solver used up ``max_nfe`` score evaluations before reaching t = eps. ``t``: the forward
    time it reached; ``nfe``: evaluations spent."""

    def __init__(self, message: str, t: float, nfe: int):
        super().__init__(message)
        self.t, self.nfe = t, nfe


@dataclass
class SampleResult:
    """What ``cf.sample`` returns.

    x: (B, C, ...) samples of the data shape (the first C channels of u).
    v: (B, C, ...) final velocities (None for a VP-SDE).
    nfe: number of score-function (network) evaluations, the denoising step included.
    u: (B, 2C, ...) the final state (x and v stacked on dim 1; equal to x for a VP-SDE).
    """

    x: torch.Tensor
    v: Optional[torch.Tensor]
    nfe: int
    u: torch.Tensor


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _check_shape(shape) -> tuple:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must be a tuple of ints (the data shape (B, C, ...) or (B, D)), got {shape!r}")
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be the data shape (B, C, ...) or (B, D) with at least 2 dimensions, got {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must have positive sizes, got {shape}")
    return shape


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float in (0, 1), got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 < eps < 1.0) or not math.isfinite(eps):
        raise ValueError(f"eps must lie in (0, 1) (the last forward time), got {eps}")
    return eps


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the number of score evaluations, denoising included), got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps = {steps} is more than cld_fast supports ({MAX_STEPS:,} score evaluations); "
                         "a few hundred steps already match the reverse SDE closely")
    return steps


def _check_sde(sde):
    if not isinstance(sde, (CLD, VPSDE)):
        raise TypeError(f"sde must be a cld_fast.CLD or cld_fast.VPSDE, got {type(sde).__name__}")


def _check_striding(striding):
    if striding not in STRIDINGS:
        raise ValueError(f"striding must be one of {STRIDINGS}, got {striding!r}")


def _check_dtype(dtype):
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_score_callable(score_fn):
    if isinstance(score_fn, torch.nn.Module):
        raise TypeError(f"score_fn is a raw network ({type(score_fn).__name__}): its output is not a score. Wrap it "
                        "with cf.score_fn(model, sde) (mixed-score output, the official convention) or "
                        "cf.score_fn(model, sde, mixed=False) (the network outputs grad_v log p_t(u) itself)")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(u, t), got {type(score_fn).__name__}")


def _check_timesteps(timesteps) -> torch.Tensor:
    """A custom grid of forward times -> (n + 1,) float64 CPU tensor, strictly decreasing, in (0, 1]."""
    if isinstance(timesteps, torch.Tensor):
        if not (timesteps.is_floating_point() or timesteps.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"timesteps must be a real tensor of forward times, got dtype {timesteps.dtype}")
        ts = timesteps.detach().to("cpu", torch.float64)
    elif isinstance(timesteps, (list, tuple)):
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in timesteps):
            raise TypeError("timesteps must be a 1-D tensor or a list of floats (forward times)")
        ts = torch.tensor([float(t) for t in timesteps], dtype=torch.float64)
    else:
        raise TypeError(f"timesteps must be a 1-D tensor or a list of floats, got {type(timesteps).__name__}")
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with at least 2 forward times (start, ..., end), got shape "
                         f"{tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()) or not bool(((ts > 0) & (ts <= 1)).all()):
        raise ValueError(f"timesteps must lie in (0, 1] (forward times, t = 0 is data), got {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing (from noise towards data), got {ts.tolist()}")
    return ts


def _callback_style(callback) -> Optional[str]:
    """"args" for callback(i, t, u), "dict" for a k-diffusion-style callback(info), None for no callback."""
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError("callback must be callable as callback(i, t, u) or callback(info) (a dict)")
    try:
        sig = inspect.signature(callback)
    except (TypeError, ValueError):  # builtins without a signature: the positional form
        return "args"
    for style, args in (("args", (0, 1.0, None)), ("dict", ({},))):
        try:
            sig.bind(*args)
            return style
        except TypeError:
            pass
    raise TypeError(f"callback must accept (i, t, u) or one dict argument, got signature {sig}")


def _dict_callback(callback):
    def call(i, t, u):
        callback({"x": u, "i": i, "t": t})

    return call


def _default_device(score_fn, generator, device, u=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if u is not None:
        return u.device
    if isinstance(score_fn, NetworkScore) and isinstance(score_fn.model, torch.nn.Module):
        for p in score_fn.model.parameters():
            return p.device
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def _state_shape(shape, sde) -> tuple:
    if isinstance(sde, CLD):
        return (shape[0], 2 * shape[1]) + tuple(shape[2:])
    return tuple(shape)


def prior(sde, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """``sde.prior_sampling`` on ``device`` with a generator that may live on another device."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if generator is not None and generator.device.type != device.type:
        return sde.prior_sampling(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# score evaluation
# ----------------------------------------------------------------------------------------------
class _Evaluator:
    """Calls the score function and checks what it returns (metadata only: no host sync).

    For a ``NetworkScore`` with the mixed parameterisation and the sampler's own CLD, ``fold`` is True:
    the raw network output is returned and the fused step kernels fold the mixed-score coefficients
    in themselves (``mixed=True``), so the output goes straight into the kernel.
    """

    def __init__(self, score_fn, sde, x_shape, fold_ok: bool = True):
        _check_score_callable(score_fn)
        self.fold = bool(fold_ok and isinstance(score_fn, NetworkScore) and score_fn.hsm_mixed
                         and isinstance(sde, CLD) and score_fn.sde == sde)
        self.fn = score_fn.raw if self.fold else score_fn
        self.x_shape = tuple(x_shape)
        self.sde = sde
        self.calls = 0

    def __call__(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.fn(u, t)
        self.calls += 1
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"score_fn(u, t) must return a tensor, got {type(y).__name__}")
        if tuple(y.shape) != self.x_shape:
            raise ValueError(f"score_fn(u, t) must return the data shape {self.x_shape} "
                             f"(grad_v log p_t(u) for u of shape {tuple(u.shape)}), got {tuple(y.shape)}")
        if y.dtype not in checks.OUTPUT_DTYPES:
            raise TypeError(f"score_fn(u, t) returned dtype {y.dtype}; expected a floating-point tensor")
        if y.device != u.device:
            raise ValueError(f"score_fn(u, t) returned a tensor on {y.device} but u is on {u.device}")
        return y


# ----------------------------------------------------------------------------------------------
# fixed-step plans (shared by cf.sample and cf.SSCSScheduler, so both give the same samples)
# ----------------------------------------------------------------------------------------------
class _FixedPlan:
    """The time grid of a fixed-step run, on the device.

    ts: (n + 1,) float64 CPU grid (forward times, 1 -> eps); times: the ``steps`` forward times at
    which the score is evaluated (host floats: the loop times, then eps when denoising).
    grid: ts on the device in float64, read by the fused kernels (step i runs ts[i] -> ts[i + 1]);
    t_net: ts in the state dtype, the network's times (t_net[i] = ts[i]).
    opening: (2,) device grid of the SSCS opening half step (ts[0] -> ts[0] - h_0 / 2).
    denoise_grid: (2,) device grid (eps, 0) of the final noise-free step at t = eps of size eps.
    VP-SDE runs keep a (n, 3) table of ``VPSDE.reverse_coefficients`` (plain torch ops).
    ``ts``: a custom grid (checked by ``_check_timesteps``) instead of ``time_grid``; it fixes
    n = len(ts) - 1, eps = ts[-1] and steps = n (+ 1 when denoising).
    """

    def __init__(self, sde, steps, eps, striding, denoise, device, dtype, ts: Optional[torch.Tensor] = None):
        if ts is not None:
            steps, eps = ts.numel() - 1 + int(denoise), float(ts[-1])
        self.steps = steps
        self.eps = eps
        self.denoise = denoise
        self.n = steps - 1 if denoise else steps
        self.device = torch.device(device)
        self.dtype = dtype
        n = self.n
        if ts is not None:
            self.ts = ts.clone()
        else:
            self.ts = time_grid(n, eps, striding) if n >= 1 else torch.tensor([1.0], dtype=torch.float64)
        self.times: List[float] = self.ts[:-1].tolist() + ([eps] if denoise else [])
        self.grid = self.ts.to(self.device)
        self.t_net = self.grid.to(dtype)
        self.timesteps = torch.tensor(self.times, dtype=torch.float64).to(device=self.device, dtype=dtype)
        self.opening = self.table = None
        if n >= 1:
            t0, t1 = float(self.ts[0]), float(self.ts[1])
            self.opening = torch.tensor([t0, t0 - 0.5 * (t0 - t1)], dtype=torch.float64).to(self.device)
            if isinstance(sde, VPSDE):
                h = self.ts[:-1] - self.ts[1:]
                self.table = sde.reverse_coefficients(self.ts[:-1], h, "em").to(device=self.device, dtype=dtype)
        self.denoise_grid = torch.tensor([eps, 0.0], dtype=torch.float64).to(self.device)
        self.t_denoise = torch.full((1,), eps, dtype=torch.float64).to(device=self.device, dtype=dtype)
        self.zero_step = torch.zeros(1, dtype=torch.int64, device=self.device)


def _time_vector(t_grid: torch.Tensor, step: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) forward times t_grid[step], read on the device (no host sync)."""
    return t_grid.index_select(0, step).expand(batch)


# ----------------------------------------------------------------------------------------------
# loop driver: eager or CUDA graph, with progress bar and callback
# ----------------------------------------------------------------------------------------------
_GRAPH_WARNING = "cuda_graph=True: {why}; running the eager loop instead (same samples, one launch per op)"


def _warn_graph(why: str, stacklevel: int = 2):
    warnings.warn(_GRAPH_WARNING.format(why=why), RuntimeWarning, stacklevel=stacklevel + 1)


def _capture(one_step: Callable[[], None], device: torch.device):
    """Run ``one_step`` once for real (warm-up) on a side stream, then capture it in a CUDA graph.

    Returns the graph, or None (with a warning) if capture failed; the warm-up step has been taken
    either way. Capture records the kernels without running them, so a failed capture leaves the
    state as the warm-up step left it.
    """
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        one_step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            one_step()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager loop
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a sticky error resurfaces in the eager loop, with its own message
            pass
        _warn_graph(f"capturing one step in a CUDA graph failed ({type(exc).__name__}: {exc})", stacklevel=6)
        return None
    return graph


def _run_fixed(one_step, n: int, first: int, plan: _FixedPlan, u, bar, callback, cuda_graph: bool):
    """Take steps first .. first + n - 1 of ``plan.times`` with ``one_step``.

    Eager: one call per step. ``cuda_graph`` (CUDA state, n >= 2): step 0 runs eagerly on a side
    stream as the warm-up, one step is captured, and the graph is replayed n - 1 times.
    """
    if n <= 0:
        return
    i0 = 0
    graph = None
    if cuda_graph and u.device.type == "cuda" and n >= 2:  # sample() warned about the other cases
        graph = _capture(one_step, u.device)  # takes step 0 (the warm-up) for real
        _after(first, plan, u, bar, callback)
        i0 = 1
    for i in range(i0, n):
        if graph is not None:
            graph.replay()
        else:
            one_step()
        _after(first + i, plan, u, bar, callback)


def _after(i, plan, u, bar, callback):
    if bar is not None:
        bar.update(1)
    if callback is not None:
        callback(i, plan.times[i], u)


def _progress(progress: bool, total, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------
# SSCS and EM (CLD): one fused kernel per network evaluation, no host sync
# ----------------------------------------------------------------------------------------------
def _sscs_begin(plan: _FixedPlan, sde, u, seed, backend):
    """Opening half step of step 0 and a fresh step counter."""
    step = torch.zeros(1, dtype=torch.int64, device=u.device)
    if plan.n >= 1:
        ops.half_step_(u, plan.opening, sde, step=step, seed=seed, backend=backend)
    return step


def _sscs_step(plan: _FixedPlan, sde, u, y, step, mixed, seed, backend, official_half_steps=False):
    """The fused rest of step ``step`` (score Euler step, closing and next opening half steps)."""
    ops.sscs_step_(u, y, plan.grid, sde, step=step, mixed=mixed, seed=seed, backend=backend,
                   official_half_steps=official_half_steps)


def _cld_denoise(plan: _FixedPlan, sde, u, y, mixed, backend):
    """The official last step: a noise-free EM step of the reverse SDE at t = eps with step size eps."""
    ops.em_step_(u, y, plan.denoise_grid, sde, step=plan.zero_step, mixed=mixed, denoise=True, backend=backend)


def _run_sscs(run: "SamplerRun", plan: _FixedPlan):
    u, ev, batch = run.u, run.ev, run.u.shape[0]
    step = _sscs_begin(plan, run.sde, u, run.seed, run.backend)

    def one_step():
        y = ev(u, _time_vector(plan.t_net, step, batch))
        _sscs_step(plan, run.sde, u, y, step, ev.fold, run.seed, run.backend, run.sscs_official_half_steps)
        step.add_(1)

    _run_fixed(one_step, plan.n, 0, plan, u, run.bar, run.callback, run.cuda_graph)


def _run_cld_em(run: "SamplerRun", plan: _FixedPlan):
    u, ev, batch = run.u, run.ev, run.u.shape[0]
    step = torch.zeros(1, dtype=torch.int64, device=u.device)

    def one_step():
        y = ev(u, _time_vector(plan.t_net, step, batch))
        ops.em_step_(u, y, plan.grid, run.sde, step=step, mixed=ev.fold, seed=run.seed, backend=run.backend)
        step.add_(1)

    _run_fixed(one_step, plan.n, 0, plan, u, run.bar, run.callback, run.cuda_graph)


def _run_vp_em(run: "SamplerRun", plan: _FixedPlan):
    x, ev, batch = run.u, run.ev, run.u.shape[0]
    step = torch.zeros(1, dtype=torch.int64, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)

    def one_step():
        s = ev(x, _time_vector(plan.t_net, step, batch)).to(x.dtype)
        row = plan.table.index_select(0, step)  # (1, 3): c_x c_s sigma
        z = philox.philox_normals(x.numel(), run.seed, step, philox.TAG_AFFINE, device=x.device)[0]
        z = z.view(x.shape).to(x.dtype)
        x.copy_(row[:, 0].view(shape) * x + row[:, 1].view(shape) * s + row[:, 2].view(shape) * z)
        step.add_(1)

    _run_fixed(one_step, plan.n, 0, plan, x, run.bar, run.callback, run.cuda_graph)


def _vp_denoise(sde: VPSDE, u, s, eps):
    """The VP-SDE's noise-free last step at t = eps of size eps (plain torch ops)."""
    row = sde.reverse_coefficients(torch.tensor([eps], dtype=torch.float64), eps, "denoise").reshape(-1)
    row = row.to(device=u.device, dtype=u.dtype)
    return row[0] * u + row[1] * s.to(u.dtype)


def _fixed_step_loop(cld_loop):
    """A registered loop for a fixed-step sampler: the plan, the loop, then the denoising step."""

    def loop(run: "SamplerRun") -> int:
        plan = _FixedPlan(run.sde, run.steps, run.eps, run.striding, run.denoise, run.u.device, run.u.dtype,
                          ts=run.timesteps)
        if isinstance(run.sde, CLD):
            cld_loop(run, plan)
        else:
            _run_vp_em(run, plan)
        if plan.denoise:
            y = run.ev(run.u, plan.t_denoise.expand(run.u.shape[0]))
            if isinstance(run.sde, CLD):
                _cld_denoise(plan, run.sde, run.u, y, run.ev.fold, run.backend)
            else:
                run.u.copy_(_vp_denoise(run.sde, run.u, y, plan.eps))
            _after(plan.n, plan, run.u, run.bar, run.callback)
        return plan.steps

    return loop


# ----------------------------------------------------------------------------------------------
# gDDIM: exponential-integrator multistep in the R frame, one fused kernel per network evaluation
# ----------------------------------------------------------------------------------------------
GDDIM_DEFAULT_ORDER = 2
GDDIM_DEFAULT_PREDICT = "eps"


class _GDDIMPlan:
    """A gDDIM run's device state: the coefficient table (``CLD.gddim_table``, float64, made once),
    the ring buffer of past eps_R / x0_hat, the network times and the (1,) int64 step counter."""

    def __init__(self, sde: CLD, plan: _FixedPlan, u: torch.Tensor, order: Optional[int], predict: Optional[str],
                 mixed: bool):
        self.order = GDDIM_DEFAULT_ORDER if order is None else order
        self.predict = GDDIM_DEFAULT_PREDICT if predict is None else predict
        self.table = sde.gddim_table(plan.ts, self.order, self.predict, mixed=mixed, denoise=plan.denoise,
                                     denoise_time=plan.eps).to(u.device)
        self.hist = ops.gddim_history(u, self.order, self.predict)
        n = plan.n
        self.t_net = torch.cat([plan.t_net[:n], plan.t_denoise]) if plan.denoise else plan.t_net[:n]
        self.step = torch.zeros(1, dtype=torch.int64, device=u.device)

    def advance(self, u: torch.Tensor, y: torch.Tensor, backend) -> None:
        """The fused step after the network evaluation at t_net[step], then step += 1 (on the device)."""
        ops.gddim_step_(u, y, self.hist, self.table, step=self.step, backend=backend)
        self.step.add_(1)


def _gddim_loop(run: "SamplerRun") -> int:
    """Deterministic gDDIM: n = steps - 1 multistep steps (steps with ``denoise=False``), then the Tweedie
    denoising step at t = eps; each is the network plus one ``gddim_step_`` launch, no host sync."""
    u, ev, batch = run.u, run.ev, run.u.shape[0]
    plan = _FixedPlan(run.sde, run.steps, run.eps, run.striding, run.denoise, u.device, u.dtype, ts=run.timesteps)
    g = _GDDIMPlan(run.sde, plan, u, run.order, run.predict, ev.fold)

    def one_step():
        g.advance(u, ev(u, _time_vector(g.t_net, g.step, batch)), run.backend)

    _run_fixed(one_step, plan.n, 0, plan, u, run.bar, run.callback, run.cuda_graph)
    if plan.denoise:
        one_step()
        _after(plan.n, plan, u, run.bar, run.callback)
    return plan.steps


# ----------------------------------------------------------------------------------------------
# Dormand-Prince 5(4) on the device
# ----------------------------------------------------------------------------------------------
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
# 5th-order minus embedded 4th-order weights (the error estimate).
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _combine(y: Sequence[torch.Tensor], h: torch.Tensor, weights, ks) -> List[torch.Tensor]:
    """y + h * sum_j w_j k_j for every component (h a 0-d device tensor)."""
    out = []
    for c, yc in enumerate(y):
        acc = None
        for w, k in zip(weights, ks):
            if w == 0.0:
                continue
            term = k[c] * w
            acc = term if acc is None else acc + term
        out.append(yc if acc is None else yc + (h * acc).to(yc.dtype))
    return out


def _rms_norm(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max over components of the RMS over all elements (float64 0-d device tensor)."""
    norms = [p.to(torch.float64).pow(2).mean().sqrt() for p in parts]
    return norms[0] if len(norms) == 1 else torch.stack(norms).max()


def dopri5(f: Callable, y0: Sequence[torch.Tensor], t0: float, t1: float, rtol: float, atol: float,
           on_accept: Optional[Callable] = None, max_steps: int = 100_000, max_nfe: Optional[int] = None):
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with adaptive Dormand-Prince 5(4).

    ``y0`` is a list of tensors (the state may have several components, e.g. (u, log p)); ``f(t, y)``
    gets t as a 0-d float64 device tensor and returns a list of the same shapes. The error norm is,
    per component, the RMS over the whole batch of err / (atol + rtol * max(|y|, |y_new|)), maximised
    over components; a step is accepted when it is <= 1. Step-size control as scipy's RK45
    (safety 0.9, factors in [0.2, 10], no growth right after a rejection), first step by Hairer's
    rule (two evaluations). Everything stays on the device; the one host synchronisation per
    attempted step reads five numbers (accepted, last step, t, new t, next h) at once.

    ``max_nfe``: raise :class:`NFEBudgetError` (naming the time reached) before an attempted step
    would take the evaluations past it.

    Returns (y1, nfe, n_accepted, n_rejected).
    """
    device = y0[0].device
    f64 = dict(dtype=torch.float64, device=device)
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.tensor(t0, **f64)
    t_end = torch.tensor(t1, **f64)
    span = abs(t1 - t0)
    y = list(y0)

    # Initial step (Hairer, Norsett, Wanner; as scipy's select_initial_step), on the device.
    k1 = f(t, y)
    scale0 = [atol + rtol * yc.abs() for yc in y]
    d0 = _rms_norm([yc / s for yc, s in zip(y, scale0)])
    d1 = _rms_norm([kc / s for kc, s in zip(k1, scale0)])
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.clamp(d1, min=1e-300))
    h0 = torch.clamp(h0, max=span)
    y_probe = [yc + (direction * h0 * kc).to(yc.dtype) for yc, kc in zip(y, k1)]
    k_probe = f(t + direction * h0, y_probe)
    d2 = _rms_norm([(kp - kc) / s for kp, kc, s in zip(k_probe, k1, scale0)]) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.clamp(dmax, min=1e-300)) ** 0.2)
    h = torch.minimum(torch.minimum(100.0 * h0, h1), torch.tensor(span, **f64))
    nfe = 2
    n_acc = n_rej = 0
    prev_rejected = torch.zeros((), dtype=torch.bool, device=device)
    t_host = float(t0)
    for _ in range(max_steps):
        if max_nfe is not None and nfe + 6 > max_nfe:
            raise NFEBudgetError(f"dopri5: max_nfe = {max_nfe} evaluations used up at t = {t_host:.6g} "
                                 f"(integrating from t = {t0:g} to {t1:g})", t_host, nfe)
        remaining = (t_end - t).abs()
        last = h >= remaining
        hs = direction * torch.minimum(h, remaining)
        ks = [k1]
        for stage in range(1, 6):  # k2 .. k6
            yi = _combine(y, hs, _DP_A[stage], ks)
            ks.append(f(t + _DP_C[stage] * hs, yi))
        y_new = _combine(y, hs, _DP_B, ks)
        k7 = f(t + hs, y_new)  # FSAL: the next step's first stage
        ks.append(k7)
        nfe += 6
        err = _combine([torch.zeros_like(yc) for yc in y], hs, _DP_E, ks)
        scale = [atol + rtol * torch.maximum(yc.abs(), yn.abs()) for yc, yn in zip(y, y_new)]
        err_norm = _rms_norm([e / s for e, s in zip(err, scale)])
        accept = err_norm <= 1.0
        factor = torch.where(err_norm == 0, torch.full_like(err_norm, _MAX_FACTOR),
                             _SAFETY * torch.clamp(err_norm, min=1e-300) ** -0.2)
        factor = torch.clamp(factor, _MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(accept & prev_rejected, torch.clamp(factor, max=1.0), factor)
        h = hs.abs() * factor
        t_new = t + hs
        prev_rejected = ~accept
        # The one host synchronisation of the step: accept?, last step?, t before and after, next h.
        acc, was_last, t_old, t_host, h_host = torch.stack([accept.double(), last.double(), t, t_new, h]).tolist()
        if not acc:
            t_host = t_old
        if acc:
            y, k1, t = y_new, k7, t_new
            n_acc += 1
            if on_accept is not None:
                on_accept(n_acc - 1, t_host, y)
            if was_last:
                return y, nfe, n_acc, n_rej
        else:
            n_rej += 1
            if not math.isfinite(h_host):
                raise RuntimeError(f"dopri5: the drift is not finite near t = {t_old:.6g} (NaN or inf in the "
                                   "score function's output or the state)")
            if h_host < 1e-14 * max(1.0, abs(t_old)):
                raise RuntimeError(f"dopri5: step size underflow at t = {t_old:.6g} (h = {h_host:.3g}); "
                                   "the tolerances may be too tight")
    raise RuntimeError(f"dopri5: no convergence after {max_steps} steps")


# ----------------------------------------------------------------------------------------------
# probability-flow drifts
# ----------------------------------------------------------------------------------------------
def _cld_pf_drift(sde: CLD, ev: _Evaluator, backend):
    """f(t, [u]) -> [du/dt] of the CLD probability-flow ODE (forward time), via the fused affine op."""

    def f(t, y):
        u = y[0]
        tv = t.reshape(1)
        out = ev(u, tv.to(u.dtype).expand(u.shape[0]))
        return [ops.pf_drift(u, out, tv, sde, mixed=ev.fold, backend=backend)]

    return f


def _vp_pf_drift(sde: VPSDE, ev: _Evaluator):
    def f(t, y):
        x = y[0]
        row = sde.reverse_coefficients(t, 0.0, "pf_drift").to(x.dtype)
        s = ev(x, t.to(x.dtype).reshape(1).expand(x.shape[0])).to(x.dtype)
        return [row[0] * x + row[1] * s]

    return f


# ----------------------------------------------------------------------------------------------
# the ODE
# ----------------------------------------------------------------------------------------------
def _ode_loop(run: "SamplerRun") -> int:
    ev, sde, u = run.ev, run.sde, run.u

    def on_accept(i, t, y):
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(t=f"{t:.4g}", nfe=ev.calls)
        if run.callback is not None:
            run.callback(i, t, y[0])

    f = _cld_pf_drift(sde, ev, run.backend) if isinstance(sde, CLD) else _vp_pf_drift(sde, ev)
    try:
        (u_end,), _, n_acc, _ = dopri5(f, [u], run.t_start, run.eps, run.rtol, run.atol, on_accept=on_accept,
                                       max_nfe=run.max_nfe - (1 if run.denoise else 0))
    except NFEBudgetError as exc:  # restated with the caller's max_nfe (one evaluation is the denoising step's)
        raise NFEBudgetError(f"ode: max_nfe = {run.max_nfe} score evaluations used up at t = {exc.t:.6g} (from t = "
                             f"{run.t_start:g} to eps = {run.eps:g}); the score may be stiff or broken: raise max_nfe "
                             "or loosen rtol / atol", exc.t, exc.nfe) from None
    run.u.copy_(u_end)
    if run.denoise:
        y = ev(u, torch.full((u.shape[0],), run.eps, dtype=u.dtype, device=u.device))
        if isinstance(sde, CLD):
            grid = torch.tensor([run.eps, 0.0], dtype=torch.float64).to(u.device)
            ops.em_step_(u, y, grid, sde, step=0, mixed=ev.fold, denoise=True, backend=run.backend)
        else:
            u.copy_(_vp_denoise(sde, u, y, run.eps))
        if run.callback is not None:
            run.callback(n_acc, run.eps, u)
    return ev.calls


# ----------------------------------------------------------------------------------------------
# the sampler registry: one loop signature, used by cf.sample, the config and the CLI
# ----------------------------------------------------------------------------------------------
@dataclass
class SamplerRun:
    """Everything a registered sampler loop gets. ``u`` is the state at t = ``t_start`` (the prior draw
    at t = 1, or the caller's ``u``) (B, 2C, ...) (VP-SDE: (B, C, ...)); fixed-step loops take their
    grid from ``timesteps`` when set (``_FixedPlan(..., ts=run.timesteps)``), else from ``steps``,
    ``eps`` and ``striding``. The loop advances u in place to t = eps and returns the
    number of score evaluations. ``ev(u, t)`` evaluates the checked score (the raw network output
    when ``ev.fold``: pass ``mixed=ev.fold`` to the fused step ops)."""

    sde: object
    ev: "_Evaluator"
    u: torch.Tensor
    steps: int
    eps: float
    striding: str
    denoise: bool
    seed: torch.Tensor
    bar: object
    callback: Optional[Callable]
    cuda_graph: bool
    backend: Optional[str]
    rtol: float
    atol: float
    order: Optional[int] = None
    predict: Optional[str] = None
    max_nfe: int = ODE_MAX_NFE
    timesteps: Optional[torch.Tensor] = None  # custom (n + 1,) float64 CPU grid (fixed-step samplers)
    t_start: float = 1.0  # the forward time of ``u`` ("ode": where the integration starts)
    sscs_official_half_steps: bool = False


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its loop, the SDEs it handles, and whether ``steps`` fixes its NFE."""

    name: str
    loop: Callable[[SamplerRun], int]
    sdes: tuple
    fixed_steps: bool
    summary: str
    default_striding: str = "linear"
    options: tuple = ()
    custom_grid: bool = False


SAMPLERS: dict = {}


def register_sampler(name: str, loop: Callable[[SamplerRun], int], sdes=(CLD,), fixed_steps: bool = True,
                     summary: str = "", default_striding: str = "linear", options=(),
                     custom_grid: bool = False) -> SamplerSpec:
    """Register ``loop`` as ``cf.sample(method=name)`` (also offered by the config and the CLI).

    ``default_striding``: the time grid when the caller passes none; ``options``: the names of the
    sampler-specific ``cf.sample`` arguments it reads from ``SamplerRun`` (e.g. "order", "predict");
    ``custom_grid``: the loop honours ``SamplerRun.timesteps`` / ``t_start`` (else ``cf.sample``
    refuses ``timesteps=`` for it rather than ignore the grid).
    """
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered")
    _check_striding(default_striding)
    spec = SamplerSpec(name, loop, tuple(sdes), bool(fixed_steps), summary, default_striding, tuple(options),
                       bool(custom_grid))
    SAMPLERS[name] = spec
    return spec


def sampler_names(sde=None) -> tuple:
    """Names of the registered samplers (those that handle ``sde``'s type, when given)."""
    return tuple(n for n, s in SAMPLERS.items() if sde is None or isinstance(sde, s.sdes))


register_sampler("sscs", _fixed_step_loop(_run_sscs), sdes=(CLD,), default_striding="quadratic", custom_grid=True,
                 options=("sscs_official_half_steps",),
                 summary="symmetric splitting CLD sampler: exact linear half steps around a score Euler step")
register_sampler("em", _fixed_step_loop(_run_cld_em), sdes=(CLD, VPSDE), custom_grid=True,
                 summary="Euler-Maruyama on the reverse SDE")
register_sampler("ode", _ode_loop, sdes=(CLD, VPSDE), fixed_steps=False, custom_grid=True,
                 summary="probability-flow ODE, adaptive Dormand-Prince 5(4)")
register_sampler("gddim", _gddim_loop, sdes=(CLD,), default_striding="polynomial", options=("order", "predict"),
                 custom_grid=True,
                 summary="deterministic exponential-integrator multistep in the R frame (gDDIM), order 1-3")
METHODS = sampler_names()


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
def _check_start(u, shape, sde) -> tuple:
    """The data shape of a run, from ``shape`` and/or a start state ``u`` (checked against each other)."""
    if u is None:
        return _check_shape(shape)
    checks.tensor(u, "u", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    if isinstance(sde, CLD):
        if u.shape[1] % 2:
            raise ValueError(f"u must be a CLD state (B, 2C, ...) with x and v stacked on dim 1, got shape "
                             f"{tuple(u.shape)} (odd dim 1)")
        x_shape = (u.shape[0], u.shape[1] // 2) + tuple(u.shape[2:])
    else:
        x_shape = tuple(u.shape)
    if shape is not None and _check_shape(shape) != x_shape:
        raise ValueError(f"shape {tuple(shape)} does not match u of shape {tuple(u.shape)} (data shape {x_shape})")
    checks.finite(u, "u")
    return x_shape


def _check_grid(timesteps, steps, eps, striding, denoise, spec: SamplerSpec, has_u: bool):
    """(ts or None, steps, eps) of a run: the default grid's or the custom ``timesteps``'."""
    if timesteps is None:
        steps = DEFAULT_STEPS if steps is None else _check_steps(steps)
        return None, steps, DEFAULT_EPS if eps is None else _check_eps(eps)
    if not spec.custom_grid:
        raise ValueError(f"method={spec.name!r} does not take a custom grid (registered without custom_grid=True)")
    ts = _check_timesteps(timesteps)
    if not has_u and float(ts[0]) != 1.0:
        raise ValueError(f"timesteps must start at 1 (the prior's time) unless u= gives the state at "
                         f"t = {float(ts[0]):.6g}")
    if striding is not None:
        raise ValueError("striding= and timesteps= are exclusive: timesteps is the grid")
    if not spec.fixed_steps and ts.numel() != 2:
        raise ValueError(f"method={spec.name!r} is adaptive: timesteps must be [t_start, t_end], got "
                         f"{ts.numel()} entries")
    n_eval = ts.numel() - 1 + int(bool(denoise))
    if spec.fixed_steps and steps is not None and _check_steps(steps) != n_eval:
        raise ValueError(f"steps={steps} disagrees with timesteps: {ts.numel()} times give {n_eval} score "
                         f"evaluations (denoise={denoise}); leave steps unset")
    if eps is not None and _check_eps(eps) != float(ts[-1]):
        raise ValueError(f"eps={eps} disagrees with timesteps[-1] = {float(ts[-1])}; leave eps unset")
    if spec.fixed_steps and n_eval < 1:
        raise ValueError("timesteps give no score evaluation")
    return ts, (n_eval if spec.fixed_steps else DEFAULT_STEPS), float(ts[-1])


DEFAULT_STEPS = 50
DEFAULT_EPS = 1e-3


def sample(score_fn: Callable, shape: Optional[Sequence[int]], sde, steps: Optional[int] = None, method: str = "sscs",
           eps: Optional[float] = None, striding: Optional[str] = None, denoise: bool = True,
           generator: Optional[torch.Generator] = None, device=None, progress: bool = False,
           callback: Optional[Callable] = None, dtype: torch.dtype = torch.float32, cuda_graph: bool = False,
           rtol: float = 1e-5, atol: float = 1e-5, backend: Optional[str] = None, order: Optional[int] = None,
           predict: Optional[str] = None, u: Optional[torch.Tensor] = None,
           timesteps=None, max_nfe: Optional[int] = None, sscs_official_half_steps: bool = False) -> SampleResult:
    """Draw samples by integrating the reverse-time CLD (or VP) dynamics from the prior at t = 1 to t = eps.

    Args:
        score_fn: ``score_fn(u, t)`` with u (B, 2C, ...) (VP-SDE: x (B, C, ...)) and t (B,) forward
            times in the state dtype; returns grad_v log p_t(u) (VP: grad_x log p_t(x)) of the data
            shape. A ``cf.score_fn(model, sde)`` wrapper is recognised and its raw network output is
            fed to the fused kernels, which fold in the mixed-score coefficients themselves.
        shape: the data shape (B, C, ...) or (B, D); may be None when ``u`` is given.
        sde: ``cf.CLD`` or ``cf.VPSDE``.
        steps: number of score evaluations of "sscs" / "em", the denoising step included (the loop
            takes steps - 1 steps when ``denoise``); default 50. Ignored by "ode" (adaptive).
        method: a registered sampler (``cld_fast.sampling.SAMPLERS``): "sscs" (CLD only, the
            default), "em" (Euler-Maruyama on the reverse SDE), "ode" (probability-flow ODE,
            adaptive Dormand-Prince 5(4) with ``rtol`` / ``atol``) or "gddim" (CLD only:
            deterministic exponential-integrator multistep, ``order`` and ``predict``; best at 10-20 NFE).
        eps: last forward time, in (0, 1); default 1e-3.
        striding: "linear", "quadratic", "polynomial" or "log" time grid (``cld_fast.sde.time_grid``);
            None: the sampler's default (sscs: quadratic, gddim: polynomial, em: linear).
        denoise: end with the official noise-free EM step at t = eps of size eps (one evaluation).
        generator: torch.Generator for the prior and the one Philox seed of the run (same seed, same samples).
        device: where to sample (default: the network's device, else the generator's, else CPU).
        progress: show a tqdm bar.
        callback: ``callback(i, t, u)`` after every step (i from 0, t the forward time of that
            step's score evaluation as a float, u the live state); "ode" calls it per accepted step.
            A callable taking one argument is called k-diffusion style, ``callback(info)``, with
            exactly the keys ``info = {"x": u, "i": i, "t": t}`` ("x" is the live state u, as
            k-diffusion names its state; no "denoised": it would cost an extra kernel per step).
        dtype: state dtype, torch.float32 (default) or torch.float64.
        cuda_graph: on CUDA, capture one step (network + fused kernel + counter increment) in a CUDA
            graph after one warm-up step and replay it; elsewhere (or if capture fails) warns and
            runs the eager loop.
        rtol, atol: tolerances of the ODE solver.
        backend: force a kernel backend (see ``cld_fast.backends``).
        order: "gddim" only: multistep order 1, 2 (default) or 3.
        predict: "gddim" only: "eps" (default; extrapolate eps_R) or "x0" (extrapolate E[x0 | u]).
        u: start from this state instead of a prior draw: (B, 2C, ...) (VP-SDE: (B, C, ...)) at the
            first forward time (1, or ``timesteps[0]``); copied into ``dtype`` on ``device`` (default
            u's device), never modified. The generator still gives the run's Philox seed, so
            ``u = sde.prior_sampling(shape, generator=g)`` followed by ``generator=g`` reproduces a
            run without ``u`` bit for bit.
        timesteps: a custom grid of forward times t_0 > t_1 > ... > t_n in (0, 1] (1-D tensor or
            list) instead of ``steps`` / ``eps`` / ``striding`` (which must then be left unset or
            agree): step i runs t_i -> t_{i+1}, the score is evaluated at t_0 .. t_{n-1}, and
            ``denoise`` adds the final step at eps = t_n (NFE = n + 1, or n without denoising).
            Without ``u``, t_0 must be 1 (the prior's time). "ode" takes exactly two entries,
            [t_start, t_end]: the adaptive solver integrates between them (it picks its own steps).
        max_nfe: "ode" only: the most score evaluations allowed (default ``ODE_MAX_NFE`` = 10000,
            the denoising step included); past it :class:`NFEBudgetError` names the time reached.
        sscs_official_half_steps: "sscs" only: reproduce the official CLD-SGM sampler, whose closing
            half step integrates beta over the first half of the step (``CLD.sscs_closing_half_step``):
            a known difference for non-constant beta (beta1 != 0), where the default is the exact
            split; identical for constant beta. For comparing with published numbers.
    Returns:
        ``SampleResult(x, v, nfe, u)``.
    Raises:
        NonFiniteSamplesError: the final samples hold NaN or inf (a NaN score, a diverging state);
            checked once after the loop (one host sync), the SampleResult is its ``result``.
        NFEBudgetError: "ode" ran out of ``max_nfe``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {sampler_names()}, got {method!r}")
    spec = SAMPLERS[method]
    _check_sde(sde)
    if not isinstance(sde, spec.sdes):
        raise ValueError(f"method={method!r} does not handle a {type(sde).__name__}; "
                         f"use one of {sampler_names(sde)}")
    _check_score_callable(score_fn)
    shape = _check_start(u, shape, sde)
    ts, steps, eps = _check_grid(timesteps, steps, eps, striding, denoise, spec, u is not None)
    striding = spec.default_striding if striding is None else striding
    _check_striding(striding)
    if not isinstance(sscs_official_half_steps, bool):
        raise TypeError(f"sscs_official_half_steps must be a bool, got {type(sscs_official_half_steps).__name__}")
    for name, value in (("order", order), ("predict", predict),
                        ("sscs_official_half_steps", sscs_official_half_steps or None)):
        if value is not None and name not in spec.options:
            raise ValueError(f"{name}= is an option of {[n for n, s in SAMPLERS.items() if name in s.options]}, "
                             f"not of method={method!r}")
    if order is not None and (isinstance(order, bool) or order not in (1, 2, 3)):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if predict is not None and predict not in GDDIM_PREDICTIONS:
        raise ValueError(f"predict must be one of {GDDIM_PREDICTIONS}, got {predict!r}")
    _check_dtype(dtype)
    _check_generator(generator)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    if _callback_style(callback) == "dict":
        callback = _dict_callback(callback)
    if max_nfe is not None:
        if spec.fixed_steps:
            raise ValueError(f"max_nfe= bounds the adaptive ODE solver (method='ode'); method={method!r} takes "
                             "exactly `steps` score evaluations")
        if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 8:
            raise ValueError(f"max_nfe must be an int >= 8 (two to start, six per Dormand-Prince step), got {max_nfe!r}")
    if not spec.fixed_steps:
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
                raise ValueError(f"{name} must be a positive float, got {tol!r}")
    device = _default_device(score_fn, generator, device, u)
    if cuda_graph:
        if not spec.fixed_steps:
            _warn_graph(f"the adaptive sampler {method!r} picks its steps on the host, so there is no fixed step to capture")
            cuda_graph = False
        elif device.type != "cuda":
            _warn_graph(f"the samples live on {device.type} and CUDA graphs need CUDA tensors")
            cuda_graph = False

    ev = _Evaluator(score_fn, sde, shape)
    with torch.no_grad(), checks.value_checks(False):
        u = prior(sde, shape, generator, device, dtype) if u is None else u.detach().to(device, dtype, copy=True)
        seed = philox.seed_from_generator(generator, device) if spec.fixed_steps else None
        bar = _progress(progress, steps if spec.fixed_steps else None, method)
        run = SamplerRun(sde=sde, ev=ev, u=u, steps=steps, eps=eps, striding=striding, denoise=denoise, seed=seed,
                         bar=bar, callback=callback, cuda_graph=cuda_graph, backend=backend, rtol=rtol, atol=atol,
                         order=order, predict=predict, timesteps=ts if spec.fixed_steps else None,
                         t_start=1.0 if ts is None else float(ts[0]),
                         max_nfe=ODE_MAX_NFE if max_nfe is None else max_nfe,
                         sscs_official_half_steps=sscs_official_half_steps)
        try:
            nfe = spec.loop(run)
        finally:
            if bar is not None:
                bar.close()
        result = _result(run.u, sde, nfe)
        # The one check of the run (one host sync, after the loop): a NaN score, a diverging state
        # or a kernel that poisoned an out-of-range step all end here instead of in silent NaN samples.
        bad = int((~torch.isfinite(run.u)).sum())
    if bad:
        raise NonFiniteSamplesError(
            f"{method}: {bad} of {run.u.numel()} values of the final state are NaN or inf after {nfe} score "
            "evaluations; the score function returned NaN/inf or the state diverged (check the network or "
            "checkpoint, eps and steps)", result)
    return result


def _result(u, sde, nfe) -> SampleResult:
    if isinstance(sde, CLD):
        x, v = torch.chunk(u, 2, dim=1)
        return SampleResult(x=x, v=v, nfe=int(nfe), u=u)
    return SampleResult(x=u, v=None, nfe=int(nfe), u=u)


__all__ = ["sample", "SampleResult", "SamplingError", "NonFiniteSamplesError", "NFEBudgetError", "SamplerRun", "SamplerSpec", "SAMPLERS", "register_sampler", "sampler_names",
           "dopri5", "METHODS"]
