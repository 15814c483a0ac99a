"""The small MLP that the official CLD-SGM code uses for 2-D toy data (its ``models/mlp.py``, name 'mlp').

Architecture (parameter names identical to the official ``MLP``)::

    main.0: Linear(2*D + 1, 128), SiLU,
    main.2: Linear(128, 128),     SiLU,
    main.4: Linear(128, 128),     SiLU,
    main.6: Linear(128, 128),     SiLU,
    main.8: Linear(128, D)

with D = 2 (``input_dim``). The input is ``cat(u, t[:, None])``: u = (x, v) of shape (B, 2D) for
CLD (B, D otherwise) and the raw forward time t, not log t (the official MLP feeds t as is; only
its ``ResNet`` toy model uses log t).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Toy-data score network of CLD-SGM.

    Args:
        config: optional dict (or object with attributes) with the official keys; only ``sde`` is
            read ('cld', the default, means the input holds (x, v)). ``input_dim``/``hidden_dim``
            in the dict override the arguments (an extension; the official code fixes them).
        input_dim: data dimension D (2).
        index_dim: number of time inputs (1).
        hidden_dim: width of the hidden layers (128).

    ``forward(u, t)``: u (B, 2D) float (cat(x, v)), t (B,) forward time in [0, 1] (0-dim is
    broadcast) -> (B, D), dtype of u (or the autocast dtype).
    """

    def __init__(self, config: Optional[Any] = None, input_dim: int = 2, index_dim: int = 1, hidden_dim: int = 128):
        super().__init__()
        sde = "cld"
        if config is not None:
            get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
            sde = str(get("sde", "cld")).lower()
            input_dim = int(get("input_dim", get("data_dim", input_dim)))
            hidden_dim = int(get("hidden_dim", hidden_dim))
        act = nn.SiLU()
        self.x_input = True
        self.v_input = sde == "cld"
        in_dim = input_dim * 2 + index_dim if self.v_input else input_dim + index_dim
        self.input_dim = input_dim
        self.in_features = in_dim - index_dim
        self.out_features = input_dim
        self.main = nn.Sequential(nn.Linear(in_dim, hidden_dim), act,
                                  nn.Linear(hidden_dim, hidden_dim), act,
                                  nn.Linear(hidden_dim, hidden_dim), act,
                                  nn.Linear(hidden_dim, hidden_dim), act,
                                  nn.Linear(hidden_dim, input_dim))

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u (B, 2D), t (B,) -> (B, D). See the class docstring."""
        if u.ndim != 2 or u.shape[1] != self.in_features:
            raise ValueError(f"expected u of shape (B, {self.in_features}), got {tuple(u.shape)}")
        if t.ndim == 0:
            t = t.expand(u.shape[0])
        h = torch.cat([u, t.reshape(-1, 1).to(u.dtype)], dim=1)
        return self.main(h)
