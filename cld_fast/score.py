"""Score functions built from networks that follow the official CLD-SGM convention ``model(u, t) -> out``.

    score = cf.score_fn(model, sde)          # mixed score (the default): -v / s_vv(t) - out / l22(t)
    s = score(u, t)                          # u (B, 2C, ...), t (B,) forward times -> (B, C, ...)
    score = cf.score_fn(model, sde, objective="dsm", output="eps")  # a DSM model with mixed_score=False

The returned ``NetworkScore`` is a plain callable (any ``score_fn(u, t)`` works with ``cf.sample``),
but it also exposes ``model``, ``sde``, ``objective``, ``output`` and ``raw(u, t)`` (the network
output), so ``cf.sample`` can fold the HSM mixed-score coefficients into its fused step kernels and
hand the raw output straight to them (other objective / output modes go through the one-launch
``cf.mixed_score`` op with their own coefficients, then the plain-score kernels). Calls run the model in eval mode without autograd; ``.differentiable()``
returns a variant that keeps the graph (``cf.likelihood`` needs vector-Jacobian products).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Union

import torch

from .sde import CLD, OBJECTIVES, OUTPUTS, VPSDE

_AUTOCAST_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                   "half": torch.float16}


def _autocast_dtype(value) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, str):
        key = value.lower()
        if key not in _AUTOCAST_NAMES:
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16 (or 'bf16'/'fp16'), got {value!r}")
        return _AUTOCAST_NAMES[key]
    if value in (torch.bfloat16, torch.float16):
        return value
    raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {value!r}")


def network_output(out) -> torch.Tensor:
    """The output tensor of ``model(u, t)``: a tensor, an object with a tensor ``.sample`` (diffusers'
    ``UNet2DOutput``) or a 1-tuple holding a tensor (diffusers with ``return_dict=False``)."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model(u, t) must return a tensor, an object with a tensor .sample (diffusers) or a 1-tuple "
                    f"of a tensor, got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))


class NetworkScore:
    """A score function grad_v log p_t(u) (grad_x log p_t(x) for a VP-SDE) backed by a network.

    Args:
        model: callable ``model(u, t) -> out`` (usually an ``nn.Module``): u (B, 2C, ...) float32 and
            t (B,) float32 forward times; ``out`` has the data shape (B, C, ...), returned as a tensor,
            an object with a tensor ``.sample`` (a diffusers ``UNet2DModel``) or a 1-tuple
            (``return_dict=False``); longer tuples are rejected (which entry is the output is unknown).
        sde: the ``CLD`` (or ``VPSDE``) the network was trained for.
        mixed: shorthand for ``output``: True = "mixed", False = "score" (the older spelling).
        autocast_dtype: None, torch.bfloat16 or torch.float16: run the network under CUDA autocast
            (ignored, with a warning, on other devices). The output is cast to float32.
        differentiable: keep the autograd graph (see ``differentiable()``).
        objective: CLD only: "hsm" (default) or "dsm", the official ``cld_objective`` the network was
            trained with; the noise multiplier -1 / l22 comes from that objective's perturbation kernel
            (``CLD.score_coefficients``), as in the official score function.
        output: what ``out`` is. "mixed" (the default; official ``mixed_score=True``):
            score = -v / s_vv(t) - out / l22(t), s_vv of the HSM kernel (VP-SDE: -x / var - out / sigma);
            "eps" (official ``mixed_score=False``): score = -out / l22(t) (VP-SDE: -out / sigma);
            "score": out is the score itself.
    """

    def __init__(self, model: Callable, sde: Union[CLD, VPSDE], mixed: Optional[bool] = None, autocast_dtype=None,
                 differentiable: bool = False, objective: str = "hsm", output: Optional[str] = None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(u, t), got {type(model).__name__}")
        if not getattr(sde, "is_sde", False):
            raise TypeError(f"sde must be a cld_fast.CLD or cld_fast.VPSDE, got {type(sde).__name__}")
        if mixed is not None and not isinstance(mixed, bool):
            raise TypeError(f"mixed must be a bool, got {type(mixed).__name__}")
        if output is None:
            output = "score" if mixed is False else "mixed"
        elif mixed is not None:
            raise ValueError(f"pass either mixed={mixed} or output={output!r}, not both (mixed=True is "
                             f"output='mixed', mixed=False is output='score')")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS} (what the network predicts), got {output!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective not in sde.objectives:
            raise ValueError(f"objective={objective!r} applies to a CLD only (a {type(sde).__name__} takes "
                             f"{sde.objectives}: it has no velocity)")
        self.model = model
        self.sde = sde
        self.objective = objective
        self.output = output
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.is_differentiable = bool(differentiable)
        self._warned_autocast = False

    @property
    def mixed(self) -> bool:
        """Whether ``out`` is a mixed-score output (``output == "mixed"``)."""
        return self.output == "mixed"

    @property
    def hsm_mixed(self) -> bool:
        """The HSM mixed score of a CLD: the parameterisation the fused sampler kernels fold in themselves."""
        return self.output == "mixed" and self.objective == "hsm" and self.sde.folds_mixed_score

    def __repr__(self):
        name = type(self.model).__name__
        return (f"NetworkScore(model={name}, sde={self.sde!r}, objective={self.objective!r}, "
                f"output={self.output!r}, autocast_dtype={self.autocast_dtype}, "
                f"differentiable={self.is_differentiable})")

    def with_model(self, model: Callable) -> "NetworkScore":
        """The same score function (SDE, objective, output, autocast, differentiability) around another model,
        e.g. ``functools.partial(net, class_labels=y)``."""
        return NetworkScore(model, self.sde, None, self.autocast_dtype, differentiable=self.is_differentiable,
                            objective=self.objective, output=self.output)

    def differentiable(self) -> "NetworkScore":
        """The same score function without ``torch.no_grad`` (gradients flow to u; the model stays in eval mode)."""
        return NetworkScore(self.model, self.sde, None, self.autocast_dtype, differentiable=True,
                            objective=self.objective, output=self.output)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if device.type != "cuda":
            if not self._warned_autocast:
                warnings.warn(f"autocast_dtype={self.autocast_dtype} applies on CUDA only; running the network "
                              f"in float32 on {device.type}", RuntimeWarning, stacklevel=3)
                self._warned_autocast = True
            return contextlib.nullcontext()
        # No cast cache: the context opens and closes per call, and a cache must never outlive a
        # CUDA-graph capture (cf.sample(cuda_graph=True) captures this call).
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    @property
    def num_classes(self) -> Optional[int]:
        """K for a class-conditional network (``model.num_classes`` > 0: ``model(u, t, class_labels)`` with
        labels in [0, K], K = "no label"), else None."""
        k = getattr(self.model, "num_classes", None)
        return int(k) if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None

    def raw(self, u: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output ``model(u, t)`` (``model(u, t, class_labels)`` when labels are given) as
        float32 (data shape), in eval mode, no grad unless differentiable."""
        model = self.model
        if isinstance(model, torch.nn.Module) and model.training:
            model.eval()
        grad = contextlib.nullcontext() if self.is_differentiable else torch.no_grad()
        args = (u.to(torch.float32), t.to(torch.float32)) + (() if class_labels is None else (class_labels,))
        with grad, self._autocast(u.device):
            out = model(*args)
        return network_output(out).to(torch.float32)

    def __call__(self, u: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """grad_v log p_t(u) of the data shape, in u's dtype. u (B, 2C, ...) (VP-SDE: x (B, C, ...)), t (B,);
        ``class_labels`` (B,) int64 for a conditional network (see ``num_classes``)."""
        out = self.raw(u, t) if class_labels is None else self.raw(u, t, class_labels)
        if self.output == "score":
            return out.to(u.dtype)
        return self.sde.score_from_output(out, u, t, self.objective, self.output, self.is_differentiable)


def score_fn(model: Callable, sde: Union[CLD, VPSDE], mixed: Optional[bool] = None, autocast_dtype=None,
             objective: str = "hsm", output: Optional[str] = None) -> NetworkScore:
    """Wrap a network ``model(u, t) -> out`` (official CLD-SGM convention) into a score function.

    Args:
        model: the network (``nn.Module`` or any callable); called with float32 u (B, 2C, ...) and
            float32 forward times t (B,), in eval mode and without autograd. It may return a tensor,
            an object with a tensor ``.sample`` (diffusers' ``UNet2DModel``) or a 1-tuple of a tensor.
        sde: the ``CLD`` (or ``VPSDE``) the network was trained with.
        mixed: shorthand for ``output``: True = "mixed", False = "score".
        autocast_dtype: None, torch.bfloat16 or torch.float16 for CUDA autocast; output cast to float32.
        objective: "hsm" (default) or "dsm": the official ``cld_objective`` of the training run; the
            noise multiplier -1 / l22(t) comes from that objective's perturbation kernel.
        output: "mixed" (default, official ``mixed_score=True``): score = -v / s_vv(t) - out / l22(t)
            (s_vv of the HSM kernel); "eps" (official ``mixed_score=False``): score = -out / l22(t);
            "score": the network outputs the score directly.
    Returns:
        A ``NetworkScore``: ``score(u, t)`` -> (B, C, ...) grad_v log p_t(u). ``cf.sample`` recognises it
        and feeds the raw network output to its fused kernels; ``.differentiable()`` gives a variant
        that supports autograd (used by ``cf.likelihood``).
    """
    return NetworkScore(model, sde, mixed=mixed, autocast_dtype=autocast_dtype, objective=objective, output=output)


__all__ = ["NetworkScore", "score_fn", "network_output"]
