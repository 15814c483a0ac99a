"""Eager PyTorch baselines written the way the official CLD-SGM code (nv-tlabs/CLD-SGM) writes them.

This is our own code. It follows the *structure* of the official ``sde_lib.py`` / ``losses.py`` /
``sampling.py`` / ``models/utils.py`` so the benchmark measures what that structure costs:

* coefficients are recomputed on every call from the time tensor, with one small tensor op per
  arithmetic step (``beta_int``, ``exp``, the textbook variance polynomials, a 2x2 Cholesky);
* noise comes from ``torch.randn_like`` on the full state, split with ``torch.chunk`` and glued
  back with ``torch.cat``;
* the NaN guards ``torch.sum(torch.isnan(...)) > 0`` sit where the official code has them (each is a
  host synchronisation on a GPU);
* the sampler's time grid is a float64 CPU tensor and the score function rebuilds its own times,
  noise multiplier and mixed-score variance on every network evaluation.

Two deliberate differences, both of which make this baseline *faster* than the real official code
(so every speed-up we report against it is a lower bound):

1. The coefficient tensors are float64 (as in the official code; the textbook variance formulas
   cancel catastrophically in float32 and then trip the NaN guards for small t), but they are cast
   to float32 *before* they touch the data. The official code multiplies (B, 1, 1, 1) float64
   coefficients into float32 images, which promotes whole images to float64.
2. The mixed-score variance uses (B, 1, ..., 1) coefficient tensors; the official ``get_score_fn``
   evaluates it on full-size ``ones_like`` tensors.

Forward time t in (0, 1], t = 0 is data; the official sampler's own loop variable runs in reverse
time (t_rev = 1 - t), as here.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


def _expand(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) for broadcasting against ``like`` (the official ``add_dimensions``)."""
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


class OfficialCLD:
    """The CLD SDE with the official method layout (``mean``, ``var``, ``perturb_data``, ...).

    Args:
        beta0, beta1, m_inv, gamma, numerical_eps: as ``cld_fast.CLD``.
        objective: "hsm" (default) or "dsm".
    """

    def __init__(self, beta0=4.0, beta1=0.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-9, objective="hsm"):
        self.beta0, self.beta1 = beta0, beta1
        self.m_inv = m_inv
        self.f = 2.0 / np.sqrt(m_inv)
        self.g = 1.0 / self.f
        self.gamma = gamma
        self.numerical_eps = numerical_eps
        self.objective = objective
        self.max_time = 1.0
        self.is_augmented = True

    # beta(t) and its integral, as the official build_beta_fn / build_beta_int_fn
    def beta_fn(self, t):
        return self.beta0 + self.beta1 * t

    def beta_int_fn(self, t):
        return self.beta0 * t + 0.5 * self.beta1 * t ** 2

    # ---- forward SDE ---------------------------------------------------------------------
    def sde(self, u, t):
        """Drift and diffusion of the forward SDE at forward time t (B,)."""
        x, v = torch.chunk(u, 2, dim=1)
        beta = _expand(self.beta_fn(t), x).type(torch.float32)
        drift_x = self.m_inv * beta * v
        drift_v = -beta * x - self.f * self.m_inv * beta * v
        diffusion_x = torch.zeros_like(x)
        diffusion_v = torch.sqrt(2.0 * self.f * beta) * torch.ones_like(v)
        return torch.cat((drift_x, drift_v), dim=1), torch.cat((diffusion_x, diffusion_v), dim=1)

    def get_reverse_sde(self, score_fn, probability_flow=False):
        def reverse_sde(u, t):
            drift, diffusion = self.sde(u, self.max_time - t)
            score = score_fn(u, self.max_time - t)
            drift_x, drift_v = torch.chunk(drift, 2, dim=1)
            _, diffusion_v = torch.chunk(diffusion, 2, dim=1)
            rev_drift_x = -drift_x
            rev_drift_v = -drift_v + diffusion_v ** 2.0 * score * (0.5 if probability_flow else 1.0)
            rev_diff_x = torch.zeros_like(diffusion_v)
            rev_diff_v = torch.zeros_like(diffusion_v) if probability_flow else diffusion_v
            return torch.cat((rev_drift_x, rev_drift_v), dim=1), torch.cat((rev_diff_x, rev_diff_v), dim=1)

        return reverse_sde

    def get_discrete_step_fn(self, score_fn, probability_flow=False):
        """One Euler-Maruyama step of the reverse SDE; t is reverse time (the official convention)."""
        sde_fn = self.get_reverse_sde(score_fn, probability_flow)

        def discrete_step_fn(u, t, dt):
            vec_t = torch.ones(u.shape[0], device=u.device, dtype=torch.float64) * t
            drift, diffusion = sde_fn(u, vec_t)
            drift *= float(dt)
            diffusion *= np.sqrt(float(dt))
            noise = torch.randn(*u.shape, device=u.device)
            u_mean = u + drift
            u = u_mean + diffusion * noise
            return u, u_mean

        return discrete_step_fn

    # ---- perturbation kernel ---------------------------------------------------------------
    def mean(self, u, t):
        x, v = torch.chunk(u, 2, dim=1)
        beta_int = _expand(self.beta_int_fn(t), x)
        coeff_mean = torch.exp(-2.0 * beta_int * self.g).type(torch.float32)
        beta_int = beta_int.type(torch.float32)
        mean_x = coeff_mean * (2.0 * beta_int * self.g * x + 4.0 * beta_int * self.g ** 2.0 * v + x)
        mean_v = coeff_mean * (-beta_int * x - 2.0 * beta_int * self.g * v + v)
        return torch.cat((mean_x, mean_v), dim=1)

    def var(self, t, var0x=None, var0v=None):
        """[var_xx, var_xv, var_vv] as (B,) float64, the textbook polynomials of the official code."""
        if var0x is None:
            var0x = torch.zeros_like(t, dtype=torch.float64)
        if var0v is None:
            if self.objective == "dsm":
                var0v = torch.zeros_like(t, dtype=torch.float64)
            else:
                var0v = (self.gamma / self.m_inv) * torch.ones_like(t, dtype=torch.float64)
        beta_int = self.beta_int_fn(t)
        multiplier = torch.exp(-4.0 * beta_int * self.g)
        var_xx = (var0x + (1.0 / multiplier) - 1.0 + 4.0 * beta_int * self.g * (var0x - 1.0)
                  + 4.0 * beta_int ** 2.0 * self.g ** 2.0 * (var0x - 2.0)
                  + 16.0 * self.g ** 4.0 * beta_int ** 2.0 * var0v)
        var_xv = (-var0x * beta_int + 4.0 * self.g ** 2.0 * beta_int * var0v
                  - 2.0 * self.g * beta_int ** 2.0 * (var0x - 2.0) - 8.0 * self.g ** 3.0 * beta_int ** 2.0 * var0v)
        var_vv = (self.f ** 2.0 * ((1.0 / multiplier) - 1.0) / 4.0 + self.f * beta_int
                  - 4.0 * self.g * beta_int * var0v + 4.0 * self.g ** 2.0 * beta_int ** 2.0 * var0v
                  + var0v + beta_int ** 2.0 * (var0x - 2.0))
        return [var_xx * multiplier + self.numerical_eps, var_xv * multiplier, var_vv * multiplier + self.numerical_eps]

    def noise_multiplier(self, t):
        """-ell_t = -sqrt(var_xx / det) (B,) float64, with the official NaN guard."""
        var = self.var(t)
        coeff = torch.sqrt(var[0] / (var[0] * var[2] - var[1] ** 2))
        if torch.sum(torch.isnan(coeff)) > 0:
            raise ValueError("Numerical precision error.")
        return -coeff

    def perturb_data(self, batch, t):
        """(perturbed, mean, noise, batch_randn) for batch = cat(x0, v0) and forward times t (B,)."""
        mean = self.mean(batch, t)
        var = self.var(t)
        cholesky11 = torch.sqrt(var[0])
        cholesky21 = var[1] / cholesky11
        cholesky22 = torch.sqrt(var[2] - cholesky21 ** 2.0)
        if (torch.sum(torch.isnan(cholesky11)) > 0 or torch.sum(torch.isnan(cholesky21)) > 0
                or torch.sum(torch.isnan(cholesky22)) > 0):
            raise ValueError("Numerical precision error.")
        batch_randn = torch.randn_like(batch, device=batch.device)
        batch_randn_x, batch_randn_v = torch.chunk(batch_randn, 2, dim=1)
        l11 = _expand(cholesky11, batch_randn_x).type(torch.float32)
        l21 = _expand(cholesky21, batch_randn_x).type(torch.float32)
        l22 = _expand(cholesky22, batch_randn_x).type(torch.float32)
        noise_x = l11 * batch_randn_x
        noise_v = l21 * batch_randn_x + l22 * batch_randn_v
        noise = torch.cat((noise_x, noise_v), dim=1)
        perturbed_data = mean + noise
        return perturbed_data, mean, noise, batch_randn

    def prior_sampling(self, shape, device=None, generator=None):
        x = torch.randn(*shape, device=device, generator=generator)
        v = torch.randn(*shape, device=device, generator=generator) / np.sqrt(self.m_inv)
        return x, v


# ---- score function (models/utils.py get_score_fn, mixed score) ----------------------------------


def get_score_fn(sde: OfficialCLD, model: Callable, mixed_score: bool = True):
    """score(u, t) from ``model(u, t)``: -v / var_vv - out * ell_t under the mixed parameterisation."""

    def score_fn(u, t):
        out = model(u.type(torch.float32), t.type(torch.float32))
        noise_multiplier = _expand(sde.noise_multiplier(t), out).type(torch.float32)
        if not mixed_score:
            return noise_multiplier * out
        _, z = torch.chunk(u, 2, dim=1)
        var_zz = _expand(sde.var(t, torch.zeros_like(t), (sde.gamma / sde.m_inv) * torch.ones_like(t))[2], z)
        return -z / var_zz.type(torch.float32) + out.type(torch.float32) * noise_multiplier

    return score_fn


# ---- training loss (losses.py get_loss_fn, HSM) -------------------------------------------------


def perturb(sde: OfficialCLD, x: torch.Tensor, t: torch.Tensor):
    """The first half of the official loss: (u float32, eps_v) for data x and forward times t (B,) float64."""
    if sde.objective == "dsm":
        v = torch.randn_like(x, device=x.device) * np.sqrt(sde.gamma / sde.m_inv)
    else:
        v = torch.zeros_like(x, device=x.device)
    batch = torch.cat((x, v), dim=1)
    perturbed_data, mean, _, batch_randn = sde.perturb_data(batch, t)
    perturbed_data = perturbed_data.type(torch.float32)
    mean = mean.type(torch.float32)
    _, batch_randn_v = torch.chunk(batch_randn, 2, dim=1)
    return perturbed_data, batch_randn_v


def loss_from_model(sde: OfficialCLD, model: Callable, perturbed_data, t, batch_randn_v, weighting="reweightedv2"):
    """The second half of the official loss: per-sample losses (B,) from the network's score."""
    score_fn = get_score_fn(sde, model)
    score = score_fn(perturbed_data, t)
    multiplier = _expand(sde.beta_fn(t) * sde.f, score).type(torch.float32)
    noise_multiplier = _expand(sde.noise_multiplier(t), score).type(torch.float32)
    if weighting == "reweightedv2":
        loss = (score / noise_multiplier - batch_randn_v) ** 2
    elif weighting == "likelihood":
        loss = (score - batch_randn_v * noise_multiplier) ** 2 * multiplier
    else:
        raise NotImplementedError(weighting)
    loss = torch.sum(loss.reshape(loss.shape[0], -1), dim=-1)
    if torch.sum(torch.isnan(loss)) > 0:
        raise ValueError("NaN loss during training; if using CLD, consider increasing config.numerical_eps")
    return loss


def loss_fn(sde: OfficialCLD, model: Callable, x: torch.Tensor, loss_eps: float = 1e-5, weighting="reweightedv2"):
    """The whole official HSM loss for a data batch x: draws t, perturbs, calls the model; (B,) losses."""
    t = torch.rand(x.shape[0], device=x.device, dtype=torch.float64) * (1.0 - loss_eps) + loss_eps
    u, eps_v = perturb(sde, x, t)
    return loss_from_model(sde, model, u, t, eps_v, weighting)


# ---- SSCS sampler (sampling.py get_sscs_sampler) ---------------------------------------------------


class SSCSSampler:
    """The official SSCS loop: half step, Euler score step, half step; optional denoising EM step.

    ``n_steps`` counts network evaluations including the denoising step, as the official
    ``n_discrete_steps``. ``noise_fn(u)`` replaces ``torch.randn_like(u)`` for the half steps (the
    benchmark uses it to feed the same noise to our fused sampler); ``num_stab`` is the official
    ``sscs_num_stab``.
    """

    def __init__(self, sde: OfficialCLD, n_steps: int, eps: float = 1e-3, denoising: bool = True,
                 striding: str = "linear", num_stab: float = 1e-9, noise_fn: Optional[Callable] = None):
        self.sde = sde
        self.eps = eps
        self.denoising = denoising
        self.num_stab = num_stab
        self.noise_fn = noise_fn or (lambda u: torch.randn_like(u, device=u.device))
        self.n_discrete_steps = n_steps - 1 if denoising else n_steps
        t_final = 1.0 - eps
        t = torch.linspace(0.0, t_final, self.n_discrete_steps + 1, dtype=torch.float64)
        if striding == "quadratic":
            t = t_final * torch.flip(1 - (t / t_final) ** 2.0, dims=[0])
        self.t = t  # reverse time, a CPU float64 tensor as in the official code
        self.n_steps = n_steps

    def forward_times(self) -> torch.Tensor:
        """The forward-time grid 1 - t (float64, decreasing) that our sampler must use to match."""
        return 1.0 - self.t

    def _mean(self, u, t, dt):
        sde = self.sde
        B = sde.beta_int_fn(1.0 - (t + dt)) - sde.beta_int_fn(1.0 - t)
        x, v = torch.chunk(u, 2, dim=1)
        coeff = torch.exp(2.0 * sde.g * B)
        mean_x = coeff * ((1.0 - 2.0 * sde.g * B) * x + 4.0 * sde.g ** 2.0 * B * v)
        mean_v = coeff * (-B * x + (1.0 + 2.0 * sde.g * B) * v)
        return torch.cat((mean_x, mean_v), dim=1)

    def _var(self, t, dt):
        sde = self.sde
        B = sde.beta_int_fn(1.0 - (t + dt)) - sde.beta_int_fn(1.0 - t)
        coeff = torch.exp(4.0 * sde.g * B)
        var_xx = coeff * (1.0 / coeff - 1.0 + 4.0 * sde.g * B - 8.0 * sde.g ** 2 * B ** 2.0)
        var_xv = -coeff * (4.0 * sde.g * B ** 2.0)
        var_vv = coeff * (-sde.f ** 2.0 * (-(1.0 / coeff) + 1.0) / 4.0 - sde.f * B - 2.0 * B ** 2.0)
        return [var_xx + self.num_stab, var_xv, var_vv + self.num_stab]

    def analytical_dynamics(self, u, t, dt, half_step=True):
        dt_hd = dt / 2.0 if half_step else dt
        mean = self._mean(u, t, dt_hd)
        var = self._var(t, dt_hd)
        cholesky11 = torch.sqrt(var[0])
        cholesky21 = var[1] / cholesky11
        cholesky22 = torch.sqrt(var[2] - cholesky21 ** 2.0)
        if torch.sum(torch.isnan(cholesky11)) > 0 or torch.sum(torch.isnan(cholesky22)) > 0:
            raise ValueError("Numerical precision error.")
        batch_randn = self.noise_fn(u)
        batch_randn_x, batch_randn_v = torch.chunk(batch_randn, 2, dim=1)
        noise_x = cholesky11 * batch_randn_x
        noise_v = cholesky21 * batch_randn_x + cholesky22 * batch_randn_v
        noise = torch.cat((noise_x, noise_v), dim=1)
        return mean + noise

    def euler_score_dynamics(self, model, u, t, dt):
        sde = self.sde
        score_fn = get_score_fn(sde, model)
        score = score_fn(u, torch.ones(u.shape[0], device=u.device, dtype=torch.float64) * (1.0 - t))
        x, v = torch.chunk(u, 2, dim=1)
        v_new = v + 2.0 * sde.f * (score + sde.m_inv * v) * sde.beta_fn(1.0 - t) * dt
        return torch.cat((x, v_new), dim=1)

    def step(self, model, u, i):
        """One SSCS step i (two half steps around one network evaluation)."""
        t = self.t
        dt = t[i + 1] - t[i]
        u = self.analytical_dynamics(u, t[i], dt, True)
        u = self.euler_score_dynamics(model, u, t[i], dt)
        u = self.analytical_dynamics(u, t[i], dt, True)
        return u

    def denoise(self, model, u):
        score_fn = get_score_fn(self.sde, model)
        step_fn = self.sde.get_discrete_step_fn(score_fn)
        _, u_mean = step_fn(u, 1.0 - self.eps, self.eps)
        return u_mean

    @torch.no_grad()
    def __call__(self, model, u):
        """Run the whole sampler from the prior state u (B, 2C, ...); returns (x, v, nfe)."""
        for i in range(self.n_discrete_steps):
            u = self.step(model, u, i)
        if self.denoising:
            u = self.denoise(model, u)
        x, v = torch.chunk(u, 2, dim=1)
        return x, v, self.n_steps


# ---- training step (run_lib.py / losses.py get_step_fn, optim utilities) -----------------------


class ExponentialMovingAverage:
    """Per-parameter EMA with the warm-up decay schedule, one Python loop iteration per tensor."""

    def __init__(self, parameters, decay=0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.clone().detach() for p in parameters if p.requires_grad]

    def update(self, parameters):
        decay = self.decay
        self.num_updates += 1
        decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            parameters = [p for p in parameters if p.requires_grad]
            for s_param, param in zip(self.shadow_params, parameters):
                s_param.sub_(one_minus_decay * (s_param - param))


def make_train_step(sde: OfficialCLD, model: torch.nn.Module, optimizer, lr=2e-4, warmup=5000, grad_clip=1.0,
                    autocast_dtype: Optional[torch.dtype] = torch.float16, ema_rate=0.9999):
    """``step(x)`` of the official trainer: autocast + GradScaler, eager loss, warm-up, clipping, EMA.

    ``autocast_dtype=None`` trains in float32 (the scaler is then disabled, as the official code
    does when ``autocast_train`` is off).
    """
    device_type = next(model.parameters()).device.type
    use_amp = autocast_dtype is not None
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp)
    ema = ExponentialMovingAverage(model.parameters(), decay=ema_rate)
    state = {"step": 1}

    def model_fn(u, t):
        model.train()
        return model(u, t)

    def step(x):
        optimizer.zero_grad()
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=use_amp):
            loss = torch.mean(loss_fn(sde, model_fn, x))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if warmup > 0:
            for g in optimizer.param_groups:
                g["lr"] = lr * np.minimum(state["step"] / warmup, 1.0)
        if grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state["step"] += 1
        ema.update(model.parameters())
        return loss

    return step

