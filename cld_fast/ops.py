"""Public CLD ops: check inputs, dispatch one fused kernel to a backend.

Layouts: data x has shape (B, C, ...) (2-D data: (B, D)); the state u = (x, v) has shape
(B, 2C, ...) with x in the first C channels and v in the last C. Every kernel sees u as a
(B, 2, D) view, so the buffer ``perturb`` writes is the one the network consumes. Times are forward
times t in (0, 1], t = 0 is data. Kernels take the times and the CLD parameters
(``sde.kernel_params``) and compute their coefficients themselves; the ops are declared once in
``cld_fast.opdefs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import backends, checks, opdefs, philox
from .sde import (AFFINE_KIND_CODES, CLD, GDDIM_COLS, GDDIM_PREDICTIONS, OBJECTIVE_CODES, OUTPUT_CODES, WEIGHTING_CODES,
                  kernel_params)


@dataclass(frozen=True)
class Noise:
    """What ``perturb`` drew, so ``hsm_loss`` can recover eps_v without anyone storing it twice.

    Exactly one of ``eps`` ((B, 2, D) tensor: eps_x, eps_v) and ``seed`` ((1,) int64 tensor of the
    Philox contract in ``cld_fast.philox``) is set. ``backend`` names the backend that drew it.
    """

    eps: Optional[torch.Tensor]
    seed: Optional[torch.Tensor]
    backend: str
    objective: str
    numel: int

    @property
    def eps_v(self) -> Optional[torch.Tensor]:
        """(B, D) eps_v when the noise was explicit, else None (regenerated from ``seed``)."""
        return None if self.eps is None else self.eps[:, 1]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _state_view(u: torch.Tensor) -> torch.Tensor:
    """The (B, 2, D) view of a state u (B, 2C, ...) that kernels write into (u must be viewable)."""
    return u.view(u.shape[0], 2, -1)


def _state_read(u: torch.Tensor) -> torch.Tensor:
    """u as (B, 2, D) for reading: a view where the layout allows, else a contiguous copy."""
    return u.reshape(u.shape[0], 2, -1)


def _check_sde(sde, name="sde"):
    if not isinstance(sde, CLD):
        raise TypeError(f"{name} must be a cld_fast.CLD, got {type(sde).__name__}")


def _run(mod, name, *args):
    """Call op ``name`` of backend module ``mod`` with the opdefs schema arguments."""
    return mod.op(name)(*args)


def _times(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels read it: float32 or float64 (other float dtypes are widened to float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def perturb(x0: torch.Tensor, t: torch.Tensor, sde: CLD, objective: str = "hsm", generator: Optional[torch.Generator] = None,
            eps: Optional[torch.Tensor] = None, backend: Optional[str] = None,
            seed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Noise]:
    """Sample u_t ~ p(u_t | x0) of the CLD perturbation kernel in one fused launch.

    The kernel computes the mean matrix A(t), the covariance and its 2x2 Cholesky factor L(t) per
    sample from ``t`` and the CLD parameters itself (float64 per-row math, ``cld_fast.sde``'s
    formulas), so a call is one launch plus the seed draw; no coefficient ops run on the device.

    Args:
        x0: (B, C, ...) or (B, D) data, float32 or float64.
        t: (B,) forward times in (0, 1] on x0's device (float32 or float64).
        sde: the CLD.
        objective: "hsm" (v0 marginalised, the default) or "dsm" (v0 ~ N(0, gamma M) drawn here).
        generator: torch.Generator for the noise (its device's default generator when None).
        eps: optional explicit noise (B, 2, D) (eps_x, eps_v), for exact reproduction.
        backend: force a backend (else ``CLD_FAST_BACKEND`` or automatic choice).
        seed: optional (1,) int64 tensor on x0's device: draw the noise in-kernel by the Philox
            contract of ``cld_fast.philox`` with this seed (any backend) instead of from ``generator``.
    Returns:
        u: (B, 2C, ...) in x0's dtype, x in the first C channels, v in the last C.
        noise: a ``Noise`` handle for ``hsm_loss``.
    """
    _check_sde(sde)
    if objective not in OBJECTIVE_CODES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVE_CODES)}, got {objective!r}")
    checks.tensor(x0, "x0", min_dim=2)
    b = x0.shape[0]
    checks.time(t, b, x0.device)
    d = x0[0].numel()
    mod = backends.select(x0.device, x0.dtype, backend)
    # the cpu kernel checks x0 and eps for NaN / inf as it reads them; elsewhere a check runs first
    fused_check = (getattr(mod, "PERTURB_CHECKS_FINITE", False) and checks.value_checks_enabled()
                   and checks.on_host(x0))
    if not fused_check:
        checks.finite(x0, "x0", wait=False)
    u = torch.empty((b, 2 * x0.shape[1]) + tuple(x0.shape[2:]), dtype=x0.dtype, device=x0.device)
    v0 = None
    if objective == "dsm":
        v0 = torch.randn((b, d), generator=generator, device=x0.device, dtype=x0.dtype) * math.sqrt(sde.gamma * sde.M)
    if seed is not None:
        if eps is not None:
            raise ValueError("pass either eps or seed to perturb, not both")
        seed = _seed(seed, x0.device)
    elif eps is not None:
        checks.tensor(eps, "eps", dtypes=checks.STATE_DTYPES)
        checks.same_device(x0, "x0", eps=eps)
        if tuple(eps.shape) != (b, 2, d):
            raise ValueError(f"eps must have shape {(b, 2, d)} (eps_x, eps_v per element of x0), got {tuple(eps.shape)}")
        if not fused_check:
            checks.finite(eps, "eps", wait=False)
        eps = eps.to(x0.dtype)
    elif mod.NAME == "torch":
        eps = torch.randn((b, 2, d), generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        seed = philox.seed_from_generator(generator, x0.device)
    x0 = x0.detach() if x0.requires_grad else x0  # the fused kernel has no backward: never keep x0's graph
    _run(mod, "perturb", _flat(x0), v0, _times(t), kernel_params(sde, x0.device), OBJECTIVE_CODES[objective],
         eps, seed, _state_view(u))
    if fused_check:
        bad = mod.nonfinite_perturb_inputs()
        for bit, name in ((1, "x0"), (2, "eps")):
            if bad & bit:
                raise checks.nonfinite_error(name)
    return u, Noise(eps=eps, seed=seed, backend=mod.NAME, objective=objective, numel=b * d)


def _is_unit(grad: torch.Tensor) -> bool:
    """Whether ``grad`` is a CPU scalar equal to 1 (read from host memory: no device sync, no op)."""
    return grad.device.type == "cpu" and grad.dim() == 0 and grad.tolist() == 1.0


class _HSMLoss(torch.autograd.Function):
    """HSM loss, eps_v drawn once per evaluation.

    Backends with ``LOSS_GRAD_IN_FORWARD`` (the C++ CPU kernels, where drawing eps_v costs more than
    the memory it would touch) compute d loss / d out for a unit upstream gradient in the forward
    pass, from the same residuals, and the backward scales it (one multiply; none for the unit
    gradient of ``loss.backward()``, the fused-loss convention). The others keep the
    forward/backward split and regenerate eps_v from the seed in the backward, which on a GPU moves
    fewer bytes (docs/kernels.md).
    """

    @staticmethod
    def forward(ctx, out2, u3, t, params, weighting, scale, reduction, eps_v, seed, backend_name, objective, output):
        mod = backends.get(backend_name)
        unit_grad = None
        if ctx.needs_input_grad[0] and getattr(mod, "LOSS_GRAD_IN_FORWARD", False):
            unit_grad = torch.empty_like(out2, memory_format=torch.contiguous_format)
            loss = _run(mod, "hsm_loss_fwd_grad", out2, u3, t, params, weighting, scale, reduction, eps_v, seed,
                        objective, output, unit_grad)
        else:
            loss = _run(mod, "hsm_loss_fwd", out2, u3, t, params, weighting, scale, reduction, eps_v, seed, objective,
                        output)
        ctx.save_for_backward(out2, u3, t, params, eps_v, seed)
        ctx.unit_grad = unit_grad  # not an input or output: kept on ctx, so backward can hand it over
        ctx.args = (weighting, scale, backend_name, objective, output)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out2, u3, t, params, eps_v, seed = ctx.saved_tensors
        weighting, scale, backend_name, objective, output = ctx.args
        unit_grad = ctx.unit_grad
        if unit_grad is not None and _is_unit(grad):
            # loss.backward(): the forward's gradient itself, no multiply. The graph lets go of it, so the
            # caller may own it (autograd accumulates into it); a retained graph's next backward recomputes.
            grad_out, ctx.unit_grad = unit_grad, None
        elif unit_grad is not None:
            g = grad.to(unit_grad.dtype)
            grad_out = unit_grad * (g if g.dim() == 0 else g.unsqueeze(1))
        else:
            mod = backends.get(backend_name)
            grad_out = _run(mod, "hsm_loss_bwd", grad, out2, u3, t, params, weighting, scale, eps_v, seed, objective,
                            output)
        grad_u = None
        if ctx.needs_input_grad[1]:
            # d loss / d v = (c / a) d loss / d out; only when u itself requires grad (not in training).
            cwa = opdefs.loss_coefficients_from(params, t, weighting, objective, output).to(u3.dtype)
            grad_u = torch.zeros_like(u3)
            grad_u[:, 1] = (cwa[:, 0:1] / cwa[:, 2:3]) * grad_out.to(u3.dtype)
        return grad_out, grad_u, None, None, None, None, None, None, None, None, None, None


_REDUCTIONS = ("mean", "sum", "none")


def hsm_loss(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: CLD, noise: Noise,
             weighting: str = "reweightedv2", reduction: str = "mean", backend: Optional[str] = None,
             objective: str = "hsm", output: str = "mixed") -> torch.Tensor:
    """Score matching loss of the official CLD-SGM code (HSM or DSM), fused and differentiable in ``out``.

    With score = score_fn output for ``output`` (``CLD.score_coefficients``; default the mixed score
    -v / s_vv - out / l22) and l22, eps_v of the ``objective``'s perturbation kernel, per sample,
    summed over data dimensions (``CLD.loss_coefficients``):
      ``reweightedv2`` (default): (-l22 score - eps_v)^2, for the mixed score (out + v l22 / s_vv - eps_v)^2
      ``reweightedv1``: the same times beta(t) Gamma
      ``likelihood``: (score + eps_v / l22)^2 beta(t) Gamma.
    The kernel computes l22, s_vv and the weight from ``t`` itself and reduces over samples too
    (deterministically), so the forward is one launch (two where a long row is split into chunks)
    and the backward one elementwise launch.

    Args:
        out: (B, C, ...) network output (float32, bfloat16, float16; float64 with a float64 state).
        u: (B, 2C, ...) perturbed state from ``perturb``.
        t: (B,) forward times used for ``u``.
        sde: the CLD used for ``u``.
        noise: the handle ``perturb`` returned with ``u``.
        weighting: "reweightedv2", "reweightedv1" or "likelihood".
        reduction: "mean" (scalar, the official training loss), "sum", or "none" ((B,) per sample).
        objective: "hsm" (default) or "dsm" (denoising score matching, official ``cld_objective``):
            must be the objective ``perturb`` drew ``u`` with.
        output: what the network outputs: "mixed" (default, official ``mixed_score=True``), "eps"
            (official ``mixed_score=False``: score = -out / l22) or "score" (out is the score).
    Returns:
        The loss in u's dtype (float32 or float64); gradients flow to ``out``.
    """
    _check_sde(sde)
    checks.tensor(u, "u", min_dim=2)
    checks.tensor(out, "out", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    if not isinstance(noise, Noise):
        raise TypeError(f"noise must be the Noise handle returned by cld_fast.perturb, got {type(noise).__name__}")
    if objective not in OBJECTIVE_CODES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVE_CODES)}, got {objective!r}")
    if output not in OUTPUT_CODES:
        raise ValueError(f"output must be one of {tuple(OUTPUT_CODES)} (what the network predicts), got {output!r}")
    if noise.objective != objective:
        raise ValueError(f"noise was drawn by perturb(objective={noise.objective!r}) but hsm_loss got "
                         f"objective={objective!r}; pass objective={noise.objective!r} (the loss must match the "
                         f"perturbation kernel)")
    if weighting not in WEIGHTING_CODES:
        raise ValueError(f"weighting must be one of {tuple(WEIGHTING_CODES)}, got {weighting!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    x_shape = checks.data_shape_of(u)
    if tuple(out.shape) != x_shape:
        raise ValueError(f"out must have the data shape {x_shape} (the v half of u), got {tuple(out.shape)}")
    if out.dtype == torch.float64 and u.dtype != torch.float64:
        raise TypeError("out is float64 but u is float32; use a float64 state for a float64 output")
    checks.same_device(u, "u", out=out)
    b = u.shape[0]
    checks.time(t, b, u.device)
    d = out[0].numel()
    if noise.numel != b * d:
        raise ValueError(f"noise was drawn for {noise.numel} elements but u holds {b * d}; pass the noise perturb returned with u")
    name = backend or backends.forced() or noise.backend
    mod = backends.select(u.device, u.dtype, name)
    eps_v = None if noise.eps is None else noise.eps[:, 1].to(u.dtype)
    scale = 1.0 / b if reduction == "mean" else 1.0
    return _HSMLoss.apply(_flat(out), _state_read(u), _times(t), kernel_params(sde, u.device),
                          WEIGHTING_CODES[weighting], scale, 0 if reduction == "none" else 1, eps_v, noise.seed, mod.NAME,
                          OBJECTIVE_CODES[objective], OUTPUT_CODES[output])


def mixed_score(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: CLD, backend: Optional[str] = None,
                objective: str = "hsm", output: str = "mixed") -> torch.Tensor:
    """Score grad_v log p_t(u) = c0(t) v + c1(t) out from a network output, one launch.

    Default: the mixed score -v / s_vv(t) - out / l22(t) (HSM kernel). ``objective="dsm"`` takes l22
    from the DSM kernel (the official score function of DSM-trained models); ``output="eps"``:
    -out / l22 (official ``mixed_score=False``); ``output="score"``: out itself
    (``CLD.score_coefficients``). out (B, C, ...) network output, u (B, 2C, ...) state, t (B,)
    forward times; returns x's shape in u's dtype.
    """
    if objective not in OBJECTIVE_CODES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVE_CODES)}, got {objective!r}")
    if output not in OUTPUT_CODES:
        raise ValueError(f"output must be one of {tuple(OUTPUT_CODES)} (what the network predicts), got {output!r}")
    _check_sde(sde)
    checks.tensor(u, "u", min_dim=2)
    checks.tensor(out, "out", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    x_shape = checks.data_shape_of(u)
    if tuple(out.shape) != x_shape:
        raise ValueError(f"out must have the data shape {x_shape}, got {tuple(out.shape)}")
    checks.same_device(u, "u", out=out)
    checks.time(t, u.shape[0], u.device)
    mod = backends.select(u.device, u.dtype, backend)
    score = _run(mod, "mixed_score", _flat(out), _state_read(u), _times(t), kernel_params(sde, u.device),
                 OBJECTIVE_CODES[objective], OUTPUT_CODES[output])
    return score.view(x_shape)


# ---- sampler steps -------------------------------------------------------------------------------


def _grid(ts, device, name="ts") -> torch.Tensor:
    """A (S + 1,) forward-time grid tensor on ``device`` (float32 / float64; lists are converted)."""
    if not isinstance(ts, torch.Tensor):
        ts = torch.tensor(ts, dtype=torch.float64)
    if not ts.is_floating_point() or ts.dim() != 1 or ts.numel() < 1:
        raise ValueError(f"{name} must be a 1-D floating tensor of forward times, got {tuple(ts.shape)} {ts.dtype}")
    if ts.device != torch.device(device) and not (ts.device.type == "cuda" == torch.device(device).type):
        ts = ts.to(device)
    if checks.value_checks_enabled():
        checks.in_range(ts, name, 0.0, 1.0, what="(forward times)")
    return _times(ts)


def _check_step_range(step, points: int, reads_next: bool, op: str) -> None:
    """Raise the same ValueError on every backend when the step lies outside the grid.

    An int step is always checked; a tensor step with value checks on (``checks.int_in_range``: at
    once on a CPU, by a device assertion elsewhere). Whatever the checks, the kernels read the step
    themselves: the Triton and CUDA kernels write NaN for an out-of-range step (no memory outside
    ``ts`` is read), the C++ CPU kernels raise this error as a RuntimeError, and the torch
    reference's IndexError is re-raised as this ValueError by ``_run_step``.
    """
    last = points - 2 if reads_next else points - 1
    if isinstance(step, torch.Tensor) and checks.value_checks_enabled() and step.numel() == 1 \
            and step.dtype == torch.int64:
        checks.int_in_range(step, "step", 0, last, _step_error(op, "{value}", points, last))
    elif isinstance(step, int) and not isinstance(step, bool) and not 0 <= step <= last:
        raise ValueError(_step_error(op, step, points, last))


def _step_error(op, step, points, last) -> str:
    if last < 0:
        return f"{op}: step = {step} is out of range: the time grid ts has {points} point(s), too few for a step"
    return f"{op}: step = {step} is out of range for a time grid ts of {points} points (valid 0..{last})"


def _run_step(mod, name, op, points, *args):
    """``_run`` for a step op; the torch reference's IndexError for a bad tensor step becomes the usual error."""
    try:
        return _run(mod, name, *args)
    except IndexError as exc:
        raise ValueError(_step_error(op, "<tensor>", points, points - 2)) from exc


def _prepare_step(u, y, ts, sde, step, eps, eps_count, op, reads_next=True):
    _check_sde(sde)
    checks.tensor(u, "u", min_dim=2)
    x_shape = checks.data_shape_of(u)
    if y is not None:
        checks.tensor(y, "y", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        if tuple(y.shape) != x_shape:
            raise ValueError(f"y (the score or network output) must have the data shape {x_shape}, got {tuple(y.shape)}")
        checks.same_device(u, "u", y=y)
    ts = _grid(ts, u.device)
    _check_step_range(step, ts.numel(), reads_next, op)
    step = checks.step_tensor(step, u.device)
    if eps is not None:
        checks.tensor(eps, "eps")
        b, d = x_shape[0], int(math.prod(x_shape[1:]))
        want = (b, eps_count, d) if eps_count > 1 else (b, d)
        if tuple(eps.shape) != want:
            raise ValueError(f"eps must have shape {want}, got {tuple(eps.shape)}")
        checks.same_device(u, "u", eps=eps)
        checks.finite(eps, "eps", wait=False)
        eps = eps.to(u.dtype)
    return ts, step, eps


def _check_obs(obs, u, x_shape):
    """The packed inpainting condition of a step op (``cld_fast.conditions.Inpaint.packed``) checked
    against the state: (B, 2, D) or (B, 4, D) contiguous, u's dtype and device."""
    if obs is None:
        return None
    b, d = x_shape[0], int(math.prod(x_shape[1:]))
    if not isinstance(obs, torch.Tensor) or obs.dim() != 3 or tuple(obs.shape[::2]) != (b, d) \
            or obs.shape[1] not in (2, 4):
        got = tuple(obs.shape) if isinstance(obs, torch.Tensor) else type(obs).__name__
        raise ValueError(f"obs must be a ({b}, 2 or 4, {d}) tensor (x_obs, mask[, z_x, z_v]; "
                         f"cf.Inpaint(...).packed(...)), got {got}")
    if obs.dtype != u.dtype:
        raise TypeError(f"obs must have the state dtype {u.dtype}, got {obs.dtype}")
    checks.same_device(u, "u", obs=obs)
    return obs.contiguous()


def _check_guidance(y_uncond, guide_weight, y):
    """The classifier-free guidance pair of a step op: y_uncond (y's shape, dtype and device; any
    strides, e.g. the unconditional half of a batch-doubled network output) as (B, D), and the weight
    as a finite float. Without y_uncond the weight is not read."""
    if y_uncond is None:
        return None, 0.0
    if not isinstance(y_uncond, torch.Tensor):
        raise TypeError(f"y_uncond must be a tensor (the unconditional network output) or None, "
                        f"got {type(y_uncond).__name__}")
    if tuple(y_uncond.shape) != tuple(y.shape) or y_uncond.dtype != y.dtype:
        raise ValueError(f"y_uncond must have y's shape and dtype {tuple(y.shape)} {y.dtype}, "
                         f"got {tuple(y_uncond.shape)} {y_uncond.dtype}")
    checks.same_device(y, "y", y_uncond=y_uncond)
    if isinstance(guide_weight, bool) or not isinstance(guide_weight, (int, float)) \
            or not math.isfinite(guide_weight):
        raise ValueError(f"guide_weight must be a finite real number, got {guide_weight!r}")
    return _flat(y_uncond), float(guide_weight)


def _seed(seed, device):
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        return philox.seed_from_generator(seed, device)
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not 0 <= seed < philox.SEED_BOUND:
            raise ValueError(f"seed must be in [0, 2**62), got {seed}")
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1:
        if seed.device != torch.device(device) and not (seed.device.type == "cuda" == torch.device(device).type):
            raise ValueError(f"seed is on {seed.device} but the data is on {device}")
        if checks.value_checks_enabled():
            checks.int_in_range(seed, "seed", 0, philox.SEED_BOUND - 1, "seed must be in [0, 2**62), got {value}")
        return seed.reshape(1)
    raise TypeError("seed must be None, an int in [0, 2**62), a torch.Generator or a (1,) int64 tensor")


def _inplace(u, fn):
    """Run an in-place kernel on u's (B, 2, D) view; a u that has no such view goes through a copy."""
    try:
        view = _state_view(u)
    except RuntimeError:
        work = u.contiguous()
        fn(_state_view(work))
        u.copy_(work)
        return u
    fn(view)
    return u


def half_step_(u: torch.Tensor, ts, sde: CLD, step=0, seed=None, eps: Optional[torch.Tensor] = None,
               backend: Optional[str] = None, obs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: the exact linear part of the reverse SDE from forward time ts[step] to ts[step + 1].

    u <- A u + L z, with A and L computed in-kernel from the two times (``CLD.half_step_coefficients``).

    Args:
        u: (B, 2C, ...) state, float32/float64.
        ts: (S + 1,) forward-time grid (tensor on u's device, or a list), decreasing.
        sde: the CLD.
        step: int or (1,) int64 tensor on u's device (read in-kernel: no host sync).
        seed: None (no noise unless ``eps``), an int, a Generator or a (1,) int64 tensor (in-kernel Philox).
        eps: optional explicit noise (B, 2, D).
        obs: optional inpainting condition (B, 2 or 4, D) in u's dtype (``cf.Inpaint(...).packed``):
            afterwards the observed elements hold a fresh HSM perturbation of x_obs at ts[step + 1]
            (Philox tag INPAINT, normals z2, z3, unless obs carries the noise).
    """
    ts, step, eps = _prepare_step(u, None, ts, sde, step, eps, 2, "half_step_")
    obs = _check_obs(obs, u, checks.data_shape_of(u))
    mod = backends.select(u.device, u.dtype, backend)
    s = _seed(seed, u.device)
    params = kernel_params(sde, u.device)
    return _inplace(u, lambda u3: _run_step(mod, "half_step_", "half_step_", ts.numel(), u3, ts, step, params, eps, s,
                                            obs))


def sscs_step_(u: torch.Tensor, y: torch.Tensor, ts, sde: CLD, step=0, mixed: bool = False, seed=None,
               eps: Optional[torch.Tensor] = None, backend: Optional[str] = None,
               official_half_steps: bool = False, obs: Optional[torch.Tensor] = None,
               y_uncond: Optional[torch.Tensor] = None, guide_weight: float = 0.0) -> torch.Tensor:
    """In place: the fused SSCS update after the network evaluation of step i = ``step`` (one launch per NFE).

    With t = ts[i] and h = ts[i] - ts[i + 1]: v <- alpha v + kappa y (the score's Euler step at t;
    y is the score, or the raw network output when ``mixed`` folds the mixed score into alpha and
    kappa), then the closing half step t - h/2 -> ts[i + 1] with noise (z0, z1) and, unless this is
    the last step of the grid, the opening half step of step i + 1 with (z2, z3). Every
    coefficient is computed in-kernel from ts and the CLD parameters.

    Args:
        u: (B, 2C, ...) state; y: (B, C, ...) score or network output (fp32/bf16/fp16).
        ts: (S + 1,) forward-time grid; sde: the CLD; mixed: y is a mixed-score network output.
        step, seed, eps: as in ``half_step_``; eps has shape (B, 4, D).
        official_half_steps: the closing half step spans t -> t - h/2 like the official sampler's
            (``CLD.sscs_closing_half_step``; differs from the default only for non-constant beta).
        obs: optional inpainting condition (B, 2 or 4, D) in u's dtype (``cf.Inpaint(...).packed``):
            afterwards the observed elements hold a fresh HSM perturbation of x_obs at the time the
            opening half step ends, ts[i + 1] - h_{i+1} / 2 (ts[i + 1] after the grid's last step).
        y_uncond, guide_weight: optional classifier-free guidance: y_uncond (y's shape and dtype, the
            unconditional network output) makes the kernel read y + guide_weight (y - y_uncond) in
            place of y (``cld_fast.opdefs.guided_output``), in the same launch.
    """
    if not isinstance(official_half_steps, bool):
        raise TypeError(f"official_half_steps must be a bool, got {type(official_half_steps).__name__}")
    ts, step, eps = _prepare_step(u, y, ts, sde, step, eps, 4, "sscs_step_")
    obs = _check_obs(obs, u, checks.data_shape_of(u))
    yu, w = _check_guidance(y_uncond, guide_weight, y)
    mod = backends.select(u.device, u.dtype, backend)
    s = _seed(seed, u.device)
    params = kernel_params(sde, u.device)
    y2 = _flat(y)
    return _inplace(u, lambda u3: _run_step(mod, "sscs_step_", "sscs_step_", ts.numel(), u3, y2, ts, step, params,
                                            bool(mixed), eps, s, official_half_steps, obs, yu, w))


def em_step_(u: torch.Tensor, y: torch.Tensor, ts, sde: CLD, step=0, mixed: bool = False, denoise: bool = False,
             seed=None, eps: Optional[torch.Tensor] = None, backend: Optional[str] = None,
             obs: Optional[torch.Tensor] = None, y_uncond: Optional[torch.Tensor] = None,
             guide_weight: float = 0.0) -> torch.Tensor:
    """In place: an Euler–Maruyama step of the reverse SDE from ts[step] to ts[step + 1].

    x <- x - m_inv beta h v; v <- v + beta h (x + Gamma m_inv v + 2 Gamma score) + sqrt(2 Gamma beta h) z.
    ``denoise=True``: the same step without noise (the official final "denoising" step).
    ``mixed``: y is a mixed-score network output (folded in-kernel). eps, if given, has shape (B, D).
    ``obs``: optional inpainting condition (B, 2 or 4, D) in u's dtype (``cf.Inpaint(...).packed``):
    afterwards the observed elements hold a fresh HSM perturbation of x_obs at ts[step + 1]
    (``denoise``: x = x_obs exactly, v as the step leaves it).
    ``y_uncond``, ``guide_weight``: classifier-free guidance, as in ``sscs_step_``.
    """
    ts, step, eps = _prepare_step(u, y, ts, sde, step, eps, 1, "em_step_")
    obs = _check_obs(obs, u, checks.data_shape_of(u))
    yu, w = _check_guidance(y_uncond, guide_weight, y)
    mod = backends.select(u.device, u.dtype, backend)
    s = None if denoise else _seed(seed, u.device)
    eps = None if denoise else eps
    params = kernel_params(sde, u.device)
    kind = AFFINE_KIND_CODES["denoise" if denoise else "em"]
    y2 = _flat(y)
    return _inplace(u, lambda u3: _run_step(mod, "affine_step", "em_step_", ts.numel(), u3, y2, ts, step, params, kind,
                                            bool(mixed), eps, s, u3, obs, yu, w))


def pf_drift(u: torch.Tensor, y: torch.Tensor, t, sde: CLD, mixed: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Probability-flow ODE drift du/dt (forward time) at time t as a new (B, 2C, ...) tensor.

    t: a float or a one-element tensor on u's device (all samples share the time).
    """
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor([float(t)], dtype=torch.float64)
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError("t must be a float or a one-element tensor (the ODE time shared by all samples)")
    ts, step, _ = _prepare_step(u, y, t.reshape(1), sde, 0, None, 1, "pf_drift", reads_next=False)
    mod = backends.select(u.device, u.dtype, backend)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    _run(mod, "affine_step", _state_read(u), _flat(y), ts, step, kernel_params(sde, u.device),
         AFFINE_KIND_CODES["pf_drift"], bool(mixed), None, None, _state_view(out))
    return out


def gddim_history(u: torch.Tensor, order: int, predict: str = "eps") -> torch.Tensor:
    """A zeroed ring buffer for ``gddim_step_``: (order - 1, B, H, D) in u's dtype on u's device, H = 2
    for ``predict="eps"`` (eps_R) and 1 for ``"x0"`` (x0_hat)."""
    checks.tensor(u, "u", min_dim=2)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if predict not in GDDIM_PREDICTIONS:
        raise ValueError(f"predict must be one of {GDDIM_PREDICTIONS}, got {predict!r}")
    b, d = u.shape[0], u[0].numel() // 2
    return torch.zeros((order - 1, b, 2 if predict == "eps" else 1, d), dtype=u.dtype, device=u.device)


def gddim_step_(u: torch.Tensor, y: torch.Tensor, hist: torch.Tensor, table: torch.Tensor, step=0,
                backend: Optional[str] = None, obs: Optional[torch.Tensor] = None, ts=None, sde: Optional[CLD] = None,
                seed=None, y_uncond: Optional[torch.Tensor] = None, guide_weight: float = 0.0) -> torch.Tensor:
    """In place: one exponential-integrator multistep step of the gDDIM sampler (one launch per NFE).

    With r = table[step] (a row of ``cld_fast.samplers.gddim.gddim_table``): cur = E (x, v, y), u <- Lin u + C_0 cur +
    sum_j C_j hist[(step - j) mod K], and cur goes into hist[step mod K] for the next steps.

    Args:
        u: (B, 2C, ...) state, float32/float64; y: (B, C, ...) the score function's output at
            (u, t_step) (the raw network output if the table was made with ``mixed=True``).
        hist: (K, B, H, D) ring buffer from ``gddim_history`` (K = order - 1), updated in place.
        table: (S, 22) float64 rows from ``cld_fast.samplers.gddim.gddim_table`` on u's device.
        step: int or (1,) int64 tensor on u's device (read in-kernel: no host sync).
        obs: optional inpainting condition (B, 2 or 4, D) in u's dtype (``cf.Inpaint(...).packed``),
            with the run's time grid ``ts`` (the table's rows are its steps, plus the denoising row),
            ``sde`` and ``seed``: afterwards the observed elements hold a fresh HSM perturbation of
            x_obs at ts[step + 1]; after the denoising row (step + 1 = len(ts)) x = x_obs exactly.
        y_uncond, guide_weight: optional classifier-free guidance: y_uncond (y's shape and dtype, the
            unconditional network output) makes the kernel read y + guide_weight (y - y_uncond) in
            place of y (``cld_fast.opdefs.guided_output``), in the same launch.
    """
    checks.tensor(u, "u", min_dim=2)
    x_shape = checks.data_shape_of(u)
    checks.tensor(y, "y", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    if tuple(y.shape) != x_shape:
        raise ValueError(f"y (the score or network output) must have the data shape {x_shape}, got {tuple(y.shape)}")
    checks.same_device(u, "u", y=y, hist=hist, table=table)
    b, d = x_shape[0], int(math.prod(x_shape[1:]))
    if hist.dim() != 4 or hist.shape[0] > 2 or tuple(hist.shape[1:2]) + tuple(hist.shape[3:]) != (b, d) \
            or hist.shape[2] not in (1, 2) or hist.dtype != u.dtype:
        raise ValueError(f"hist must be a (K <= 2, {b}, 1 or 2, {d}) {u.dtype} ring buffer (cf.gddim_history), "
                         f"got {tuple(hist.shape)} {hist.dtype}")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != GDDIM_COLS \
            or table.shape[0] < 1 or table.dtype not in (torch.float32, torch.float64):
        got = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a (S >= 1, {GDDIM_COLS}) float tensor from "
                         f"cld_fast.samplers.gddim.gddim_table, got {got}")
    checks.finite(table, "table", wait=False)
    rows = table.shape[0]
    message = f"gddim_step_: step = {{value}} is out of range for a table of {rows} rows (valid 0..{rows - 1})"
    if isinstance(step, torch.Tensor) and checks.value_checks_enabled() and step.numel() == 1 \
            and step.dtype == torch.int64:
        checks.int_in_range(step, "step", 0, rows - 1, message)
    elif isinstance(step, int) and not isinstance(step, bool) and not 0 <= step < rows:
        raise ValueError(message.replace("{value}", str(step)))
    obs = _check_obs(obs, u, x_shape)
    yu, w = _check_guidance(y_uncond, guide_weight, y)
    params = s = None
    if obs is not None:
        if ts is None or sde is None:
            raise ValueError("gddim_step_ with obs needs the run's time grid ts and the sde (the replacement time)")
        _check_sde(sde)
        ts = _grid(ts, u.device)
        if table.shape[0] not in (ts.numel() - 1, ts.numel()):
            raise ValueError(f"ts has {ts.numel()} points but table has {table.shape[0]} rows; expected "
                             f"{ts.numel() - 1} (no denoising row) or {ts.numel()}")
        params, s = kernel_params(sde, u.device), _seed(seed, u.device)
    else:
        ts = None
    step = checks.step_tensor(step, u.device)
    mod = backends.select(u.device, u.dtype, backend)
    y2 = _flat(y)

    def run(u3):
        try:
            _run(mod, "gddim_step_", u3, hist, y2, table, step, ts, params, s, obs, yu, w)
        except IndexError as exc:  # the torch reference with a bad tensor step
            raise ValueError(f"gddim_step_: step = <tensor> is out of range for a table of {rows} rows "
                             f"(valid 0..{rows - 1})") from exc

    return _inplace(u, run)
