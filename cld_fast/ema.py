"""Exponential moving average of the network weights, as in the official CLD-SGM code.

The official ``ExponentialMovingAverage`` (``models/ema.py`` of CLD-SGM, taken from score_sde)
keeps ``shadow_params`` for the trainable parameters and, with ``use_num_updates`` (the default),
warms the decay up: at update n (1-based) it uses ``min(decay, (1 + n) / (10 + n))``. The update
is ``shadow -= (1 - decay) * (shadow - param)``. Here it is one ``torch._foreach_lerp_`` over all
tensors (no host synchronisation; the decay is a host float computed from the update count).

``state_dict()`` has the official layout (``decay``, ``num_updates``, ``shadow_params`` as a list
of tensors in ``parameters()`` order), so checkpoints hold plain types and official EMA states
load directly.
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["ExponentialMovingAverage"]


def _trainable(parameters: Iterable[torch.nn.Parameter]) -> List[torch.Tensor]:
    return [p for p in parameters if p.requires_grad]


class ExponentialMovingAverage:
    """EMA of a model's trainable parameters.

    Args:
        parameters: the parameters to track (``model.parameters()``; frozen ones are skipped).
        decay: the target decay (official default 0.9999).
        use_num_updates: warm the decay up with ``min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, use_num_updates: bool = True):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates: Optional[int] = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in _trainable(parameters)]

    def current_decay(self, num_updates: Optional[int] = None) -> float:
        """The decay the next (or the given 1-based) update uses."""
        if self.num_updates is None:
            return self.decay
        n = (self.num_updates + 1) if num_updates is None else num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Fold the current parameters into the average (call after every optimizer step)."""
        decay = self.current_decay()
        if self.num_updates is not None:
            self.num_updates += 1
        params = [p.detach() for p in _trainable(parameters)]
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA tracks {len(self.shadow_params)} tensors but got {len(params)} parameters")
        torch._foreach_lerp_(self.shadow_params, params, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, target) -> None:
        """Write the averaged weights into ``target`` (a module or an iterable of parameters)."""
        params = _trainable(target.parameters() if isinstance(target, nn.Module) else target)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA holds {len(self.shadow_params)} tensors but the target has {len(params)} parameters")
        torch._foreach_copy_(params, self.shadow_params)

    def to(self, device) -> "ExponentialMovingAverage":
        self.shadow_params = [s.to(device) for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        """``{'decay', 'num_updates', 'shadow_params'}`` (official layout; plain types and tensors)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": list(self.shadow_params)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict` (or an official CLD-SGM ``ema`` entry)."""
        shadow = list(state["shadow_params"])
        if len(shadow) != len(self.shadow_params):
            raise ValueError(f"EMA state holds {len(shadow)} tensors but the model has {len(self.shadow_params)} trainable parameters")
        for i, (mine, theirs) in enumerate(zip(self.shadow_params, shadow)):
            if tuple(mine.shape) != tuple(theirs.shape):
                raise ValueError(f"EMA tensor {i} has shape {tuple(theirs.shape)} in the state but {tuple(mine.shape)} in the model")
            mine.copy_(theirs)
        self.decay = float(state["decay"])
        n = state.get("num_updates")
        self.num_updates = None if n is None else int(n)
