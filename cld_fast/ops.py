"""Public CLD ops: check inputs, take coefficients from ``cld_fast.sde``, dispatch to a backend.

Layouts: data x has shape (B, C, ...) (2-D data: (B, D)); the state u = (x, v) has shape
(B, 2C, ...) with x in the first C channels and v in the last C. Every kernel sees u as a
(B, 2, D) view, so the buffer ``perturb`` writes is the one the network consumes. Times are forward
times t in (0, 1], t = 0 is data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import backends, checks, philox
from .sde import AFFINE_COLS, CLD, HALF_COLS, SSCS_COLS


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
    return u.view(u.shape[0], 2, -1)


def _check_sde(sde, name="sde"):
    if not isinstance(sde, CLD):
        raise TypeError(f"{name} must be a cld_fast.CLD, got {type(sde).__name__}")


@dataclass(frozen=True)
class TrainingTimes:
    """Times, coefficient tables and a noise seed for one training batch, on the data's device.

    ``t`` (B,) float32 (float64 for a float64 state), ``perturb`` (B, 7) and ``loss`` (B, 2) in the
    state dtype, ``seed`` (1,) int64 for in-kernel Philox noise. All are contiguous views of one
    buffer built by ``training_times`` on the host and moved in one pinned, non-blocking copy, so a
    training step runs no coefficient kernels, no seed kernel, and never synchronises the host.
    """

    t: torch.Tensor
    perturb: torch.Tensor
    loss: torch.Tensor
    seed: torch.Tensor


def training_times(batch: int, sde: CLD, device, generator: Optional[torch.Generator] = None, loss_eps: float = 1e-5,
                   weighting: str = "reweightedv2", dtype: torch.dtype = torch.float32,
                   loss_scale: float = 1.0) -> TrainingTimes:
    """Draw t ~ U(loss_eps, 1) and a Philox seed on the host and precompute the coefficient tables.

    Args:
        batch: B. sde: the CLD. device: where the data lives. generator: a CPU generator (or None).
        loss_eps: smallest training time. weighting: loss weighting. dtype: state dtype.
        loss_scale: multiplies the weight column of the loss table. With ``1 / batch``,
            ``hsm_loss(..., reduction="sum")`` is the batch mean, and its backward is a view: the
            step then needs no mean and no gradient-scaling kernel.
    Returns:
        TrainingTimes on ``device``; pass ``tt.t`` to the network and ``coefficients=tt.perturb``
        (and ``seed=tt.seed`` for in-kernel noise) to ``perturb``, ``coefficients=tt.loss`` to ``hsm_loss``.
    """
    _check_sde(sde)
    checks.optional_int(batch, "batch", minimum=1)
    if not 0.0 < loss_eps < 1.0:
        raise ValueError(f"loss_eps must lie in (0, 1), got {loss_eps}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator must be a CPU generator: training times are drawn on the host")
    if dtype not in checks.STATE_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    t = torch.rand(batch, generator=generator, dtype=torch.float64) * (1.0 - loss_eps) + loss_eps
    seed = torch.randint(0, philox.SEED_BOUND, (1,), generator=generator, dtype=torch.int64)
    values = torch.cat([t, sde.perturbation_kernel(t, "hsm").table().flatten(),
                        (sde.loss_coefficients(t, weighting) * torch.tensor([1.0, float(loss_scale)],
                                                                            dtype=torch.float64)).flatten()]).to(dtype)
    # One integer buffer of the state dtype's width: the seed's 8 bytes first, then the float values
    # written through a float view, so the seed's bits never pass through a float copy.
    word = torch.int32 if dtype == torch.float32 else torch.int64
    head = 8 // values.element_size()
    buf = torch.empty(head + values.numel(), dtype=word)
    buf[:head] = seed.view(word)
    buf[head:].view(dtype).copy_(values)
    device = torch.device(device)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    else:
        buf = buf.to(device)
    vals = buf[head:].view(dtype)
    b = batch
    return TrainingTimes(t=vals[:b], perturb=vals[b:8 * b].view(b, 7), loss=vals[8 * b:10 * b].view(b, 2),
                         seed=buf[:head].view(torch.int64))


def perturb(x0: torch.Tensor, t: torch.Tensor, sde: CLD, objective: str = "hsm", generator: Optional[torch.Generator] = None,
            eps: Optional[torch.Tensor] = None, backend: Optional[str] = None,
            coefficients: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Noise]:
    """Sample u_t ~ p(u_t | x0) of the CLD perturbation kernel in one fused pass.

    Args:
        x0: (B, C, ...) or (B, D) data, float32 or float64.
        t: (B,) forward times in (0, 1].
        sde: the CLD.
        objective: "hsm" (v0 marginalised, the default) or "dsm" (v0 ~ N(0, gamma M) drawn here).
        generator: torch.Generator for the noise (its device's default generator when None).
        eps: optional explicit noise (B, 2, D) (eps_x, eps_v), for exact reproduction.
        backend: force a backend (else ``CLD_FAST_BACKEND`` or automatic choice).
        coefficients: optional precomputed (B, 7) ``sde.perturbation_kernel(t, objective).table()``
            on x0's device (see ``training_times``); skips the coefficient math here.
        seed: optional (1,) int64 tensor on x0's device: draw the noise in-kernel by the Philox
            contract of ``cld_fast.philox`` with this seed (any backend) instead of from ``generator``.
    Returns:
        u: (B, 2C, ...) in x0's dtype, x in the first C channels, v in the last C.
        noise: a ``Noise`` handle for ``hsm_loss``.
    """
    _check_sde(sde)
    checks.tensor(x0, "x0", min_dim=2)
    b = x0.shape[0]
    checks.time(t, b, x0.device)
    checks.finite(x0, "x0")
    d = x0[0].numel()
    mod = backends.select(x0.device, x0.dtype, backend)
    if coefficients is None:
        coef = sde.perturbation_kernel(t, objective).table().to(x0.dtype)
    else:
        coef = _check_coefficients(coefficients, b, 7, x0, "coefficients").to(x0.dtype)
    u = torch.empty((b, 2 * x0.shape[1]) + tuple(x0.shape[2:]), dtype=x0.dtype, device=x0.device)
    x2 = _flat(x0)
    v0 = None
    if objective == "dsm":
        v0 = torch.randn(x2.shape, generator=generator, device=x0.device, dtype=x0.dtype) * math.sqrt(sde.gamma * sde.M)
    if seed is not None:
        if eps is not None:
            raise ValueError("pass either eps or seed to perturb, not both")
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError("seed must be a (1,) int64 tensor")
        checks.same_device(x0, "x0", seed=seed)
        seed = seed.reshape(1)
    elif eps is not None:
        checks.tensor(eps, "eps", dtypes=checks.STATE_DTYPES)
        checks.same_device(x0, "x0", eps=eps)
        if tuple(eps.shape) != (b, 2, d):
            raise ValueError(f"eps must have shape {(b, 2, d)} (eps_x, eps_v per element of x0), got {tuple(eps.shape)}")
        eps = eps.to(x0.dtype).contiguous()
    elif mod.NAME in ("triton", "cuda"):
        seed = philox.seed_from_generator(generator, x0.device)
    else:
        eps = torch.randn((b, 2, d), generator=generator, device=x0.device, dtype=x0.dtype)
    mod.perturb(x2, coef, _state_view(u), eps=eps, seed=seed, v0=v0)
    return u, Noise(eps=eps, seed=seed, backend=mod.NAME, objective=objective, numel=b * d)


class _HSMLoss(torch.autograd.Function):
    """Per-sample HSM loss; backward recomputes the residual (eps_v regenerated if seeded)."""

    @staticmethod
    def forward(ctx, out2, u3, coef, eps_v, seed, backend_name):
        mod = backends.get(backend_name)
        loss = mod.hsm_loss_fwd(out2, u3, coef, eps_v, seed)
        ctx.save_for_backward(out2, u3, coef, eps_v, seed)
        ctx.backend_name = backend_name
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out2, u3, coef, eps_v, seed = ctx.saved_tensors
        mod = backends.get(ctx.backend_name)
        # The gradient of a sum is an expanded (stride-0) view; backends that read strides take it as is.
        if not getattr(mod, "STRIDED_LOSS_GRAD", False):
            grad = grad.contiguous()
        grad_out = mod.hsm_loss_bwd(grad, out2, u3, coef, eps_v, seed)
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = torch.zeros_like(u3)
            grad_u[:, 1] = coef[:, 0:1].to(u3.dtype) * grad_out.to(u3.dtype)
        return grad_out, grad_u, None, None, None, None


def _check_coefficients(coef, batch, cols, like, name):
    checks.tensor(coef, name, dtypes=checks.STATE_DTYPES)
    if tuple(coef.shape) != (batch, cols):
        raise ValueError(f"{name} must have shape {(batch, cols)}, got {tuple(coef.shape)}")
    checks.same_device(like, "the data", **{name: coef})
    return coef


def hsm_loss(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: CLD, noise: Noise,
             weighting: str = "reweightedv2", reduction: str = "mean", backend: Optional[str] = None,
             coefficients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hybrid score matching loss of the mixed score parameterisation, fused and differentiable in ``out``.

    Per sample, summed over data dimensions:
      ``reweightedv2`` (default): (out + v l22 / s_vv - eps_v)^2
      ``likelihood``: (score + eps_v / l22)^2 beta(t) Gamma with score = -v / s_vv - out / l22.

    Args:
        out: (B, C, ...) network output (float32, bfloat16, float16; float64 with a float64 state).
        u: (B, 2C, ...) perturbed state from ``perturb``.
        t: (B,) forward times used for ``u``.
        sde: the CLD used for ``u``.
        noise: the handle ``perturb`` returned with ``u``.
        weighting: "reweightedv2" or "likelihood".
        reduction: "mean" (scalar, the official training loss), "sum", or "none" ((B,) per sample).
        coefficients: optional precomputed (B, 2) ``sde.loss_coefficients(t, weighting)`` on u's
            device (see ``training_times``).
    Returns:
        float32 loss (float64 for a float64 state); gradients flow to ``out``.
    """
    _check_sde(sde)
    checks.tensor(u, "u", min_dim=2)
    checks.tensor(out, "out", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    if not isinstance(noise, Noise):
        raise TypeError(f"noise must be the Noise handle returned by cld_fast.perturb, got {type(noise).__name__}")
    if noise.objective != "hsm":
        raise ValueError(f"hsm_loss needs noise from perturb(objective='hsm'), got objective={noise.objective!r}")
    if reduction not in ("mean", "sum", "none"):
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
    name = noise.backend
    forced = backend or backends.forced()
    if forced:
        name = forced
    mod = backends.select(u.device, u.dtype, name)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    if coefficients is None:
        coef = sde.loss_coefficients(t, weighting).to(acc)
    else:
        if weighting not in ("reweightedv2", "likelihood"):
            raise ValueError(f"weighting must be one of ('reweightedv2', 'likelihood'), got {weighting!r}")
        coef = _check_coefficients(coefficients, b, 2, u, "coefficients").to(acc)
    u3 = _state_view(u.contiguous())
    eps_v = None if noise.eps is None else noise.eps[:, 1].contiguous()
    losses = _HSMLoss.apply(_flat(out), u3, coef, eps_v, noise.seed, mod.NAME)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def mixed_score(out: torch.Tensor, u: torch.Tensor, t: torch.Tensor, sde: CLD, backend: Optional[str] = None) -> torch.Tensor:
    """Mixed score grad_v log p_t(u) = -v / s_vv(t) - out / l22(t) (HSM kernel); returns x's shape, u's dtype."""
    _check_sde(sde)
    checks.tensor(u, "u", min_dim=2)
    checks.tensor(out, "out", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
    x_shape = checks.data_shape_of(u)
    if tuple(out.shape) != x_shape:
        raise ValueError(f"out must have the data shape {x_shape}, got {tuple(out.shape)}")
    checks.same_device(u, "u", out=out)
    checks.time(t, u.shape[0], u.device)
    mod = backends.select(u.device, u.dtype, backend)
    coef = sde.mixed_score_coefficients(t).to(u.dtype)
    score = mod.mixed_score(_flat(out), _state_view(u.contiguous()), coef)
    return score.view(x_shape)


def _prepare_step(u, y, tab, cols, step, name_tab, eps, eps_count):
    checks.tensor(u, "u", min_dim=2)
    x_shape = checks.data_shape_of(u)
    checks.table(tab, name_tab, cols, u.device)
    if y is not None:
        checks.tensor(y, "y", dtypes=checks.OUTPUT_DTYPES, min_dim=2)
        if tuple(y.shape) != x_shape:
            raise ValueError(f"y (the score or network output) must have the data shape {x_shape}, got {tuple(y.shape)}")
        checks.same_device(u, "u", y=y)
    step = checks.step_tensor(step, u.device)
    if eps is not None:
        checks.tensor(eps, "eps")
        b, d = x_shape[0], int(math.prod(x_shape[1:]))
        want = (b, eps_count, d) if eps_count > 1 else (b, d)
        if tuple(eps.shape) != want:
            raise ValueError(f"eps must have shape {want}, got {tuple(eps.shape)}")
        checks.same_device(u, "u", eps=eps)
        eps = eps.to(u.dtype).contiguous()
    return x_shape, step, eps


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
        return seed.reshape(1).to(device)
    raise TypeError("seed must be None, an int, a torch.Generator or a (1,) int64 tensor")


def _inplace(u, fn):
    """Run an in-place kernel on u's (B, 2, D) view; non-contiguous u goes through a copy."""
    if u.is_contiguous():
        fn(_state_view(u))
        return u
    work = u.contiguous()
    fn(_state_view(work))
    u.copy_(work)
    return u


def half_step_(u: torch.Tensor, table: torch.Tensor, step=0, seed=None, eps: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """In place: one analytic linear half step of the reverse SDE, u <- A u + L z.

    Args:
        u: (B, 2C, ...) state, float32/float64.
        table: (S, 7) per-step rows (``CLD.half_step_coefficients``); row ``step`` is used.
        step: int or (1,) int64 tensor on u's device (read in-kernel: no host sync).
        seed: None (no noise unless ``eps``), an int, a Generator or a (1,) int64 tensor (in-kernel Philox).
        eps: optional explicit noise (B, 2, D).
    """
    x_shape, step, eps = _prepare_step(u, None, table, HALF_COLS, step, "table", eps, 2)
    mod = backends.select(u.device, u.dtype, backend)
    s = _seed(seed, u.device)
    tab = table.to(u.dtype)
    return _inplace(u, lambda u3: mod.half_step_(u3, tab, step, eps=eps, seed=s))


def sscs_step_(u: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step=0, seed=None,
               eps: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """In place: the fused SSCS update after a network evaluation (one launch per NFE).

    v <- alpha v + kappa y (the score Euler step; y is the score, or the raw network output when
    the table folds in the mixed score), then the closing half step of this step and the opening
    half step of the next, each with its own noise.

    Args:
        u: (B, 2C, ...) state; y: (B, C, ...) score or network output (fp32/bf16/fp16).
        table: (S, 16) rows from ``CLD.sscs_table``; row ``step`` is used.
        step, seed, eps: as in ``half_step_``; eps has shape (B, 4, D).
    """
    x_shape, step, eps = _prepare_step(u, y, table, SSCS_COLS, step, "table", eps, 4)
    mod = backends.select(u.device, u.dtype, backend)
    s = _seed(seed, u.device)
    tab = table.to(u.dtype)
    y2 = _flat(y)
    return _inplace(u, lambda u3: mod.sscs_step_(u3, y2, tab, step, eps=eps, seed=s))


def em_step_(u: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step=0, seed=None,
             eps: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """In place: an affine reverse step (Euler-Maruyama, or its noise-free "denoise" variant).

    x <- c_xx x + c_xv v; v <- c_vx x + c_vv v + c_vy y + sigma z, with row ``step`` of a (S, 6)
    table from ``CLD.reverse_affine_coefficients``. eps, if given, has shape (B, D).
    """
    x_shape, step, eps = _prepare_step(u, y, table, AFFINE_COLS, step, "table", eps, 1)
    mod = backends.select(u.device, u.dtype, backend)
    s = _seed(seed, u.device)
    tab = table.to(u.dtype)
    y2 = _flat(y)
    return _inplace(u, lambda u3: mod.affine_step(u3, y2, tab, step, u3, eps=eps, seed=s))


def pf_drift(u: torch.Tensor, y: torch.Tensor, table: torch.Tensor, step=0, backend: Optional[str] = None) -> torch.Tensor:
    """Probability-flow ODE drift du/dt (forward time) as a new (B, 2C, ...) tensor.

    Uses row ``step`` of a (S, 6) table from ``CLD.reverse_affine_coefficients(t, 0, "pf_drift")``.
    """
    x_shape, step, _ = _prepare_step(u, y, table, AFFINE_COLS, step, "table", None, 1)
    mod = backends.select(u.device, u.dtype, backend)
    tab = table.to(u.dtype)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    mod.affine_step(_state_view(u.contiguous()), _flat(y), tab, step, _state_view(out))
    return out
