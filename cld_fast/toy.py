"""Toy data with exact scores: a 2-D Gaussian mixture, its exact CLD and VP-SDE scores, and sample metrics.

    gm = GaussianMixture2D()                    # 8 components on a circle of radius 0.7, std 0.08
    x0 = gm.sample(4000, generator)
    res = cf.sample(gm.cld_score(sde), (4000, 2), sde, steps=50)
    energy_distance(res.x, gm.sample(4000, generator))

Exact CLD marginal. For component k, x0 ~ N(mu_k, s^2 I) and v0 ~ N(0, gamma M I); every data
coordinate d evolves independently, so (x_t, v_t)_d given k is Gaussian with mean a * mu_kd, where
a = (a_xx, a_vx) is the column of the mean map acting on x0, and the 2x2 covariance
C = Sigma_t^hsm + s^2 a a^T (Sigma_t^hsm: the HSM perturbation covariance, v0 marginalised). Then
log p_t(u) = logsumexp_k [log pi_k + sum_d log N(u_d; a mu_kd, C)] and grad_v log p_t(u) is the
softmax(k)-weighted mixture of the Gaussian v-scores -(C^-1 (u_d - a mu_kd))_v. The VP-SDE marginal
of component k is N(alpha mu_k, (alpha^2 s^2 + sigma^2) I). The coefficients come from
``cld_fast.sde``; everything is evaluated in float64 and returned as float32 (scores) or float64
(log densities).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sde import CLD, VPSDE


def _times(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) float64 times; a broadcast time (one value, or an expanded view) is evaluated once."""
    t = t.reshape(-1)
    if t.numel() == 1 or t.stride(0) == 0:
        return t[:1].to(torch.float64).expand(batch)
    return t.to(torch.float64)


class GaussianMixture2D:
    """Equal-weight mixture of ``n_components`` isotropic Gaussians (std ``std``) on a circle of radius ``radius``.

    Means mu_k = radius * (cos(2 pi k / n), sin(2 pi k / n)).
    """

    dim = 2

    def __init__(self, n_components: int = 8, radius: float = 0.7, std: float = 0.08):
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an int >= 1, got {n_components!r}")
        if not (float(radius) >= 0.0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
        if not (float(std) > 0.0 and math.isfinite(std)):
            raise ValueError(f"std must be a finite number > 0, got {std!r}")
        self.n_components = n_components
        self.radius = float(radius)
        self.std = float(std)
        ang = 2.0 * math.pi * torch.arange(n_components, dtype=torch.float64) / n_components
        self.means = self.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)  # (K, 2) float64
        self.log_weights = torch.full((n_components,), -math.log(n_components), dtype=torch.float64)

    def __repr__(self):
        return f"GaussianMixture2D(n_components={self.n_components}, radius={self.radius}, std={self.std})"

    # ---- data ---------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> torch.Tensor:
        """(n, 2) samples. Drawn on the generator's device (CPU by default), returned on ``device``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, self.n_components, (n,), generator=generator, device=gdev)
        z = torch.randn(n, 2, generator=generator, device=gdev, dtype=torch.float64)
        x = self.means.to(gdev)[idx] + self.std * z
        return x.to(device=device if device is not None else gdev, dtype=dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density log p(x) of the data, (n,) float64; x (n, 2)."""
        x = x.to(torch.float64)
        mu = self.means.to(x.device)
        s2 = self.std ** 2
        d2 = (x[:, None, :] - mu[None]).pow(2).sum(-1)  # (n, K)
        comp = -0.5 * d2 / s2 - self.dim * 0.5 * math.log(2.0 * math.pi * s2)
        return torch.logsumexp(self.log_weights.to(x.device) + comp, dim=1)

    def nll_bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log2 p(x) / 2 (bits per dimension), (n,) float64."""
        return -self.log_prob(x) / (self.dim * math.log(2.0))

    # ---- exact CLD marginal ---------------------------------------------------------------------
    def _cld_terms(self, u: torch.Tensor, t: torch.Tensor, sde: CLD):
        """Per-component log-likelihood terms (B, K) and v-scores (B, K, 2) of p_t(u | k), float64."""
        if u.dim() != 2 or u.shape[1] != 2 * self.dim:
            raise ValueError(f"u must have shape (B, {2 * self.dim}) (x and v stacked), got {tuple(u.shape)}")
        ud = u.to(torch.float64)
        x, v = ud[:, : self.dim], ud[:, self.dim:]
        k = sde.perturbation_kernel(_times(t, u.shape[0]), "hsm")
        s2 = self.std ** 2
        c11 = k.s_xx + s2 * k.a_xx * k.a_xx
        c12 = k.s_xv + s2 * k.a_xx * k.a_vx
        c22 = k.s_vv + s2 * k.a_vx * k.a_vx
        det = c11 * c22 - c12 * c12
        i11, i12, i22 = c22 / det, -c12 / det, c11 / det  # C^-1, (B,)
        mu = self.means.to(u.device)  # (K, 2)
        rx = x[:, None, :] - k.a_xx[:, None, None] * mu[None]  # (B, K, 2)
        rv = v[:, None, :] - k.a_vx[:, None, None] * mu[None]
        col = lambda c: c[:, None, None]  # noqa: E731
        quad = (col(i11) * rx * rx + 2.0 * col(i12) * rx * rv + col(i22) * rv * rv).sum(-1)  # (B, K)
        logn = -0.5 * quad - 0.5 * self.dim * (torch.log(det)[:, None] + 2.0 * math.log(2.0 * math.pi))
        score_v = -(col(i12) * rx + col(i22) * rv)  # (B, K, 2)
        return self.log_weights.to(u.device) + logn, score_v

    def cld_log_prob(self, u: torch.Tensor, t: torch.Tensor, sde: CLD) -> torch.Tensor:
        """Exact log p_t(u) of the CLD marginal at forward times t (B,); u (B, 4) -> (B,) float64."""
        logw, _ = self._cld_terms(u, t, sde)
        return torch.logsumexp(logw, dim=1)

    def cld_score(self, sde: CLD):
        """The exact score function ``score(u, t) -> grad_v log p_t(u)`` (B, 2) float32 for ``cf.sample``.

        Differentiable in u (plain torch ops), so ``cf.likelihood`` can take its divergence.
        """
        if not isinstance(sde, CLD):
            raise TypeError(f"sde must be a cld_fast.CLD, got {type(sde).__name__}")

        def score(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return _mixture_score(*self._cld_terms(u, t, sde))

        return score

    # ---- classes: the components ----------------------------------------------------------------
    def sample_class(self, n: int, label: int, generator: Optional[torch.Generator] = None, device=None,
                     dtype=torch.float32) -> torch.Tensor:
        """(n, 2) samples of component ``label`` (the class-conditional data distribution)."""
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.n_components:
            raise ValueError(f"label must be an int in [0, {self.n_components}), got {label!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, 2, generator=generator, device=gdev, dtype=torch.float64)
        x = self.means[label].to(gdev) + self.std * z
        return x.to(device=device if device is not None else gdev, dtype=dtype)

    def cld_class_log_posterior(self, u: torch.Tensor, t: torch.Tensor, sde: CLD) -> torch.Tensor:
        """Exact log p_t(k | u) of the classes (components) under the CLD perturbation, (B, K) float64.

        Bayes with the perturbed components: log pi_k + log N(u; a mu_k, C) normalised over k (the
        responsibilities of the perturbed mixture). Differentiable in u: the exact noise-conditional
        classifier for ``cf.ClassifierGuidance`` (its logits).
        """
        logw, _ = self._cld_terms(u, t, sde)
        return torch.log_softmax(logw, dim=1)

    def cld_classifier(self, sde: CLD):
        """The exact classifier ``classifier(u, t) -> logits`` (B, K) float64 (log p_t(k | u))."""
        if not isinstance(sde, CLD):
            raise TypeError(f"sde must be a cld_fast.CLD, got {type(sde).__name__}")
        return lambda u, t: self.cld_class_log_posterior(u, t, sde)

    def cld_class_score(self, sde: CLD) -> "ClassScore":
        """The exact class-conditional score ``score(u, t, class_labels=None)`` (B, 2) float32: the score of
        component y for labels y in [0, K), of the whole mixture for y = K ("no label") or None."""
        if not isinstance(sde, CLD):
            raise TypeError(f"sde must be a cld_fast.CLD, got {type(sde).__name__}")
        return ClassScore(self, sde)

    # ---- exact VP-SDE marginal ------------------------------------------------------------------
    def _vp_terms(self, x: torch.Tensor, t: torch.Tensor, sde: VPSDE):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        xd = x.to(torch.float64)
        alpha, sigma = sde.marginal_coefficients(_times(t, x.shape[0]))
        var = alpha * alpha * self.std ** 2 + sigma * sigma  # (B,)
        r = xd[:, None, :] - alpha[:, None, None] * self.means.to(x.device)[None]  # (B, K, 2)
        logn = -0.5 * r.pow(2).sum(-1) / var[:, None] - 0.5 * self.dim * torch.log(2.0 * math.pi * var)[:, None]
        return self.log_weights.to(x.device) + logn, -r / var[:, None, None]

    def vp_log_prob(self, x: torch.Tensor, t: torch.Tensor, sde: VPSDE) -> torch.Tensor:
        """Exact log p_t(x) of the VP-SDE marginal, (B,) float64."""
        logw, _ = self._vp_terms(x, t, sde)
        return torch.logsumexp(logw, dim=1)

    def vp_score(self, sde: VPSDE):
        """The exact VP-SDE score ``score(x, t) -> grad_x log p_t(x)`` (B, 2) float32."""
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde must be a cld_fast.VPSDE, got {type(sde).__name__}")

        def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return _mixture_score(*self._vp_terms(x, t, sde))

        return score


class ClassScore:
    """Exact conditional CLD score of a :class:`GaussianMixture2D` whose classes are its components.

    ``score(u, t, class_labels=None)``: u (B, 4), t (B,), labels (B,) int64 in [0, K] (K: no label,
    the mixture) -> (B, 2) float32 grad_v log p_t(u | y). ``num_classes`` = K.
    """

    def __init__(self, gm: GaussianMixture2D, sde: CLD):
        self.gm, self.sde, self.num_classes = gm, sde, gm.n_components

    def __call__(self, u: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        logw, comp = self.gm._cld_terms(u, t, self.sde)
        mixture = _mixture_score(logw, comp)
        if class_labels is None:
            return mixture
        y = class_labels.to(u.device).long()
        own = comp.gather(1, y.clamp(max=self.num_classes - 1)[:, None, None].expand(-1, 1, comp.shape[2]))[:, 0]
        return torch.where((y < self.num_classes)[:, None], own.to(torch.float32), mixture)


def energy_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """Energy distance E|X - Y| - E|X - X'| / 2 - E|Y - Y'| / 2 between two samples (n, d) and (m, d).

    Euclidean distances in float64; the within-sample means exclude the zero diagonal (unbiased
    U-statistics), so the estimate is unbiased and can be slightly negative for equal distributions.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, d) and (m, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("energy_distance needs at least two samples on each side")
    a = a.detach().to(device="cpu", dtype=torch.float64)
    b = b.detach().to(device="cpu", dtype=torch.float64)

    def mean_dist(p, q, same):
        total = 0.0
        for i in range(0, p.shape[0], chunk):
            total += torch.cdist(p[i:i + chunk], q, compute_mode="donot_use_mm_for_euclid_dist").sum().item()
        n, m = p.shape[0], q.shape[0]
        return total / (n * (n - 1)) if same else total / (n * m)

    return mean_dist(a, b, False) - 0.5 * mean_dist(a, a, True) - 0.5 * mean_dist(b, b, True)


__all__ = ["GaussianMixture2D", "ClassScore", "energy_distance"]


def _mixture_score(logw: torch.Tensor, component_scores: torch.Tensor) -> torch.Tensor:
    """Score of a Gaussian mixture: component scores (B, K, 2) weighted by their posteriors softmax(logw) (B, K)."""
    w = torch.softmax(logw, dim=1)
    return (w[:, :, None] * component_scores).sum(1).to(torch.float32)
