"""The math of critically-damped Langevin diffusion (CLD), in one place.

Forward time t in [0, 1], t = 0 is data. State u = (x, v). Every scalar coordinate of x evolves with
its own 2x2 linear SDE whose coefficients depend on t only:

    dx = m_inv * v * beta(t) dt
    dv = (-x - Gamma * m_inv * v) * beta(t) dt + sqrt(2 * Gamma * beta(t)) dW

with beta(t) = beta0 + beta1 * t, B(t) = beta0 * t + beta1 * t^2 / 2, Gamma = 2 / sqrt(m_inv)
(critical damping) and g = sqrt(m_inv) / 2 = 1 / Gamma.

This module is the reference of every coefficient. The compiled kernels (cpu, cuda, triton) take
t (or a time grid and a step) and the parameters (``kernel_params``) and evaluate the same formulas
per row in float64, written once per language (``csrc/include/cld_coefficients.h``,
``triton_kernels/coefficients.py``) and tested against this module (tests/test_coefficients.py).
The closed forms are evaluated in a rearranged form that neither overflows for large B(t) (the
textbook form multiplies exp(4 g B) by exp(-4 g B)) nor loses digits for small B(t) (see ``_p3``
and ``_q3``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

Number = Union[int, float]

OBJECTIVES = ("hsm", "dsm")
# Appended, never reordered: the position is the code the kernels receive.
WEIGHTINGS = ("reweightedv2", "likelihood", "reweightedv1")
# What the network outputs (official CLD-SGM ``mixed_score``): "mixed" (True): score = -v / s_vv - out / l22;
# "eps" (official mixed_score=False): score = -out / l22 (out predicts eps_v); "score": out is the score.
OUTPUTS = ("mixed", "eps", "score")
AFFINE_KINDS = ("em", "denoise", "pf_drift")

# What the kernels receive: the CLD parameters as a (5,) float64 tensor in this order
# (``kernel_params``), and the int codes of the enums (position in the tuples above). The same
# names are spelled once in triton_kernels/coefficients.py and csrc/include/cld_coefficients.h;
# tests/test_ops_contract.py checks that the three agree.
PARAMS = ("beta0", "beta1", "m_inv", "gamma", "numerical_eps")
OBJECTIVE_CODES = {name: i for i, name in enumerate(OBJECTIVES)}
WEIGHTING_CODES = {name: i for i, name in enumerate(WEIGHTINGS)}
OUTPUT_CODES = {name: i for i, name in enumerate(OUTPUTS)}
AFFINE_KIND_CODES = {name: i for i, name in enumerate(AFFINE_KINDS)}

# Below this y the incomplete-gamma tail is summed as a series instead of 1 - exp(-y) * poly(y).
_SERIES_CUTOFF = 0.5
_SERIES_COEFFS = [1.0 / math.factorial(k) for k in range(17, 2, -1)]  # 1/17!, ..., 1/3! (Horner order)


def _as_time(t, name: str = "t") -> torch.Tensor:
    """Return ``t`` as a float64 tensor on its own device (Python numbers become CPU tensors)."""
    if isinstance(t, torch.Tensor):
        if not (t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        return t.to(torch.float64)
    if isinstance(t, (int, float)):
        return torch.tensor(float(t), dtype=torch.float64)
    raise TypeError(f"{name} must be a torch.Tensor or a float, got {type(t).__name__}")


def _p3(y: torch.Tensor) -> torch.Tensor:
    """P3(y) = 1 - exp(-y) * (1 + y + y^2 / 2), y >= 0, accurate to float64 rounding for all y.

    For small y the direct form cancels (P3 ~ y^3 / 6), so there it is summed as
    exp(-y) * y^3 * sum_{k >= 3} y^(k-3) / k! (Horner; for y < 0.5 the terms past k = 17 are below
    1e-18 of the sum).
    """
    direct = 1.0 - torch.exp(-y) * (1.0 + y + 0.5 * y * y)
    ys = torch.clamp(y, max=_SERIES_CUTOFF)
    total = torch.full_like(ys, _SERIES_COEFFS[0])
    for c in _SERIES_COEFFS[1:]:
        total = total * ys + c
    series = torch.exp(-ys) * ys * ys * ys * total
    return torch.where(y < _SERIES_CUTOFF, series, direct)


def _q3(y: torch.Tensor) -> torch.Tensor:
    """Q3(y) = 1 - exp(-y) * (1 - y + y^2 / 2), y >= 0 (no cancellation: Q3 ~ 2 y for small y)."""
    return -torch.expm1(-y) + torch.exp(-y) * (y - 0.5 * y * y)



GDDIM_PREDICTIONS = ("eps", "x0")
GDDIM_COLS = 22  # E (6), Lin (4), C_0..C_2 (4 each): see cld_fast.samplers.gddim.gddim_table


def legendre_nodes(nodes: int):
    """Gauss-Legendre nodes and weights on [-1, 1], float64 CPU tensors (cached)."""
    cached = _LEGENDRE.get(nodes)
    if cached is None:
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(int(nodes))
        cached = _LEGENDRE[nodes] = (torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64))
    return cached


_LEGENDRE: dict = {}


def _gauss_legendre(f, lo: torch.Tensor, hi: torch.Tensor, nodes: int) -> torch.Tensor:
    """int_lo^hi f(tau) dtau elementwise (lo, hi of one shape; f vectorised over float64 tensors)."""
    x, w = legendre_nodes(nodes)
    half = 0.5 * (hi - lo)
    tau = (0.5 * (hi + lo))[..., None] + half[..., None] * x.to(lo.device)
    return (f(tau) * w.to(lo.device)).sum(-1) * half


def integrate_log(f, lo: torch.Tensor, hi: torch.Tensor, nodes: int, pieces: int = 8) -> torch.Tensor:
    """int_lo^hi f(tau) dtau for lo, hi > 0 as int f(e^s) e^s ds over ``pieces`` equal parts of [log lo, log hi]
    (accurate for integrands with a power-law blow-up at tau = 0, such as d theta / dt)."""
    a, b = torch.log(lo), torch.log(hi)
    edges = torch.linspace(0.0, 1.0, pieces + 1, dtype=torch.float64, device=lo.device)
    s_lo = a[..., None] + (b - a)[..., None] * edges[:-1]
    s_hi = a[..., None] + (b - a)[..., None] * edges[1:]
    return _gauss_legendre(lambda s: f(torch.exp(s)) * torch.exp(s), s_lo, s_hi, nodes).sum(-1)

@dataclass(frozen=True)
class PerturbationKernel:
    """Per-sample coefficients of p(u_t | x0[, v0]), every field float64 of shape (B,).

    mean = A @ (x0, v0) with A = [[a_xx, a_xv], [a_vx, a_vv]]; covariance
    Sigma = [[s_xx, s_xv], [s_xv, s_vv]] = L L^T with L = [[l11, 0], [l21, l22]].
    """

    a_xx: torch.Tensor
    a_xv: torch.Tensor
    a_vx: torch.Tensor
    a_vv: torch.Tensor
    s_xx: torch.Tensor
    s_xv: torch.Tensor
    s_vv: torch.Tensor
    l11: torch.Tensor
    l21: torch.Tensor
    l22: torch.Tensor



def _cholesky2(s_xx, s_xv, s_vv):
    l11 = torch.sqrt(s_xx)
    l21 = torch.where(l11 > 0, s_xv / torch.where(l11 > 0, l11, torch.ones_like(l11)), torch.zeros_like(l11))
    l22 = torch.sqrt(torch.clamp(s_vv - l21 * l21, min=0.0))
    return l11, l21, l22


@dataclass(frozen=True)
class CLD:
    """Critically-damped Langevin diffusion (Dockhorn, Vahdat, Kreis, ICLR 2022).

    Parameters (immutable, validated): ``beta0``, ``beta1`` (beta(t) = beta0 + beta1 t must be > 0 on
    [0, 1]), ``m_inv`` = 1 / M > 0, ``gamma`` > 0 (initial velocity v0 ~ N(0, gamma * M)) and
    ``numerical_eps`` >= 0 added to the diagonal of the perturbation covariance.
    """

    beta0: float = 4.0
    beta1: float = 0.0
    m_inv: float = 4.0
    gamma: float = 0.04
    numerical_eps: float = 1e-9

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"CLD.{f.name} must be a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"CLD.{f.name} must be finite, got {value}")
            object.__setattr__(self, f.name, float(value))
        if self.m_inv <= 0:
            raise ValueError(f"CLD.m_inv must be > 0, got {self.m_inv}")
        if self.gamma <= 0:
            raise ValueError(f"CLD.gamma must be > 0, got {self.gamma}")
        if self.numerical_eps < 0:
            raise ValueError(f"CLD.numerical_eps must be >= 0, got {self.numerical_eps}")
        if self.beta0 <= 0 or self.beta0 + self.beta1 <= 0:
            raise ValueError(
                f"beta(t) = beta0 + beta1 * t must be > 0 on [0, 1]; got beta0={self.beta0}, "
                f"beta(1)={self.beta0 + self.beta1}"
            )

    # ---- constants -------------------------------------------------------------------------
    @property
    def M(self) -> float:
        """Mass M = 1 / m_inv."""
        return 1.0 / self.m_inv

    @property
    def Gamma(self) -> float:
        """Friction Gamma = 2 / sqrt(m_inv) (critical damping, Gamma^2 = 4 M)."""
        return 2.0 / math.sqrt(self.m_inv)

    @property
    def g(self) -> float:
        """g = sqrt(m_inv) / 2 = 1 / Gamma, the rate in every closed form."""
        return math.sqrt(self.m_inv) / 2.0

    # ---- what a sampler asks of an SDE ------------------------------------------------------
    is_sde = True

    def state_shape(self, x_shape) -> tuple:
        """The state shape (B, 2C, ...) of data of shape (B, C, ...): x and v stacked on dim 1."""
        return (x_shape[0], 2 * x_shape[1]) + tuple(x_shape[2:])

    def data_shape(self, u_shape, name: str = "u") -> tuple:
        """The data shape (B, C, ...) of a state of shape (B, 2C, ...) (ValueError naming ``name`` if dim 1 is odd)."""
        u_shape = tuple(u_shape)
        if len(u_shape) < 2 or u_shape[1] % 2:
            raise ValueError(f"{name} must be a CLD state (B, 2C, ...) with x and v stacked on dim 1, got shape "
                             f"{u_shape} (odd dim 1)")
        return (u_shape[0], u_shape[1] // 2) + u_shape[2:]

    def split_state(self, u: torch.Tensor):
        """(x, v): the two halves of a state (B, 2C, ...) along dim 1 (views)."""
        return torch.chunk(u, 2, dim=1)

    def em_step_(self, u, y, grid, step, seed, mixed: bool = False, backend=None, obs=None, y_uncond=None,
                 guide_weight: float = 0.0) -> None:
        """One Euler-Maruyama step of the reverse SDE, in place: grid[step] -> grid[step + 1] (fused op;
        ``obs``: the packed inpainting condition, replaced at grid[step + 1]; ``y_uncond``, ``guide_weight``:
        classifier-free guidance combined in the op)."""
        from . import ops

        ops.em_step_(u, y, grid, self, step=step, mixed=mixed, seed=seed, backend=backend, obs=obs,
                     y_uncond=y_uncond, guide_weight=guide_weight)

    def denoise_(self, u, y, eps: float, mixed: bool = False, backend=None, obs=None, y_uncond=None,
                 guide_weight: float = 0.0) -> None:
        """The official last step, in place: a noise-free EM step of the reverse SDE at t = eps of size eps
        (``obs``: the packed inpainting condition; x = x_obs on the observed coordinates; ``y_uncond``,
        ``guide_weight``: classifier-free guidance combined in the op)."""
        from . import ops

        grid = torch.tensor([eps, 0.0], dtype=torch.float64).to(u.device)
        ops.em_step_(u, y, grid, self, step=torch.zeros(1, dtype=torch.int64, device=u.device), mixed=mixed,
                     denoise=True, backend=backend, obs=obs, y_uncond=y_uncond, guide_weight=guide_weight)

    def pf_drift(self, u, y, t, mixed: bool = False, backend=None) -> torch.Tensor:
        """du/dt of the probability-flow ODE in forward time at the (1,) float64 device time t (fused op)."""
        from . import ops

        return ops.pf_drift(u, y, t, self, mixed=mixed, backend=backend)

    objectives = OBJECTIVES  # the training objectives a network of this SDE may have used
    weightings = WEIGHTINGS  # the training loss weightings it takes
    folds_mixed_score = True  # the fused sampler kernels take the raw HSM mixed-score output
    inpaints = True  # the fused step ops replace observed coordinates (``cld_fast.conditions``)
    fuses_guidance = True  # the fused step ops combine a classifier-free guided pair (``y_uncond``)

    def score_from_output(self, out, u, t, objective: str = "hsm", output: str = "mixed",
                          differentiable: bool = False) -> torch.Tensor:
        """grad_v log p_t(u) (data shape, u's dtype) from a network output ``out`` of kind ``output`` ("mixed" or
        "eps"; see ``score_coefficients``): one fused op, or plain torch ops when autograd must see v."""
        if differentiable and torch.is_grad_enabled():
            shape = (-1,) + (1,) * (u.dim() - 1)
            coef = self.score_coefficients(t, objective, output).to(u.dtype)
            return coef[:, 0].view(shape) * self.split_state(u)[1] + coef[:, 1].view(shape) * out.to(u.dtype)
        from . import checks, ops

        with checks.value_checks(False):
            return ops.mixed_score(out, u, t, self, objective=objective, output=output)

    def score_part(self, u: torch.Tensor) -> torch.Tensor:
        """The coordinates the score is a gradient for: v, the second half of a state (B, 2C, ...)."""
        return self.split_state(u)[1]

    def likelihood_state(self, x: torch.Tensor, normal) -> torch.Tensor:
        """The state at t = 0 for the likelihood of data x: (x, v0) with v0 ~ N(0, gamma M) drawn as
        ``normal(shape)`` * sqrt(gamma M) (v0 is marginalised, ``likelihood_correction`` accounts for it)."""
        _, s0v = self.initial_covariance("hsm")
        return torch.cat([x, normal(x.shape) * math.sqrt(s0v)], dim=1)

    def likelihood_correction(self, d: int) -> float:
        """What the NLL of (x, v0) exceeds the NLL of x by, in nats: the entropy of v0 for d data dimensions."""
        return self.initial_velocity_entropy(d)

    def pf_divergence_terms(self, t: torch.Tensor):
        """(c_fixed, c_self, c_y) float64 at the (1,) time t: the divergence of the probability-flow drift is
        d * c_fixed + tr(c_self I + c_y d score / d v) (the x block, then the v block)."""
        row = self.reverse_affine_coefficients(t, 0.0, "pf_drift")[0]  # c_xx c_xv c_vx c_vv c_vy sigma
        return row[0], row[3], row[4]

    def describe(self, mixed: bool = True, objective: str = "hsm") -> str:
        """One line naming everything a score function and sampler use, e.g. for ``cld-fast sample``."""
        return (f"CLD(beta0={self.beta0:g}, beta1={self.beta1:g}, m_inv={self.m_inv:g}, gamma={self.gamma:g}, "
                f"numerical_eps={self.numerical_eps:g}), mixed_score={mixed}, objective={objective}")

    def beta(self, t):
        """beta(t) = beta0 + beta1 t; float64 tensor of t's shape (numbers give a 0-d tensor)."""
        t = _as_time(t)
        return self.beta0 + self.beta1 * t

    def beta_int(self, t):
        """B(t) = int_0^t beta = beta0 t + beta1 t^2 / 2; float64 tensor of t's shape."""
        t = _as_time(t)
        return self.beta0 * t + 0.5 * self.beta1 * t * t

    def initial_covariance(self, objective: str = "hsm"):
        """(s0x, s0v) of the initial state: HSM marginalises v0 ~ N(0, gamma M); DSM conditions on it."""
        _check_objective(objective)
        if objective == "hsm":
            return 0.0, self.gamma * self.M
        return 0.0, 0.0

    # ---- forward perturbation kernel -------------------------------------------------------
    def _transition(self, b: torch.Tensor, s0x: float, s0v: float, eps: float):
        """Mean matrix and covariance of the forward linear SDE over an integrated-beta span b >= 0."""
        g = self.g
        gb = g * b
        c = torch.exp(-2.0 * gb)
        m = c * c
        y = 4.0 * gb
        a_xx = c * (1.0 + 2.0 * gb)
        a_xv = c * (4.0 * g * g * b)
        a_vx = -c * b
        a_vv = c * (1.0 - 2.0 * gb)
        s_xx = _p3(y) + m * (s0x * (1.0 + 2.0 * gb) ** 2 + 16.0 * g ** 4 * b * b * s0v) + eps
        s_xv = m * (4.0 * g * b * b - s0x * b * (1.0 + 2.0 * gb) + 4.0 * g * g * b * s0v * (1.0 - 2.0 * gb))
        s_vv = _q3(y) / (4.0 * g * g) + m * (s0v * (1.0 - 2.0 * gb) ** 2 + s0x * b * b) + eps
        return a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv

    def perturbation_kernel(self, t, objective: str = "hsm") -> PerturbationKernel:
        """Coefficients of p(u_t | x0) ("hsm": v0 marginalised) or p(u_t | x0, v0) ("dsm").

        Args:
            t: (B,) tensor of forward times (any float dtype, any device) or a float.
            objective: "hsm" or "dsm".
        Returns:
            PerturbationKernel with float64 fields of t's shape on t's device.
        """
        _check_objective(objective)
        b = self.beta_int(t)
        s0x, s0v = self.initial_covariance(objective)
        a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv = self._transition(b, s0x, s0v, self.numerical_eps)
        l11, l21, l22 = _cholesky2(s_xx, s_xv, s_vv)
        return PerturbationKernel(a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv, l11, l21, l22)

    def marginal_prob(self, x0: torch.Tensor, t, objective: str = "hsm", v0: Optional[torch.Tensor] = None):
        """Mean (x, v) and covariance fields of u_t given x0 (and v0 for DSM); x0 (B, ...), t (B,)."""
        k = self.perturbation_kernel(t, objective)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x0d = x0.to(torch.float64)
        v0d = torch.zeros_like(x0d) if v0 is None else v0.to(torch.float64)
        mean_x = k.a_xx.view(shape) * x0d + k.a_xv.view(shape) * v0d
        mean_v = k.a_vx.view(shape) * x0d + k.a_vv.view(shape) * v0d
        return mean_x, mean_v, k

    # ---- score parameterisation and loss ---------------------------------------------------
    def mixed_score_coefficients(self, t, objective: str = "hsm") -> torch.Tensor:
        """(B, 2) float64 [-1/s_vv, -1/l22]: score = c0 * v + c1 * out (``score_coefficients``, output "mixed")."""
        return self.score_coefficients(t, objective, "mixed")

    def score_coefficients(self, t, objective: str = "hsm", output: str = "mixed") -> torch.Tensor:
        """(B, 2) float64 [c0, c1] with score = c0 * v + c1 * out for a network trained with ``objective``.

        As the official CLD-SGM score function: the noise multiplier -1 / l22 comes from the kernel of
        the objective (HSM: v0 marginalised; DSM: p(u_t | x0, v0)), the mixed term -v / s_vv always
        from the HSM kernel (the velocity marginal the mixed parameterisation starts from).
        ``output``: "mixed" (c0, c1) = (-1 / s_vv_hsm, -1 / l22); "eps" (official ``mixed_score=False``)
        (0, -1 / l22); "score" (0, 1).
        """
        _check_objective(objective)
        _check_output(output)
        k = self.perturbation_kernel(t, objective)
        if output == "score":
            return torch.stack([torch.zeros_like(k.l22), torch.ones_like(k.l22)], dim=-1)
        c1 = -1.0 / k.l22
        if output == "eps":
            return torch.stack([torch.zeros_like(c1), c1], dim=-1)
        s_vv = k.s_vv if objective == "hsm" else self.perturbation_kernel(t, "hsm").s_vv
        return torch.stack([-1.0 / s_vv, c1], dim=-1)

    def loss_coefficients(self, t, weighting: str = "reweightedv2", objective: str = "hsm",
                          output: str = "mixed") -> torch.Tensor:
        """(B, 3) float64 [c, w, a] with per-sample loss w * sum((a * out + c * v - eps_v)^2).

        The official loss in the residual r = -l22 * score - eps_v (score / noise multiplier - eps_v),
        l22 of the objective's kernel and eps_v the velocity noise of that kernel's draw:
        ``reweightedv2``: w = 1; ``reweightedv1``: w = beta Gamma; ``likelihood``:
        (score + eps_v / l22)^2 beta Gamma, i.e. w = beta Gamma / l22^2. With score =
        c0 v + c1 out (``score_coefficients``): a = -l22 c1, c = -l22 c0, so "mixed": a = 1,
        c = l22 / s_vv_hsm; "eps": a = 1, c = 0; "score": a = -l22, c = 0.
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        _check_objective(objective)
        _check_output(output)
        k = self.perturbation_kernel(t, objective)
        if output == "mixed":
            s_vv = k.s_vv if objective == "hsm" else self.perturbation_kernel(t, "hsm").s_vv
            c = k.l22 / s_vv
        else:
            c = torch.zeros_like(k.l22)
        a = -k.l22 if output == "score" else torch.ones_like(k.l22)
        if weighting == "reweightedv2":
            w = torch.ones_like(c)
        elif weighting == "reweightedv1":
            w = self.beta(t).expand_as(c) * self.Gamma
        else:
            w = self.beta(t).expand_as(c) * self.Gamma / (k.l22 * k.l22)
        return torch.stack([c, w, a], dim=-1)

    # ---- prior -----------------------------------------------------------------------------
    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        """Sample u_T: x ~ N(0, I), v ~ N(0, M I). ``shape`` is the data shape (B, C, ...); returns (B, 2C, ...)."""
        shape = tuple(shape)
        u_shape = (shape[0], 2 * shape[1]) + shape[2:]
        u = torch.randn(u_shape, generator=generator, device=device, dtype=dtype)
        u.narrow(1, shape[1], shape[1]).mul_(math.sqrt(self.M))
        return u

    def prior_logp(self, u: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) + log N(v; 0, M I) summed per sample; u (B, 2C, ...) -> (B,) float64."""
        x, v = torch.chunk(u.to(torch.float64), 2, dim=1)
        n = x[0].numel()
        lx = -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * n * math.log(2 * math.pi)
        lv = -0.5 * v.flatten(1).pow(2).sum(1) / self.M - 0.5 * n * math.log(2 * math.pi * self.M)
        return lx + lv

    def initial_velocity_entropy(self, n: int) -> float:
        """Entropy of v0 ~ N(0, gamma M I_n), in nats (subtracted in the CLD likelihood bound)."""
        return 0.5 * n * (1.0 + math.log(2 * math.pi * self.gamma * self.M))

    # ---- SSCS and reverse-time step coefficients -------------------------------------------
    def half_step_coefficients(self, t, h) -> torch.Tensor:
        """Analytic linear part of the reverse SDE from forward time t to t - h (h > 0).

        With Bd = B(t - h) - B(t) < 0 this is the exact solution of
        dx = -m_inv v beta ds, dv = (x - Gamma m_inv v) beta ds + sqrt(2 Gamma beta) dW.
        Returns (..., 7) float64: a_xx a_xv a_vx a_vv l11 l21 l22.
        """
        t = _as_time(t)
        h = _as_time(h, "h")
        bd = self.beta_int(t - h) - self.beta_int(t)
        # The reverse linear part is the forward one conjugated by diag(-1, 1).
        a_xx, a_xv, a_vx, a_vv, s_xx, s_xv, s_vv = self._transition(-bd, 0.0, 0.0, 0.0)
        l11, l21, l22 = _cholesky2(s_xx, -s_xv, s_vv)
        return torch.stack([a_xx, -a_xv, -a_vx, a_vv, l11, l21, l22], dim=-1)

    def sscs_closing_half_step(self, t0, t1, official_half_steps: bool = False):
        """(t, h) of the closing half step of the SSCS step from forward time t0 to t1 (floats or tensors).

        Default: the second half of the step, t0 - (t0 - t1) / 2 -> t1, which integrates beta over
        that half. ``official_half_steps``: the official CLD-SGM sampler's span, t0 -> t0 - (t0 - t1) / 2,
        i.e. beta integrated over the first half for both half steps: the same for constant beta,
        an O(beta1 h^2) difference per step otherwise (reproduced for comparison with its numbers).
        """
        h = t0 - t1
        if official_half_steps:
            return t0, 0.5 * h
        tc = t0 - 0.5 * h
        return tc, tc - t1

    def half_step_covariance(self, t, h):
        """(s_xx, s_xv, s_vv) float64 of the reverse linear half step from t to t - h."""
        t = _as_time(t)
        h = _as_time(h, "h")
        bd = self.beta_int(t - h) - self.beta_int(t)
        _, _, _, _, s_xx, s_xv, s_vv = self._transition(-bd, 0.0, 0.0, 0.0)
        return s_xx, -s_xv, s_vv

    def score_step_coefficients(self, t, h, mixed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(alpha, kappa) of the SSCS score Euler step v <- alpha v + kappa y at forward time t, size h.

        Plain score (y = score): alpha = 1 + 2 Gamma beta h m_inv, kappa = 2 Gamma beta h.
        With ``mixed`` = (c0, c1) from ``mixed_score_coefficients`` the network output y = out is
        used directly: score = c0 v + c1 out folds into alpha and kappa.
        """
        t = _as_time(t)
        h = _as_time(h, "h")
        e = 2.0 * self.Gamma * self.beta(t) * h
        alpha = 1.0 + e * self.m_inv
        kappa = e
        if mixed is not None:
            alpha = alpha + e * mixed[..., 0]
            kappa = e * mixed[..., 1]
        return torch.stack(torch.broadcast_tensors(alpha, kappa), dim=-1)

    def reverse_affine_coefficients(self, t, h, kind: str = "em", mixed: Optional[torch.Tensor] = None):
        """(..., 6) float64 affine step x' = c_xx x + c_xv v, v' = c_vx x + c_vv v + c_vy y + sigma z.

        kind "em": Euler-Maruyama step of the reverse SDE from t to t - h (h > 0).
        kind "denoise": the same step without noise (the official last "denoising" step).
        kind "pf_drift": d u / d t of the probability-flow ODE at t (h ignored): forward-time drift,
            x' = m_inv beta v, v' = (-x - Gamma m_inv v) beta - Gamma beta score.
        ``mixed`` = (c0, c1) folds the mixed score (score = c0 v + c1 out) so y is the network output.
        """
        t = _as_time(t)
        h = _as_time(h, "h")
        beta = self.beta(t)
        G, mi = self.Gamma, self.m_inv
        if kind in ("em", "denoise"):
            bh = beta * h
            c_xx = torch.ones_like(bh)
            c_xv = -mi * bh
            c_vx = bh
            c_vv = 1.0 + G * mi * bh
            c_vy = 2.0 * G * bh
            sigma = torch.sqrt(2.0 * G * bh) if kind == "em" else torch.zeros_like(bh)
        elif kind == "pf_drift":
            c_xx = torch.zeros_like(beta)
            c_xv = mi * beta
            c_vx = -beta
            c_vv = -G * mi * beta
            c_vy = -G * beta
            sigma = torch.zeros_like(beta)
        else:
            raise ValueError(f"kind must be 'em', 'denoise' or 'pf_drift', got {kind!r}")
        if mixed is not None:
            c_vv = c_vv + c_vy * mixed[..., 0]
            c_vy = c_vy * mixed[..., 1]
        return torch.stack(torch.broadcast_tensors(c_xx, c_xv, c_vx, c_vv, c_vy, sigma), dim=-1)


    # ---- exponential-integrator multistep in the R frame (gDDIM) ---------------------------
    # With Sigma(t) = L L^T the HSM covariance, R(t) = L(t) Q(theta(t)) (Q a rotation) solves
    # dR/dt = (F + D Sigma^-1 / 2) R, F the drift matrix and D = diag(0, 2 Gamma beta), when
    # d theta / dt = -m_inv beta l22 / l11 (Zhang, Tao & Chen, ICLR 2023, specialised to CLD). In that
    # frame the probability-flow ODE reads du/dt = F u + (dR/dt - F R) eps with eps = R^-1 (u - a x0_hat),
    # which stays nearly constant along a trajectory, so a polynomial in eps integrates it accurately.
    def transition_matrix(self, t, s) -> torch.Tensor:
        """Psi(t, s): the flow of the forward drift du/dt = F(t) u from time s to time t (either order).

        Returns (..., 2, 2) float64 [[a_xx, a_xv], [a_vx, a_vv]] over the integrated-beta span B(t) - B(s).
        """
        b = self.beta_int(t) - self.beta_int(s)
        g = self.g
        c = torch.exp(-2.0 * g * b)
        row_x = torch.stack([c * (1.0 + 2.0 * g * b), c * (4.0 * g * g * b)], -1)
        row_v = torch.stack([-c * b, c * (1.0 - 2.0 * g * b)], -1)
        return torch.stack([row_x, row_v], -2)

    def rframe_angle_rate(self, t) -> torch.Tensor:
        """d theta / dt = -m_inv beta(t) l22(t) / l11(t) of the R frame (float64, t's shape)."""
        k = self.perturbation_kernel(t, "hsm")
        return -self.m_inv * self.beta(t) * k.l22 / k.l11

    def rframe_angle(self, t, nodes: int = 64) -> torch.Tensor:
        """theta(t) = int_1^t d theta, with theta(1) = 0 (the integrator does not depend on this constant).

        The rate grows like t^-3/2 towards t = 0, so the integral runs in log t (``integrate_log``).
        """
        t = _as_time(t)
        return integrate_log(self.rframe_angle_rate, torch.ones_like(t), t, nodes)

    def rframe(self, t, theta) -> torch.Tensor:
        """R(t) = L(t) Q(theta) (..., 2, 2) float64, Q = [[cos, -sin], [sin, cos]]."""
        k = self.perturbation_kernel(t, "hsm")
        theta = _as_time(theta, "theta")
        c, s = torch.cos(theta), torch.sin(theta)
        row_x = torch.stack([k.l11 * c, -k.l11 * s], -1)
        row_v = torch.stack([k.l21 * c + k.l22 * s, -k.l21 * s + k.l22 * c], -1)
        return torch.stack([row_x, row_v], -2)

    def tweedie_coefficients(self, t, mixed: bool = False) -> torch.Tensor:
        """(..., 3) float64 (k_x, k_v, k_y): E[x0 | u_t] = k_x x + k_v v + k_y y from the velocity score alone.

        With v0 marginalised, grad log p_t(u) = Sigma^-1 (a x0_hat - u) (Tweedie), a = (a_xx, a_vx); its
        v row fixes x0_hat = (s_v + (Sigma^-1 u)_v) / (Sigma^-1 a)_v. y is s_v = grad_v log p_t(u), or
        the raw network output of the mixed score (s_v = c0 v + c1 out) when ``mixed``.
        """
        k = self.perturbation_kernel(t, "hsm")
        det = k.s_xx * k.s_vv - k.s_xv * k.s_xv
        p_vx, p_vv = -k.s_xv / det, k.s_xx / det
        q = p_vx * k.a_xx + p_vv * k.a_vx
        k_x, k_v, k_y = p_vx / q, p_vv / q, 1.0 / q
        if mixed:
            c0, c1 = -1.0 / k.s_vv, -1.0 / k.l22
            k_v, k_y = k_v + c0 * k_y, c1 * k_y
        return torch.stack([k_x, k_v, k_y], -1)

    def full_score_from_velocity_score(self, x, v, s_v, t):
        """(x0_hat, s_x, eps_R) from the velocity score: the data estimate, grad_x log p_t(u) and
        eps_R = R(t)^-1 (u - a x0_hat) (R with ``rframe_angle``). x, v, s_v: (B, ...) ; t: (B,). float64."""
        t = _as_time(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        kc = self.tweedie_coefficients(t)
        col = lambda c: c.reshape(shape)  # noqa: E731
        x, v, s_v = x.to(torch.float64), v.to(torch.float64), s_v.to(torch.float64)
        x0 = col(kc[..., 0]) * x + col(kc[..., 1]) * v + col(kc[..., 2]) * s_v
        k = self.perturbation_kernel(t, "hsm")
        det = k.s_xx * k.s_vv - k.s_xv * k.s_xv
        p_xx, p_xv = k.s_vv / det, -k.s_xv / det
        s_x = col(p_xx * k.a_xx + p_xv * k.a_vx) * x0 - col(p_xx) * x - col(p_xv) * v
        r_inv = torch.linalg.inv(self.rframe(t, self.rframe_angle(t)))
        rx, rv = x - col(k.a_xx) * x0, v - col(k.a_vx) * x0
        eps_x = col(r_inv[..., 0, 0]) * rx + col(r_inv[..., 0, 1]) * rv
        eps_v = col(r_inv[..., 1, 0]) * rx + col(r_inv[..., 1, 1]) * rv
        return x0, s_x, (eps_x, eps_v)


_PARAM_CACHE = {}
_PARAM_OWNERS = {}


def kernel_params(sde: "CLD", device) -> torch.Tensor:
    """The (5,) float64 parameter tensor of ``sde`` on ``device`` (order ``PARAMS``), made once and cached.

    Kernels read it in-kernel, so a call costs no host-to-device copy after the first one.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (sde, device)
    cached = _PARAM_CACHE.get(key)
    if cached is None:
        cached = torch.tensor([getattr(sde, name) for name in PARAMS], dtype=torch.float64).to(device)
        _PARAM_CACHE[key] = cached
        _PARAM_OWNERS[id(cached)] = sde  # cached tensors live for the process, so their ids stay unique
    return cached


def cld_from_params(params: torch.Tensor) -> "CLD":
    """The CLD of a (5,) parameter tensor: the owner of a ``kernel_params`` tensor without reading it
    (no host sync), else built from its values."""
    owner = _PARAM_OWNERS.get(id(params))
    if owner is not None and _PARAM_CACHE.get((owner, params.device)) is params:
        return owner
    return CLD(**dict(zip(PARAMS, params.detach().to("cpu", torch.float64).tolist())))


def _check_objective(objective):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS} (what the network predicts), got {output!r}")


def _no_obs(obs) -> None:
    if obs is not None:
        raise ValueError("a VP-SDE takes no inpainting condition (obs): the replacement is written for the CLD state")


@dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE (Song et al. 2021), the non-CLD baseline: beta linear beta_min -> beta_max.

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW; p(x_t | x0) = N(alpha(t) x0, sigma(t)^2 I).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"VPSDE.{f.name} must be a finite real number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if self.beta_min <= 0 or self.beta_max <= 0:
            raise ValueError(f"VPSDE betas must be > 0, got beta_min={self.beta_min}, beta_max={self.beta_max}")

    # ---- what a sampler asks of an SDE ------------------------------------------------------
    is_sde = True

    def state_shape(self, x_shape) -> tuple:
        """The state shape: the data shape itself (no velocity)."""
        return tuple(x_shape)

    def data_shape(self, u_shape, name: str = "u") -> tuple:
        """The data shape of a state: the state's own."""
        return tuple(u_shape)

    def split_state(self, u: torch.Tensor):
        """(x, None): the state is the data."""
        return u, None

    def _apply(self, u, y, row):
        shape = (-1,) + (1,) * (u.dim() - 1)
        row = row.to(u.dtype).reshape(-1, 3)
        return row[:, 0].view(shape) * u + row[:, 1].view(shape) * y.to(u.dtype)

    def em_step_(self, u, y, grid, step, seed, mixed: bool = False, backend=None, obs=None) -> None:
        """One Euler-Maruyama step of the reverse SDE, in place: grid[step] -> grid[step + 1] (plain torch ops,
        Philox noise of tag TAG_AFFINE at ``step``); ``mixed`` must be False (the score itself); no ``obs``
        (``inpaints`` is False)."""
        from . import philox

        _no_obs(obs)

        t = grid.index_select(0, step)
        row = self.reverse_coefficients(t, t - grid.index_select(0, step + 1), "em").to(u.dtype)
        z = philox.philox_normals(u.numel(), seed, step, philox.TAG_AFFINE, device=u.device)[0]
        u.copy_(self._apply(u, y, row) + row[:, 2].view((-1,) + (1,) * (u.dim() - 1)) * z.view(u.shape).to(u.dtype))

    def denoise_(self, u, y, eps: float, mixed: bool = False, backend=None, obs=None) -> None:
        """The noise-free last step at t = eps of size eps, in place (plain torch ops); no ``obs``."""
        _no_obs(obs)
        row = self.reverse_coefficients(torch.tensor([eps], dtype=torch.float64), eps, "denoise").to(u.device)
        u.copy_(self._apply(u, y, row))

    def pf_drift(self, u, y, t, mixed: bool = False, backend=None) -> torch.Tensor:
        """dx/dt of the probability-flow ODE in forward time at the (1,) float64 device time t."""
        return self._apply(u, y, self.reverse_coefficients(t, 0.0, "pf_drift"))

    objectives = ("hsm",)  # denoising score matching on x; no velocity to marginalise
    weightings = ("reweightedv2", "likelihood")  # the training loss weightings it takes
    folds_mixed_score = False
    inpaints = False
    fuses_guidance = False

    def score_from_output(self, out, u, t, objective: str = "hsm", output: str = "mixed",
                          differentiable: bool = False) -> torch.Tensor:
        """grad_x log p_t(x) from a network output: "mixed" -x / var - out / sigma, "eps" -out / sigma."""
        shape = (-1,) + (1,) * (u.dim() - 1)
        coef = self.mixed_score_coefficients(t).to(u.dtype)
        noise = coef[:, 1].view(shape) * out.to(u.dtype)
        return noise if output == "eps" else coef[:, 0].view(shape) * u + noise

    def score_part(self, u: torch.Tensor) -> torch.Tensor:
        """The coordinates the score is a gradient for: the state itself."""
        return u

    def likelihood_state(self, x: torch.Tensor, normal) -> torch.Tensor:
        """The state at t = 0 for the likelihood of data x: x itself."""
        return x

    def likelihood_correction(self, d: int) -> float:
        """No auxiliary variables: 0."""
        return 0.0

    def pf_divergence_terms(self, t: torch.Tensor):
        """(0, c_self, c_y) float64 at the (1,) time t: div of the probability-flow drift = tr(c_self I + c_y ds/dx)."""
        row = self.reverse_coefficients(t, 0.0, "pf_drift")[0]  # c_x c_s sigma
        return torch.zeros_like(row[0]), row[0], row[1]

    def describe(self, mixed: bool = True, objective: str = "hsm") -> str:
        """One line naming the parameters."""
        return repr(self)

    def beta(self, t):
        """beta(t) = beta_min + (beta_max - beta_min) t, float64."""
        t = _as_time(t)
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def beta_int(self, t):
        """int_0^t beta, float64."""
        t = _as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def marginal_coefficients(self, t):
        """(alpha, sigma) float64 with x_t = alpha x0 + sigma eps."""
        b = self.beta_int(t)
        alpha = torch.exp(-0.5 * b)
        sigma = torch.sqrt(-torch.expm1(-b))
        return alpha, sigma

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        """x_T ~ N(0, I) of the data shape."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) per sample, (B,) float64."""
        xd = x.to(torch.float64).flatten(1)
        return -0.5 * xd.pow(2).sum(1) - 0.5 * xd.shape[1] * math.log(2 * math.pi)

    def reverse_coefficients(self, t, h, kind: str = "em"):
        """(..., 3) float64 [c_x, c_s, sigma] of a reverse step x' = c_x x + c_s score + sigma z.

        "em": Euler-Maruyama from t to t - h; "denoise": the same without noise;
        "pf_drift": forward-time probability-flow drift dx/dt = -beta x / 2 - beta score / 2.
        """
        t = _as_time(t)
        h = _as_time(h, "h")
        beta = self.beta(t)
        if kind in ("em", "denoise"):
            bh = beta * h
            c_x = 1.0 + 0.5 * bh
            c_s = bh
            sigma = torch.sqrt(bh) if kind == "em" else torch.zeros_like(bh)
        elif kind == "pf_drift":
            c_x = -0.5 * beta
            c_s = -0.5 * beta
            sigma = torch.zeros_like(beta)
        else:
            raise ValueError(f"kind must be 'em', 'denoise' or 'pf_drift', got {kind!r}")
        return torch.stack(torch.broadcast_tensors(c_x, c_s, sigma), dim=-1)

    def mixed_score_coefficients(self, t) -> torch.Tensor:
        """(B, 2) float64 [-1 / var(t), -1 / sigma(t)] of the VP mixed score: score = c0 * x + c1 * out.

        As the official CLD-SGM code: var(t) is the marginal variance for unit-variance data,
        alpha^2 * 1 + sigma^2 (= 1 for the VP-SDE), and the network predicts the noise.
        """
        alpha, sigma = self.marginal_coefficients(t)
        return torch.stack([-1.0 / (alpha * alpha + sigma * sigma), -1.0 / sigma], dim=-1)


# The parameters' defaults, read from the classes (``cf.CLD()`` holds the official CIFAR-10 values).
CLD_DEFAULTS = {f.name: f.default for f in fields(CLD)}
VPSDE_DEFAULTS = {f.name: f.default for f in fields(VPSDE)}

STRIDINGS = ("linear", "quadratic", "polynomial", "log")


def time_grid(n: int, eps: float, striding: str = "linear") -> torch.Tensor:
    """Forward-time grid of a fixed-step sampler: (n + 1,) float64 on the CPU, from t = 1 down to t = eps.

    The official CLD-SGM discretisation in reverse time s = 1 - t: s = linspace(0, 1 - eps, n + 1);
    "quadratic" striding maps it to s = (1 - eps) * flip(1 - (s / (1 - eps))^2), so steps shrink
    quadratically towards the data (t = eps). "polynomial": uniform in t^(1/3) (rho = 3), the gDDIM
    sampler's default; "log": uniform in log t. Step i of a sampler runs from t[i] to t[i + 1].
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if striding not in STRIDINGS:
        raise ValueError(f"striding must be one of {STRIDINGS}, got {striding!r}")
    if striding == "polynomial":
        lo = float(eps) ** (1.0 / 3.0)
        ts = (1.0 - torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) * (1.0 - lo)) ** 3
        ts[0], ts[-1] = 1.0, float(eps)
        return ts
    if striding == "log":
        return torch.exp(torch.linspace(0.0, math.log(float(eps)), n + 1, dtype=torch.float64))
    s_end = 1.0 - float(eps)
    s = torch.linspace(0.0, s_end, n + 1, dtype=torch.float64)
    if striding == "quadratic":
        s = s_end * torch.flip(1.0 - (s / s_end) ** 2, dims=[0])
    return 1.0 - s
