"""Class-conditional sampling with ``cf.sample(..., guidance=...)``: classifier guidance and classifier-free
guidance, and the noise-conditional classifiers that classifier guidance needs.

    res = cf.sample(score_fn, shape, sde, guidance=cf.ClassifierGuidance(classifier, labels, scale=1.0))
    res = cf.sample(cond_score_fn, shape, sde, guidance=cf.ClassifierFree(labels, weight=2.0))

The CLD reverse SDE needs only the velocity score grad_v log p_t(x, v): the noise enters v alone.
For a class y, Bayes gives p_t(u | y) = p_t(u) p_t(y | u) / p(y), so

    grad_v log p_t(u | y) = grad_v log p_t(u) + grad_v log p_t(y | x, v),

where p_t(y | x_t, v_t) is the class posterior of the *perturbed* state (x and v both carry
information about the data x0). Classifier guidance adds scale * grad_v log p_phi(y | u, t) of a
noise-conditional classifier (scale 1: the conditional score; scale s: the score of
p_t(u) p_t(y | u)^s). Classifier-free guidance combines a conditional network's outputs with and
without the label, score = (1 + w) s(u, t, y) - w s(u, t, none), which equals
s(u, t, none) + (1 + w) grad_v log p_t(y | u) for exact scores: w = 0 is the conditional model,
w is classifier guidance with scale 1 + w.

Both work on any score function and sampler. With a ``cf.score_fn`` network (the HSM mixed score
-v / s_vv - out / l22, which the fused steps fold in themselves) the guided quantity stays a raw
network output: the classifier term g enters as out - l22(t) g (``Evaluator.score_term``) and the
classifier-free combination acts on the two outputs directly (``Evaluator.combine``; the -v / s_vv
term is common to both and the weights sum to 1). The fixed-step CLD samplers (sscs, em, gddim) leave
that combination to their fused step op (``y_uncond``, ``guide_weight`` of ``cld_fast.ops``): one launch
per network evaluation with guidance too.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple, Union

import torch

Labels = Union[int, torch.Tensor, list, tuple]


def _labels(labels: Labels, name: str = "labels") -> torch.Tensor:
    """``labels`` as a CPU int64 tensor, 0-dim for one int (broadcast to the batch later)."""
    if isinstance(labels, bool):
        raise TypeError(f"{name} must be an int or a 1-D tensor / list of ints, got bool")
    if isinstance(labels, int):
        return torch.tensor(labels, dtype=torch.int64)
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise TypeError(f"{name} must be an int or a 1-D tensor / list of ints")
        labels = torch.tensor(labels, dtype=torch.int64)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an int or a 1-D tensor / list of ints, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() > 1:
        raise TypeError(f"{name} must be an int or a 1-D integer tensor, got dtype {labels.dtype} of shape "
                        f"{tuple(labels.shape)}")
    return labels.detach().to("cpu", torch.int64)


def _label_range(labels: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of CPU labels, read once when the guidance is built (never inside ``cf.sample``)."""
    return (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)


def _bind_labels(labels: torch.Tensor, bounds: Tuple[int, int], batch: int, num_classes: Optional[int], device,
                 name="labels") -> torch.Tensor:
    """(B,) int64 labels on ``device``, checked against the batch and the class count (``bounds``: their range)."""
    if labels.dim() == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"{name} must hold one label per sample ({batch}) or be one int, got shape "
                         f"{tuple(labels.shape)}")
    lo, hi = bounds
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} must lie in {bound}, got values in [{lo}, {hi}]")
    return labels.contiguous().to(device)


def check_number(value, name: str, minimum: float = 0.0) -> float:
    """``value`` as a float, checked finite and >= ``minimum`` (a ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def classifier_gradient(classifier: Callable, labels: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                        sde) -> torch.Tensor:
    """grad_v log p_phi(y | u, t) (data shape, u's dtype) by autograd through ``classifier(u, t) -> logits``.

    u (B, 2C, ...) (VP-SDE: x), t (B,) forward times, labels (B,) int64. The classifier runs in eval
    mode; the gradient is taken in u's dtype and restricted to the score's coordinates
    (``sde.score_part``: v for CLD).
    """
    if isinstance(classifier, torch.nn.Module) and classifier.training:
        classifier.eval()
    with torch.enable_grad():
        ug = u.detach().requires_grad_(True)
        logits = classifier(ug, t)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != u.shape[0]:
            raise ValueError(f"classifier(u, t) must return logits of shape (B, K) = ({u.shape[0]}, K), got "
                             f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
        logp = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, ug)
    return sde.score_part(grad).to(u.dtype)


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance: score + scale * grad_v log p_phi(y | u, t).

    Args:
        classifier: ``classifier(u, t) -> logits`` (B, K), differentiable in u; u (B, 2C, ...) the
            CLD state (x and v), t (B,) forward times. A noise-conditional classifier trained on
            ``cf.perturb`` states (``train_classifier``), or an exact one (``GaussianMixture2D.cld_classifier``).
        labels: the requested class per sample: (B,) ints, or one int for all.
        scale: guidance scale s >= 0 (0: the unguided sampler; 1: the conditional score for an exact
            classifier).
    """

    classifier: Callable
    labels: Labels
    scale: float = 1.0
    bounds: Tuple[int, int] = field(default=(0, 0), init=False, repr=False, compare=False)

    def __post_init__(self):
        if not callable(self.classifier):
            raise TypeError(f"classifier must be callable as classifier(u, t) -> logits, got "
                            f"{type(self.classifier).__name__}")
        labels = _labels(self.labels)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "bounds", _label_range(labels))
        object.__setattr__(self, "scale", check_number(self.scale, "scale"))

    def bind(self, score_fn, batch: int, device) -> "ClassifierGuidance":
        """This guidance with (B,) labels on ``device`` (checked), for one ``cf.sample`` run."""
        k = getattr(self.classifier, "num_classes", None)
        bound = copy.copy(self)  # no __post_init__: the labels were checked when built
        object.__setattr__(bound, "labels", _bind_labels(self.labels, self.bounds, batch, k, device))
        return bound

    def evaluate(self, ev, u: torch.Tensor, t: torch.Tensor, fuse: bool = False) -> torch.Tensor:
        """What ``ev.fn`` returns at (u, t), guided: its output plus the classifier term in its units
        (``fuse`` is not read: the gradient comes from autograd, not an elementwise combination)."""
        y = ev.fn(u, t)
        if self.scale == 0.0:
            return y
        g = classifier_gradient(self.classifier, self.labels, u, t, ev.sde)
        return y + ev.score_term(g.mul_(self.scale), t).to(y.dtype)


@dataclass(frozen=True)
class ClassifierFree:
    """Classifier-free guidance: (1 + w) s(u, t, y) - w s(u, t, none).

    The score function must be class-conditional: ``score_fn(u, t, class_labels)`` with labels in
    [0, K] (K = "no label") and a ``num_classes`` attribute K, as ``cf.score_fn`` of a network
    trained with ``cld-fast train --conditional`` (``num_classes`` on the network) or
    ``GaussianMixture2D.cld_class_score``. Both evaluations run as one batch-doubled call (one
    network evaluation per step; w = 0 runs the conditional half alone).

    Args:
        labels: the requested class per sample: (B,) ints in [0, K), or one int for all.
        weight: w >= 0 (0: the conditional model; larger: sharper classes, less diversity).
    """

    labels: Labels
    weight: float = 1.0
    bounds: Tuple[int, int] = field(default=(0, 0), init=False, repr=False, compare=False)

    def __post_init__(self):
        labels = _labels(self.labels)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "bounds", _label_range(labels))
        object.__setattr__(self, "weight", check_number(self.weight, "weight"))

    def bind(self, score_fn, batch: int, device) -> "ClassifierFree":
        k = conditional_classes(score_fn)
        if k is None:
            raise ValueError("guidance=cf.ClassifierFree needs a class-conditional score function "
                             "(score_fn(u, t, class_labels) with a num_classes attribute, e.g. cf.score_fn of a "
                             "network trained with --conditional); use cf.ClassifierGuidance with a classifier "
                             "for an unconditional model")
        labels = _bind_labels(self.labels, self.bounds, batch, k, device)
        bound = copy.copy(self)  # no __post_init__: the labels were checked when built
        object.__setattr__(bound, "labels", torch.cat([labels, torch.full_like(labels, k)]))  # labels, then none
        return bound

    def evaluate(self, ev, u: torch.Tensor, t: torch.Tensor, fuse: bool = False):
        """The guided output at (u, t): ``ev.combine`` of the two halves of one batch-doubled call, or with
        ``fuse`` the halves themselves as a ``Guided`` (views, no copies) for the fused step op to combine."""
        from .samplers.core import Guided

        b = u.shape[0]
        if self.weight == 0.0:
            return ev.fn(u, t, class_labels=self.labels[:b])
        out = ev.fn(torch.cat([u, u]), torch.cat([t, t]), class_labels=self.labels)
        if fuse:
            return Guided(out[:b], out[b:], self.weight)
        return ev.combine(out[:b], out[b:], self.weight)


def conditional_classes(score_fn) -> Optional[int]:
    """K of a class-conditional score function (its ``num_classes``), else None."""
    k = getattr(score_fn, "num_classes", None)
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


GUIDANCE_TYPES = (ClassifierGuidance, ClassifierFree)


def bind_guidance(guidance, score_fn, batch: int, device):
    """``guidance`` bound to one run (labels checked and on ``device``), or None."""
    if guidance is None:
        return None
    if not isinstance(guidance, GUIDANCE_TYPES):
        raise TypeError(f"guidance must be cf.ClassifierGuidance, cf.ClassifierFree or None, got "
                        f"{type(guidance).__name__}")
    return guidance.bind(score_fn, batch, device)


__all__ = ["ClassifierGuidance", "ClassifierFree", "classifier_gradient", "conditional_classes", "bind_guidance"]
