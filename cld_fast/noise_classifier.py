"""Noise-conditional classifiers p_phi(y | u_t, t) on CLD states, for ``cf.ClassifierGuidance``.

    clf = NoiseClassifier(channels=1, num_classes=10, image_size=8)       # CNN for digit images
    clf = NoiseClassifierMLP(dim=2, num_classes=8)                        # MLP for 2-D toy data
    losses = train_classifier(clf, images, labels, sde, steps=2000)       # on cf.perturb states
    save_classifier(clf, "cls.pt", sde); clf, sde = load_classifier("cls.pt")
    res = cf.sample(score_fn, shape, sde, guidance=cf.ClassifierGuidance(clf, labels, scale=2.0))

Both take the whole CLD state u = (x, v) (B, 2C, H, W) or (B, 2D) and the forward time t (B,), and
return logits (B, K). The time enters as a Gaussian Fourier embedding of log t (as NCSN++'s), added
to the hidden features. Training draws t ~ U(loss_eps, 1) and u ~ p_t(u | x0) with ``cf.perturb``
(HSM kernel: the velocity marginalised, the distribution the sampler's states follow) and minimises
the cross-entropy of the data's label: the classifier learns p_t(y | x_t, v_t) of that perturbation.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sde import CLD

FORMAT = "cld_fast.noise_classifier/1"


class FourierTime(nn.Module):
    """(B,) forward times -> (B, dim) embedding: fixed Fourier features of log t, then a dense layer."""

    def __init__(self, dim: int, scale: float = 4.0):
        super().__init__()
        self.register_buffer("w", torch.randn(dim // 2) * scale)
        self.dense = nn.Linear(2 * (dim // 2), dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        proj = torch.log(t.float())[:, None] * self.w[None] * (2 * math.pi)
        return F.silu(self.dense(torch.cat([proj.sin(), proj.cos()], dim=1)))


class NoiseClassifier(nn.Module):
    """A small time-conditional CNN classifier for CLD image states.

    Args: channels C (the data's; the input has 2C), num_classes K, width w (first stage; the second
    has 2w), image_size (only recorded). ``forward(u, t)``: u (B, 2C, H, W), t (B,) -> logits (B, K).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 8):
        super().__init__()
        self.config = dict(kind="cnn", channels=channels, num_classes=num_classes, width=width, image_size=image_size)
        self.num_classes = num_classes
        self.time = FourierTime(4 * width)
        self.conv_in = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.t1 = nn.Linear(4 * width, width)
        self.t2 = nn.Linear(4 * width, 2 * width)
        self.norm1 = nn.GroupNorm(8, width)
        self.norm2 = nn.GroupNorm(8, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)
        h = self.conv_in(u)
        h = F.silu(self.norm1(self.conv1(F.silu(h)) + self.t1(temb)[:, :, None, None]))
        h = F.avg_pool2d(h, 2) if min(h.shape[-2:]) >= 4 else h
        h = F.silu(self.conv2(h))
        h = F.silu(self.norm2(self.conv3(h) + self.t2(temb)[:, :, None, None]))
        return self.head(h.mean(dim=(-2, -1)))


class NoiseClassifierMLP(nn.Module):
    """A time-conditional MLP classifier for CLD states of vector data: u (B, 2D), t (B,) -> logits (B, K)."""

    def __init__(self, dim: int = 2, num_classes: int = 8, width: int = 128):
        super().__init__()
        self.config = dict(kind="mlp", dim=dim, num_classes=num_classes, width=width)
        self.num_classes = num_classes
        self.time = FourierTime(width)
        self.inp = nn.Linear(2 * dim, width)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(u) + self.time(t))
        for layer in self.hidden:
            h = F.silu(layer(h))
        return self.head(h)


def build_classifier(config: Dict) -> nn.Module:
    """A fresh classifier from its ``config`` (``kind`` "cnn" or "mlp" and the constructor's arguments)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind == "cnn":
        return NoiseClassifier(**cfg)
    if kind == "mlp":
        return NoiseClassifierMLP(**cfg)
    raise ValueError(f"classifier config kind must be 'cnn' or 'mlp', got {kind!r}")


def train_classifier(model: nn.Module, data: torch.Tensor, labels: torch.Tensor, sde: CLD, steps: int,
                     batch_size: int = 128, lr: float = 2e-3, loss_eps: float = 1e-5,
                     generator: Optional[torch.Generator] = None, log_every: int = 0) -> List[float]:
    """Train ``model`` in place on CLD-perturbed states of ``data``; returns the mean loss per ``log_every`` block.

    data: (N, ...) float32 data in the model's space ([-1, 1] images, or 2-D points); labels: (N,)
    int64. Per step: a random batch, t ~ U(loss_eps, 1), u ~ p_t(u | x0) by ``cf.perturb`` (HSM),
    cross-entropy of ``model(u, t)`` against the labels, Adam with a cosine learning-rate decay.
    """
    from . import ops

    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"data and labels must have the same length, got {data.shape[0]} and {labels.shape[0]}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    logs, acc = [], []
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        x0, y = data[idx], labels[idx]
        t = torch.rand(batch_size, generator=g) * (1.0 - loss_eps) + loss_eps
        with torch.no_grad():
            u, _ = ops.perturb(x0, t, sde, objective="hsm", generator=g)
        loss = F.cross_entropy(model(u, t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            logs.append(sum(acc) / len(acc))
            acc = []
    model.eval()
    return logs


@torch.no_grad()
def perturbed_accuracy(model: nn.Module, data: torch.Tensor, labels: torch.Tensor, sde: CLD, t: float,
                       seed: int = 0) -> float:
    """Accuracy of ``model`` on ``data`` perturbed to forward time ``t`` (one draw of the CLD perturbation)."""
    from . import ops

    g = torch.Generator().manual_seed(seed)
    tt = torch.full((data.shape[0],), float(t))
    u, _ = ops.perturb(data, tt, sde, objective="hsm", generator=g)
    return float((model.eval()(u, tt).argmax(1) == labels).double().mean())


def save_classifier(model: nn.Module, path: str, sde: CLD, **info) -> None:
    """Write ``model`` (its config and weights) and the CLD it was trained for to ``path``."""
    from .fileio import atomic_writer

    state = {"format": FORMAT, "config": model.config, "state_dict": model.state_dict(),
             "sde": {"beta0": sde.beta0, "beta1": sde.beta1, "m_inv": sde.m_inv, "gamma": sde.gamma,
                     "numerical_eps": sde.numerical_eps}, "info": info}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_writer(path, "wb") as fh:
        torch.save(state, fh)


def load_classifier(path: str, device=None) -> Tuple[nn.Module, CLD]:
    """(classifier in eval mode, the CLD it was trained for) from a file of :func:`save_classifier`.

    ValueError naming the file when it is not such a file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one message naming it
        raise ValueError(f"{path}: not a readable classifier file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a noise-conditional classifier of cld_fast (format {FORMAT!r}; write one "
                         "with cld_fast.noise_classifier.save_classifier or bench/guidance_digits.py)")
    model = build_classifier(state["config"])
    model.load_state_dict(state["state_dict"])
    return model.to(device or "cpu").eval(), CLD(**state["sde"])


__all__ = ["NoiseClassifier", "NoiseClassifierMLP", "build_classifier", "train_classifier", "perturbed_accuracy",
           "save_classifier", "load_classifier", "FourierTime"]
