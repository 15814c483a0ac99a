"""The sampler core: argument checks, time grids, the score evaluator, the step loop and the registry.

A sampler lives in a file of its own (``sscs.py``, ``em.py``, ``gddim.py``, ``ode.py``) and registers
itself with :func:`register_sampler`: a fixed-step sampler registers a :class:`Stepper` subclass (the
state it keeps between score evaluations and the fused step it takes after each), an adaptive one a
loop ``loop(run) -> nfe``. Each declares its own options (:class:`Option`). ``cf.sample``, the
schedulers, the diffusers and k-diffusion adapters and the CLI derive everything from the registry;
nothing here names a sampler or an SDE type.

Time is forward time t in (0, 1], t = 0 is data; a run goes from t = 1 (or ``timesteps[0]``) to eps.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import checks
from ..score import NetworkScore
from ..sde import STRIDINGS, time_grid

DTYPES = (torch.float32, torch.float64)
MAX_STEPS = 1_000_000  # far beyond any useful run; above it the per-step tables alone need gigabytes
DEFAULT_STEPS = 50
DEFAULT_EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# errors and results
# ----------------------------------------------------------------------------------------------
class SamplingError(RuntimeError):
    """A sampler could not produce usable samples (see the subclasses)."""


class NonFiniteSamplesError(SamplingError):
    """The final samples hold NaN or inf (checked once, after the loop). ``result``: the SampleResult."""

    def __init__(self, message: str, result: "SampleResult"):
        super().__init__(message)
        self.result = result


class NFEBudgetError(SamplingError):
    """An adaptive solver used up ``max_nfe`` score evaluations before reaching t = eps. ``t``: the
    forward time it reached; ``nfe``: evaluations spent."""

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


def result_of(u: torch.Tensor, sde, nfe: int) -> SampleResult:
    """The ``SampleResult`` of a final state ``u`` (split by the SDE)."""
    x, v = sde.split_state(u)
    return SampleResult(x=x, v=v, nfe=int(nfe), u=u)


# ----------------------------------------------------------------------------------------------
# argument checks shared by cf.sample and the adapters
# ----------------------------------------------------------------------------------------------
def check_shape(shape) -> tuple:
    """The data shape (B, C, ...) or (B, D) as a tuple of positive ints."""
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


def check_eps(eps) -> float:
    """The last forward time, a float in (0, 1)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float in (0, 1), got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 < eps < 1.0) or not math.isfinite(eps):
        raise ValueError(f"eps must lie in (0, 1) (the last forward time), got {eps}")
    return eps


def check_steps(steps) -> int:
    """The number of score evaluations, an int in [1, MAX_STEPS]."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the number of score evaluations, denoising included), got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps = {steps} is more than cld_fast supports ({MAX_STEPS:,} score evaluations); "
                         "a few hundred steps already match the reverse SDE closely")
    return steps


def check_sde(sde):
    """An SDE object of cld_fast (anything with the sampler interface of ``cf.CLD`` / ``cf.VPSDE``)."""
    if not getattr(sde, "is_sde", False):
        raise TypeError(f"sde must be a cld_fast.CLD or cld_fast.VPSDE, got {type(sde).__name__}")


def check_striding(striding):
    if striding not in STRIDINGS:
        raise ValueError(f"striding must be one of {STRIDINGS}, got {striding!r}")


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_score_callable(score_fn):
    if isinstance(score_fn, torch.nn.Module):
        raise TypeError(f"score_fn is a raw network ({type(score_fn).__name__}): its output is not a score. Wrap it "
                        "with cf.score_fn(model, sde) (mixed-score output, the official convention) or "
                        "cf.score_fn(model, sde, mixed=False) (the network outputs grad_v log p_t(u) itself)")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(u, t), got {type(score_fn).__name__}")


def check_timesteps(timesteps) -> torch.Tensor:
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


def callback_style(callback) -> Optional[str]:
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


def dict_callback(callback):
    """callback(i, t, u) calling a k-diffusion-style ``callback({"x": u, "i": i, "t": t})``."""

    def call(i, t, u):
        callback({"x": u, "i": i, "t": t})

    return call


def check_device(device) -> torch.device:
    """``device`` as a torch.device that can hold samples here (ValueError naming it otherwise)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}") from exc
    if device.type == "meta":
        raise ValueError("device 'meta' holds no values to sample; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here (torch.cuda.is_available() is "
                         "False); use 'cpu'")
    return device


def default_device(score_fn, generator, device, u=None) -> torch.device:
    """Where a run samples: ``device``, else u's, else the network's, else the generator's, else CPU."""
    if device is not None:
        return check_device(device)
    if u is not None:
        return u.device
    if isinstance(score_fn, NetworkScore) and isinstance(score_fn.model, torch.nn.Module):
        for p in score_fn.model.parameters():
            return p.device
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def prior(sde, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """``sde.prior_sampling`` on ``device`` with a generator that may live on another device."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if generator is not None and generator.device.type != device.type:
        return sde.prior_sampling(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# sampler options: declared once by the sampler, checked by cf.sample, offered by every adapter
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """A sampler-specific argument of ``cf.sample`` (and of the schedulers, wrappers and CLI flags).

    ``kind``: bool, int, float or str; ``choices``: the allowed values (None: any of the kind);
    ``positive``: numbers must be finite and > 0; ``minimum``: numbers must be >= it; ``default``: the
    value when the caller passes None; ``ignored_elsewhere``: other samplers accept and ignore it (so
    one call can loop over methods, as with the ODE's tolerances); other options are refused there.
    """

    name: str
    kind: type
    default: object
    help: str
    choices: Optional[tuple] = None
    positive: bool = False
    minimum: Optional[float] = None
    ignored_elsewhere: bool = False

    def validate(self, value):
        """``value`` checked against the declaration (None gives the default)."""
        if value is None:
            return self.default
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind) and not isinstance(value, bool)
        if not ok:
            raise TypeError(f"{self.name} must be a {self.kind.__name__}, got {type(value).__name__} ({value!r})")
        if self.kind is float:
            value = float(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        if self.positive and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{self.name} must be a finite number > 0, got {value!r}")
        if self.minimum is not None and not value >= self.minimum:
            kind = "an int" if self.kind is int else "a number"
            raise ValueError(f"{self.name} must be {kind} >= {self.minimum:g}, got {value!r}")
        return value


# ----------------------------------------------------------------------------------------------
# score evaluation
# ----------------------------------------------------------------------------------------------
class Guided(NamedTuple):
    """A classifier-free guided evaluation left for the fused step op to combine: the op reads
    cond + weight (cond - uncond) (:meth:`Evaluator.combine`) in the same launch. cond and uncond are
    views of the two halves of one batch-doubled network output (no copies)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    weight: float


def guided_args(y) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(y, y_uncond, guide_weight) of a step op for what the evaluator returned: a :class:`Guided`'s
    halves and weight, else (y, None, 0.0)."""
    if isinstance(y, Guided):
        return y.cond, y.uncond, y.weight
    return y, None, 0.0


def guided_input(stepper, y: torch.Tensor, y_uncond: Optional[torch.Tensor], weight: float):
    """What ``stepper.step`` takes for a classifier-free pair handed in by a user's loop: y alone
    (no ``y_uncond``), a :class:`Guided` for a stepper that fuses guidance, else the combined tensor."""
    if y_uncond is None:
        return y
    if stepper.fuse_guidance:
        return Guided(y, y_uncond, weight)
    return Evaluator.combine(y, y_uncond, weight)


def guided_kwargs(y) -> Tuple[torch.Tensor, dict]:
    """(y, keywords) for an SDE step method: a :class:`Guided`'s conditional half and its
    ``y_uncond`` / ``guide_weight`` keywords, else (y, {}) (SDEs that do not fuse guidance take none)."""
    y, y_uncond, weight = guided_args(y)
    return y, ({} if y_uncond is None else {"y_uncond": y_uncond, "guide_weight": weight})


class Evaluator:
    """Calls the score function and checks what it returns (metadata only: no host sync).

    For a ``NetworkScore`` whose parameterisation the fused step kernels fold in themselves (the
    HSM mixed score of the sampler's own SDE), ``fold`` is True: the raw network output is returned
    and the steps are told so (``mixed=True``), so the output goes straight into the kernel.

    ``guidance`` (a bound ``cf.ClassifierGuidance`` / ``cf.ClassifierFree``, see ``cld_fast.guidance``)
    replaces the plain call by ``guidance.evaluate(self, u, t, fuse)``, which calls ``fn`` and combines
    with :meth:`combine` / :meth:`score_term`, so its result is still what the steps expect (raw
    output when ``fold``, else the score). With ``fuse=True`` (a stepper whose fused step ops take the
    guidance pair, ``Stepper.fuse_guidance``) classifier-free guidance returns a :class:`Guided` instead:
    the combination then costs no launch of its own.
    """

    def __init__(self, score_fn, sde, x_shape, fold_ok: bool = True, guidance=None):
        check_score_callable(score_fn)
        self.fold = bool(fold_ok and isinstance(score_fn, NetworkScore) and score_fn.hsm_mixed
                         and score_fn.sde == sde)
        self.fn = score_fn.raw if self.fold else score_fn
        self.x_shape = tuple(x_shape)
        self.sde = sde
        self.guidance = guidance
        self.calls = 0

    @staticmethod
    def combine(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
        """Classifier-free guidance, elementwise: (1 + w) cond - w uncond = cond + w (cond - uncond).

        Linear with weights summing to 1, so it gives the same score whether cond / uncond are
        scores or raw mixed-score outputs (score = c0 v + c1 out: the c0 v term is common). The
        fused step ops apply the same rule in-kernel to a :class:`Guided` evaluation
        (``cld_fast.opdefs.guided_output``); unfused samplers (the adaptive ODE) call this.
        """
        return torch.add(cond, cond - uncond, alpha=weight)

    def score_term(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A term g in score units (grad_v log, data shape) as a term to add to what ``fn`` returns:
        g itself, or g / c1(t) = -l22(t) g when ``fn`` returns the raw mixed-score output
        (score = c0 v + c1 out, so score + g = c0 v + c1 (out + g / c1))."""
        return mixed_output_term(self.sde, g, t) if self.fold else g

    def __call__(self, u: torch.Tensor, t: torch.Tensor, fuse: bool = False):
        """The checked evaluation at (u, t): a tensor of the data shape, or a :class:`Guided` pair when
        ``fuse`` and the guidance is classifier-free."""
        y = self.fn(u, t) if self.guidance is None else self.guidance.evaluate(self, u, t, fuse)
        self.calls += 1
        if isinstance(y, Guided):
            self._check(y.cond, u)
            return y
        return self._check(y, u)

    def _check(self, y, u: torch.Tensor) -> torch.Tensor:
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


def mixed_output_term(sde, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A score term g (grad_v log, (B, C, ...)) in units of the raw mixed-score output: g / c1(t).

    t: (B,) forward times. With score = c0 v + c1 out, adding g / c1 to the output adds g to the
    score. Returns a tensor of g's shape and dtype."""
    c1 = sde.score_coefficients(t.to(torch.float64), "hsm", "mixed")[:, 1]
    return g / c1.to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))


# ----------------------------------------------------------------------------------------------
# the time grid of a fixed-step run
# ----------------------------------------------------------------------------------------------
class FixedPlan:
    """The time grid of a fixed-step run, on the device.

    steps: score evaluations (n loop steps, plus one when ``denoise``); eps: the last forward time.
    ts: (n + 1,) float64 CPU grid (forward times, 1 -> eps), from ``time_grid`` or the caller's ``ts``;
    times: the ``steps`` forward times of the score evaluations (host floats: ts[:-1], then eps).
    grid: ts on the device in float64, read by the fused kernels (step i runs ts[i] -> ts[i + 1]);
    t_net: ts in the state dtype (the network's time at step i); timesteps: ``times`` on the device;
    t_denoise: (1,) eps in the state dtype, the denoising evaluation's time.
    """

    def __init__(self, steps, eps, striding, denoise, device, dtype, ts: Optional[torch.Tensor] = None):
        if ts is not None:
            steps, eps = ts.numel() - 1 + int(denoise), float(ts[-1])
        self.steps = steps
        self.eps = eps
        self.denoise = denoise
        self.n = steps - 1 if denoise else steps
        self.device = torch.device(device)
        self.dtype = dtype
        if ts is not None:
            self.ts = ts.clone()
        else:
            self.ts = time_grid(self.n, eps, striding) if self.n >= 1 else torch.tensor([1.0], dtype=torch.float64)
        self.times: List[float] = self.ts[:-1].tolist() + ([eps] if denoise else [])
        self.grid = self.ts.to(self.device)
        self.t_net = self.grid.to(dtype)
        self.timesteps = torch.tensor(self.times, dtype=torch.float64).to(device=self.device, dtype=dtype)
        self.t_denoise = torch.full((1,), eps, dtype=torch.float64).to(device=self.device, dtype=dtype)


class Stepper:
    """One run of a fixed-step sampler: what it keeps between score evaluations.

    Subclasses set ``options`` (a tuple of :class:`Option`) and implement ``step`` (and ``begin`` /
    ``denoise`` when they differ from the defaults). The loop (``cf.sample``, a scheduler) calls
    ``begin(u)`` once, then for each of the ``plan.n`` steps evaluates the score at
    (u, ``time(B)``) and calls ``step(u, y)``, then, when ``plan.denoise``, evaluates it at eps and
    calls ``denoise(u, y)``. All of them update u in place with no host synchronisation; the step
    index lives on the device (``counter``), so one step can be captured in a CUDA graph.

    Args:
        sde: the SDE object; plan: the :class:`FixedPlan`; u: the start state (its shape, dtype and
        device; not modified here); seed: the run's Philox seed ((2,) int64 on u's device, None for
        deterministic samplers); mixed: the score input is a raw HSM mixed-score network output;
        backend: force a kernel backend; options: the sampler's declared options, validated.
    """

    options: Tuple[Option, ...] = ()
    conditions = False  # its steps pass ``self.obs`` to the fused ops (``cf.sample(condition=...)``)
    guides = False  # its steps take a classifier-free :class:`Guided` pair (``guided_args``) on an SDE that
    # fuses guidance (``sde.fuses_guidance``): the loop asks the evaluator for the pair (``fuse_guidance``)

    def __init__(self, sde, plan: FixedPlan, u: torch.Tensor, seed, mixed: bool, backend=None, **options):
        self.sde, self.plan, self.seed, self.mixed, self.backend = sde, plan, seed, mixed, backend
        self.fuse_guidance = bool(self.guides and getattr(sde, "fuses_guidance", False))
        self.opts = options
        self.counter = torch.zeros(1, dtype=torch.int64, device=u.device)
        self.condition, self.obs = None, None

    def condition_on(self, condition, u: torch.Tensor) -> None:
        """Sample conditionally: ``obs`` (the packed condition, ``cld_fast.conditions``) goes to every fused step."""
        x_shape = (u.shape[0], u.shape[1] // 2) + tuple(u.shape[2:])
        self.condition, self.obs = condition, condition.packed(x_shape, u.dtype, u.device)

    def time(self, batch: int) -> torch.Tensor:
        """(B,) forward times of the next score evaluation, read on the device (no host sync)."""
        return self.plan.t_net.index_select(0, self.counter).expand(batch)

    def begin(self, u: torch.Tensor) -> None:
        """Before the first score evaluation (default: with a condition, the observed coordinates of the
        start state become a perturbation of x_obs at ts[0]; else nothing)."""
        if self.obs is not None:
            self.condition.start_(u, self.plan.times[0], self.sde, self.obs, self.seed, self.backend)

    def step(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """Advance u in place past the score evaluation y at step ``counter``; counter += 1."""
        raise NotImplementedError

    def denoise(self, u: torch.Tensor, y) -> None:
        """The final noise-free step at t = eps of size eps (default: the SDE's denoising step; with a
        condition it puts x_obs on the observed coordinates; a :class:`Guided` y is combined in it)."""
        y, guide = guided_kwargs(y)
        self.sde.denoise_(u, y, self.plan.eps, mixed=self.mixed, backend=self.backend, obs=self.obs, **guide)


# ----------------------------------------------------------------------------------------------
# the loop: eager or one captured CUDA graph, with progress bar and callback
# ----------------------------------------------------------------------------------------------
_GRAPH_WARNING = "cuda_graph=True: {why}; running the eager loop instead (same samples, one launch per op)"


def warn_graph(why: str, stacklevel: int = 2):
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
        warn_graph(f"capturing one step in a CUDA graph failed ({type(exc).__name__}: {exc})", stacklevel=6)
        return None
    return graph


def repeat_step(one_step: Callable[[], None], n: int, u: torch.Tensor, after: Callable[[int], None],
                cuda_graph: bool) -> None:
    """Call ``one_step`` n times, ``after(i)`` after each. ``cuda_graph`` (CUDA state, n >= 2): step 0
    runs eagerly on a side stream as the warm-up, one step is captured and replayed n - 1 times."""
    if n <= 0:
        return
    i0, graph = 0, None
    if cuda_graph and u.device.type == "cuda" and n >= 2:
        graph = _capture(one_step, u.device)  # takes step 0 (the warm-up) for real
        after(0)
        i0 = 1
    for i in range(i0, n):
        if graph is not None:
            graph.replay()
        else:
            one_step()
        after(i)


def progress_bar(progress: bool, total, desc: str):
    """A tqdm bar (None when ``progress`` is False)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


@dataclass
class SamplerRun:
    """Everything a registered sampler gets. ``u`` is the state at t = ``t_start`` (the prior draw at
    t = 1, or the caller's ``u``) (B, 2C, ...) (VP-SDE: (B, C, ...)); fixed-step samplers take their
    grid from ``timesteps`` when set, else from ``steps``, ``eps`` and ``striding``. The sampler
    advances u in place to t = eps and returns the number of score evaluations. ``ev(u, t)``
    evaluates the checked score (the raw network output when ``ev.fold``). ``options``: the sampler's
    declared options, validated (also readable as attributes, ``run.order``)."""

    sde: object
    ev: Evaluator
    u: torch.Tensor
    steps: int
    eps: float
    striding: str
    denoise: bool
    seed: Optional[torch.Tensor]
    bar: object
    callback: Optional[Callable]
    cuda_graph: bool
    backend: Optional[str]
    options: Dict[str, object] = field(default_factory=dict)
    timesteps: Optional[torch.Tensor] = None  # custom (n + 1,) float64 CPU grid (fixed-step samplers)
    t_start: float = 1.0  # the forward time of ``u``
    condition: object = None  # a ``cld_fast.conditions`` condition (fixed-step samplers with ``conditions``)

    def __getattr__(self, name):
        options = self.__dict__.get("options") or {}
        if name in options:
            return options[name]
        raise AttributeError(f"SamplerRun has no attribute or option {name!r}")

    def after(self, i: int, t: float, u: torch.Tensor) -> None:
        """Progress bar and callback after step i (forward time t of its score evaluation)."""
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(i, t, u)


def fixed_step_loop(stepper_cls) -> Callable[[SamplerRun], int]:
    """The loop of a fixed-step sampler: its plan, ``begin``, n steps, then the denoising step."""

    def loop(run: SamplerRun) -> int:
        u, ev, batch = run.u, run.ev, run.u.shape[0]
        plan = FixedPlan(run.steps, run.eps, run.striding, run.denoise, u.device, u.dtype, ts=run.timesteps)
        stepper = stepper_cls(run.sde, plan, u, run.seed, ev.fold, run.backend, **run.options)
        if run.condition is not None:
            stepper.condition_on(run.condition, u)
        if plan.n >= 1:
            stepper.begin(u)

        fuse = stepper.fuse_guidance

        def one_step():
            stepper.step(u, ev(u, stepper.time(batch), fuse))

        repeat_step(one_step, plan.n, u, lambda i: run.after(i, plan.times[i], u), run.cuda_graph)
        if plan.denoise:
            stepper.denoise(u, ev(u, plan.t_denoise.expand(batch), fuse))
            run.after(plan.n, plan.eps, u)
        return plan.steps

    return loop


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    name; loop: ``loop(run) -> nfe``; stepper: the :class:`Stepper` of a fixed-step sampler (None for
    an adaptive one); sdes: the SDE types it handles; fixed_steps: ``steps`` fixes its NFE;
    summary: one line for help texts; default_striding: its time grid when the caller gives none;
    options: its :class:`Option` declarations; custom_grid: it honours ``timesteps`` / ``t_start``.
    """

    name: str
    loop: Callable[[SamplerRun], int]
    sdes: tuple
    fixed_steps: bool
    summary: str
    default_striding: str = "linear"
    options: Tuple[Option, ...] = ()
    custom_grid: bool = False
    stepper: Optional[type] = None

    def option(self, name: str) -> Optional[Option]:
        return next((o for o in self.options if o.name == name), None)

    @property
    def conditions(self) -> bool:
        """It samples with ``condition=`` (a fixed-step sampler whose steps pass the condition to the fused ops)."""
        return self.stepper is not None and self.stepper.conditions

    def check_condition(self, condition, sde, shape) -> None:
        """Refuse a condition this sampler or SDE cannot honour, naming them; check it against the data shape."""
        from ..conditions import CONDITIONS

        if condition is None:
            return
        if not isinstance(condition, CONDITIONS):
            raise TypeError(f"condition must be one of {[c.__name__ for c in CONDITIONS]} (e.g. cf.Inpaint(x_obs, "
                            f"mask)) or None, got {type(condition).__name__}")
        if not getattr(sde, "inpaints", False):
            raise ValueError(f"condition=: inpainting by replacement is implemented for the CLD, not for a "
                             f"{type(sde).__name__}")
        if not self.conditions:
            why = (" (adaptive: its error control would treat the replacement's fresh noise as integration error)"
                   if not self.fixed_steps else "")
            raise ValueError(f"method={self.name!r} does not take condition={why}; use one of "
                             f"{[n for n, s in SAMPLERS.items() if s.conditions]}")
        condition.check_shape(shape)

    def validate_options(self, given: Dict[str, object]) -> Dict[str, object]:
        """The sampler's options from ``given`` (None = unset), defaults filled in; an option of another
        sampler is refused by name."""
        known = all_options()
        for name, value in given.items():
            if self.option(name) is not None:
                continue
            if name not in known:
                raise TypeError(f"unknown argument {name}=; the options of method={self.name!r} are "
                                f"{[o.name for o in self.options]}")
            if value is not None and not known[name].ignored_elsewhere:
                owners = [n for n, s in SAMPLERS.items() if s.option(name) is not None]
                raise ValueError(f"{name}= is an option of {owners}, not of method={self.name!r}")
            if value is not None:
                known[name].validate(value)
        return {o.name: o.validate(given.get(o.name)) for o in self.options}


SAMPLERS: Dict[str, SamplerSpec] = {}


def register_sampler(name: str, loop: Optional[Callable[[SamplerRun], int]] = None, *, stepper: Optional[type] = None,
                     sdes=(), fixed_steps: bool = True, summary: str = "", default_striding: str = "linear",
                     options: Sequence[Option] = (), custom_grid: bool = False) -> SamplerSpec:
    """Register a sampler as ``cf.sample(method=name)`` (and in the schedulers, the diffusers and
    k-diffusion adapters and ``cld-fast sample --method``).

    Pass ``stepper`` (a :class:`Stepper` subclass; its ``options`` are the sampler's) for a fixed-step
    sampler, or ``loop(run) -> nfe`` for any other. ``sdes``: the SDE classes it handles;
    ``default_striding``: the time grid when the caller passes none; ``custom_grid``: the loop honours
    ``SamplerRun.timesteps`` / ``t_start`` (a stepper always does).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier (it becomes sample_<name> and --method {name}), got {name!r}")
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered")
    if (loop is None) == (stepper is None):
        raise TypeError("register_sampler needs exactly one of loop= and stepper=")
    if not sdes:
        raise ValueError("sdes must name the SDE classes the sampler handles, e.g. sdes=(cf.CLD,)")
    check_striding(default_striding)
    if stepper is not None:
        if not (isinstance(stepper, type) and issubclass(stepper, Stepper)):
            raise TypeError(f"stepper must be a Stepper subclass, got {stepper!r}")
        loop, options, fixed_steps, custom_grid = fixed_step_loop(stepper), stepper.options, True, True
    for o in options:
        if not isinstance(o, Option):
            raise TypeError(f"options must be cld_fast.samplers.Option declarations, got {o!r}")
        clash = [s.name for s in SAMPLERS.values() if s.option(o.name) not in (None, o)]
        if clash:
            raise ValueError(f"option {o.name!r} is declared differently by {clash}: one name, one meaning")
    spec = SamplerSpec(name, loop, tuple(sdes), bool(fixed_steps), summary, default_striding, tuple(options),
                       bool(custom_grid), stepper)
    SAMPLERS[name] = spec
    return spec


def sampler_names(sde=None, fixed_steps: Optional[bool] = None) -> tuple:
    """Names of the registered samplers (those that handle ``sde``'s type / have fixed steps, when given)."""
    return tuple(n for n, s in SAMPLERS.items() if (sde is None or isinstance(sde, s.sdes))
                 and (fixed_steps is None or s.fixed_steps == fixed_steps))


def all_options() -> Dict[str, Option]:
    """Every declared option of every registered sampler, by name (one meaning per name)."""
    out: Dict[str, Option] = {}
    for spec in SAMPLERS.values():
        for o in spec.options:
            out.setdefault(o.name, o)
    return out


def get_spec(method: str) -> SamplerSpec:
    """The registered sampler ``method`` (ValueError naming the registered ones otherwise)."""
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {sampler_names()}, got {method!r}")
    return SAMPLERS[method]
