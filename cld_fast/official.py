"""Adapter for users of the official CLD-SGM code: their ``config`` and model in, ``cf.sample`` inputs out.

    run = cf.from_official(config, score_model)          # or a checkpoint path: "checkpoint_800000.pth"
    res = run.sample(generator=torch.Generator().manual_seed(0))   # instead of sampling_fn(score_model)
    nll = run.likelihood(x)                               # instead of the official likelihood_fn

``config`` is the official configuration: the flat attribute object the official ``main.py`` builds
from ``-cc``/``-sc`` config files and flags (``config.beta0``, ``config.image_size``, ...), an
ml_collections-style object with groups (``config.model.*``, ``config.data.*``, ``config.training.*``,
``config.sampling.*``: the groups are merged into one flat set of keys), or the same as a dict.
Key names are the official ones (see ``configs/specific_cifar10.txt`` in the official repository).

The SDE keys (``sde``, ``beta_type``, ``beta0``, ``beta1``, ``m_inv``, ``gamma``, ``numerical_eps``,
``mixed_score``, ``cld_objective``) are read by :func:`sde_settings`, the sampling keys by
:func:`from_official`. A key the config lacks takes the official CIFAR-10 run's value
(``SDE_DEFAULTS``, ``SAMPLING_DEFAULTS``: the probability-flow ODE with tolerances 1e-5, a linear
grid, the denoising step); a setting cld_fast cannot reproduce is refused by name. The network and
score function come from ``cf.load_score_model``, as in ``cld-fast sample --config``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .loading import load_score_model, network_score_fn, official_settings
from .sde import CLD
from .sde_config import SDE_DEFAULTS, build_sde, flatten_config, to_bool, to_float

__all__ = ["OfficialRun", "from_official", "flatten_config", "sde_settings", "build_sde", "make_score_fn",
           "describe_sde", "SDE_DEFAULTS", "SAMPLING_DEFAULTS"]

# The value of a sampling key the config omits: the official CIFAR-10 run's (configs/default_cifar10.txt,
# then the defaults of the official main.py's flags).
SAMPLING_DEFAULTS: Dict[str, Any] = {
    "sampling_method": "ode", "striding": "linear", "sampling_eps": 1e-3, "denoising": True,
    "sampling_rtol": 1e-5, "sampling_atol": 1e-5, "sampling_solver": "scipy_solver", "sscs_num_stab": 0.0,
    "likelihood_eps": 1e-5, "likelihood_rtol": 1e-5, "likelihood_atol": 1e-5,
    "likelihood_hutchinson_type": "rademacher",
    # No official value (the official code needs them set): cld_fast's.
    "n_discrete_steps": 500, "sampling_batch_size": 64,
}
_STRIDINGS = ("linear", "quadratic")  # the official choices
_PROBES = ("rademacher", "gaussian")
# Official ODE solvers that are Dormand-Prince 5(4), the solver of cf.sample(method="ode").
_DOPRI_SOLVERS = (("scipy_solver", "RK45"), ("dopri5", None))


def sde_settings(config: Any, **overrides: Any) -> Dict[str, Any]:
    """The CLD an official config describes, as a dict of plain values.

    Args:
        config: official config (see :func:`flatten_config`), or a ``cld_fast.models`` preset dict.
        overrides: values that win over the config (None values are ignored), same key names.
    Returns:
        ``{"beta0", "beta1", "m_inv", "gamma", "numerical_eps"}`` (floats), ``"mixed_score"`` (bool),
        ``"cld_objective"`` ('hsm' | 'dsm'), ``"from_config"``: the keys that came from ``config``
        (the others are overrides or the official CIFAR-10 defaults, ``SDE_DEFAULTS``), and
        ``"sources"`` (see :func:`cld_fast.sde_config.sde_settings`).
    Raises:
        NotImplementedError: ``sde`` other than 'cld' or ``beta_type`` other than 'linear'.
        ValueError: unreadable values or an unknown ``cld_objective``.
    """
    return official_settings(flatten_config(config), overrides)


def describe_sde(sde: CLD, mixed: bool, objective: str) -> str:
    """One line naming everything the score function and sampler use, e.g. for ``cld-fast sample``."""
    return sde.describe(mixed, objective)


make_score_fn = network_score_fn


def _sampling(flat: Mapping[str, Any], key: str):
    value = flat.get(key)
    return SAMPLING_DEFAULTS[key] if value is None else value


def _solver(flat: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
    """(sampling_solver, its 'solver' option or None) of the official config."""
    solver = str(_sampling(flat, "sampling_solver"))
    options = flat.get("sampling_solver_options")
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            raise ValueError(f"config sampling_solver_options={options!r} is not JSON") from None
    inner = options.get("solver") if isinstance(options, Mapping) else None
    if solver == "scipy_solver" and inner is None:
        inner = "RK45"  # the official default options
    return solver, (None if solver == "dopri5" else inner)


@dataclass
class OfficialRun:
    """What ``cf.sample`` / ``cf.likelihood`` need for an official model and config.

    Fields:
        model: the network ``model(u, t) -> out`` (eval mode).
        score_fn: ``score_fn(u, t)`` -> grad_v log p_t(u), the official ``get_score_fn`` equivalent.
        sde: ``cf.CLD`` with the config's beta0, beta1, m_inv, gamma and numerical_eps.
        shape: sample shape (sampling_batch_size, C, H, W) or (sampling_batch_size, data_dim).
        eps: official ``sampling_eps`` (last forward time of the sampler).
        likelihood_eps: official ``likelihood_eps`` (where the data sits for ``cf.likelihood``).
        steps, method, striding, denoise: official ``n_discrete_steps``, ``sampling_method``,
            ``striding`` and ``denoising``.
        mixed, objective: the official ``mixed_score`` and ``cld_objective``.
        config: the flattened official config.
        rtol, atol: official ``sampling_rtol`` / ``sampling_atol`` (the ODE sampler's tolerances).
        sscs_num_stab: official ``sscs_num_stab`` (only its default 0 is reproduced).
        solver: official (``sampling_solver``, its ``solver`` option).
        likelihood_options: ``rtol``, ``atol``, ``probe`` of ``cf.likelihood`` (official
            ``likelihood_rtol``, ``likelihood_atol``, ``likelihood_hutchinson_type``).
        sources: where each setting came from ({key: "config" | "default" | ...}).

    A key the config lacks takes the official CIFAR-10 run's value (``SDE_DEFAULTS``,
    ``SAMPLING_DEFAULTS``): the probability-flow ODE with tolerances 1e-5, a linear grid, denoising.
    """

    model: Any
    score_fn: Callable
    sde: CLD
    shape: Tuple[int, ...]
    eps: float
    likelihood_eps: float
    steps: int
    method: str
    striding: Optional[str]
    denoise: bool
    mixed: bool
    objective: str
    config: Dict[str, Any] = field(repr=False)
    rtol: float = SAMPLING_DEFAULTS["sampling_rtol"]
    atol: float = SAMPLING_DEFAULTS["sampling_atol"]
    sscs_num_stab: float = 0.0
    solver: Tuple[str, Optional[str]] = ("scipy_solver", "RK45")
    likelihood_options: Dict[str, Any] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict, repr=False)

    def sample_kwargs(self, **overrides) -> Dict[str, Any]:
        """Keyword arguments for ``cf.sample(run.score_fn, **kwargs)``, with ``overrides`` applied.

        Raises NotImplementedError when the sampler would not reproduce the official one: SSCS with
        ``sscs_num_stab`` other than 0, or the ODE with a solver other than Dormand-Prince 5(4).
        """
        from .samplers import get_spec

        kw = dict(shape=self.shape, sde=self.sde, steps=self.steps, method=self.method, eps=self.eps,
                  striding=self.striding, denoise=self.denoise)
        kw.update(overrides)
        spec = get_spec(kw["method"])
        official = (("rtol", self.rtol), ("atol", self.atol),  # official sampling_rtol / sampling_atol
                    ("sscs_official_half_steps", True))  # the official SSCS's closing half step (beta1 != 0)
        for name, value in official:
            if spec.option(name) is not None:
                kw.setdefault(name, value)
        self._check_reproducible(kw["method"])
        return kw

    def _check_reproducible(self, method: str) -> None:
        if method == "sscs" and self.sscs_num_stab != 0.0:
            raise NotImplementedError(
                f"config sscs_num_stab={self.sscs_num_stab:g}: the official SSCS adds it to the variances of the "
                "half-step noise (var_xx and var_vv); cld_fast's fused SSCS kernels do not, so only the official "
                "default 0 is reproduced. Drop the key, or sample with another method (ode, em)")
        if method == "ode" and self.solver not in _DOPRI_SOLVERS:
            raise NotImplementedError(
                f"config sampling_solver={self.solver[0]!r} (solver {self.solver[1]!r}): cf.sample's ODE is "
                "Dormand-Prince 5(4), the official default (scipy_solver with RK45, or torchdiffeq's dopri5); "
                "another solver is not reproduced")

    def sample(self, **overrides):
        """``cf.sample`` with the official settings (any ``cf.sample`` keyword overrides them).

        Returns ``SampleResult``: ``res.x`` (shape ``self.shape``), ``res.v``, ``res.nfe``.
        """
        from .sampling import sample

        return sample(self.score_fn, **self.sample_kwargs(**overrides))

    def likelihood(self, x: torch.Tensor, **overrides):
        """``cf.likelihood(run.score_fn, x, run.sde, eps=run.likelihood_eps, **run.likelihood_options,
        **overrides)``."""
        from .nll import likelihood

        kw = dict(eps=self.likelihood_eps, **self.likelihood_options)
        kw.update(overrides)
        return likelihood(self.score_fn, x, self.sde, **kw)


def _sampling_settings(flat: Mapping[str, Any], batch_size: Optional[int]) -> Dict[str, Any]:
    """The OfficialRun fields the config's sampling keys give (absent keys: ``SAMPLING_DEFAULTS``)."""
    from .sampling import SAMPLERS

    n = batch_size if batch_size is not None else int(_sampling(flat, "sampling_batch_size"))
    if int(n) < 1:
        raise ValueError(f"batch_size must be >= 1, got {n}")
    method = str(_sampling(flat, "sampling_method")).lower()
    if method not in SAMPLERS:
        raise ValueError(f"config sampling_method={method!r}: expected one of {tuple(SAMPLERS)}")
    striding = str(_sampling(flat, "striding")).lower()
    if striding not in _STRIDINGS:
        raise NotImplementedError(f"config striding={flat['striding']!r}: cld_fast reproduces the official "
                                  f"{' and '.join(repr(s) for s in _STRIDINGS)} grids only")
    probe = str(_sampling(flat, "likelihood_hutchinson_type")).lower()
    if probe not in _PROBES:
        raise ValueError(f"config likelihood_hutchinson_type={probe!r}: expected one of {_PROBES}")
    return dict(
        batch=int(n), method=method, striding=striding, steps=int(_sampling(flat, "n_discrete_steps")),
        eps=to_float(_sampling(flat, "sampling_eps"), "sampling_eps"),
        likelihood_eps=to_float(_sampling(flat, "likelihood_eps"), "likelihood_eps"),
        denoise=to_bool(_sampling(flat, "denoising"), "denoising"),
        rtol=to_float(_sampling(flat, "sampling_rtol"), "sampling_rtol"),
        atol=to_float(_sampling(flat, "sampling_atol"), "sampling_atol"),
        sscs_num_stab=to_float(_sampling(flat, "sscs_num_stab"), "sscs_num_stab"), solver=_solver(flat),
        likelihood_options=dict(rtol=to_float(_sampling(flat, "likelihood_rtol"), "likelihood_rtol"),
                                atol=to_float(_sampling(flat, "likelihood_atol"), "likelihood_atol"), probe=probe))


def from_official(config: Any, model_or_checkpoint: Any, use_ema: bool = True, batch_size: Optional[int] = None,
                  autocast_dtype=None, map_location: Any = "cpu") -> OfficialRun:
    """One call from the official CLD-SGM ``config`` and model (or checkpoint) to ``cf.sample`` inputs.

    Args:
        config: the official config: a flat attribute object (what the official ``main.py`` passes
            around), an ml_collections-style object with groups, or either as a dict. A key it
            lacks takes the official CIFAR-10 run's value (``SDE_DEFAULTS``, ``SAMPLING_DEFAULTS``):
            the probability-flow ODE (rtol = atol = 1e-5), a linear grid, the denoising step.
        model_or_checkpoint: the official network (``nn.Module``, DDP-wrapped or not, called as
            ``model(u, t)``), a checkpoint path or a loaded checkpoint dict (official format:
            ``model`` + ``ema``; loaded by ``cf.load_score_model`` into the network the config
            describes).
        use_ema: checkpoints only: load the EMA weights (as the official sampling code does).
        batch_size: samples per call (default: the config's ``sampling_batch_size``, else 64).
        autocast_dtype: passed to ``cf.score_fn`` (CUDA autocast of the network).
        map_location: checkpoints only: the network's device (a str or ``torch.device``).
    Returns:
        :class:`OfficialRun` with ``score_fn``, ``sde``, ``shape``, ``eps``, ``likelihood_eps``,
        ``steps``, ``method``, ``striding``, ``denoise``, ``rtol``, ``atol`` and ``sample()`` /
        ``likelihood()``.
    Raises:
        NotImplementedError: config options this version cannot reproduce (non-'cld' SDE, a non-linear
            beta, a striding other than linear / quadratic, ``sscs_num_stab`` other than 0 with SSCS,
            an ODE solver other than Dormand-Prince 5(4)).
        TypeError / ValueError: a config or model of the wrong kind, unreadable values.
    """
    flat = flatten_config(config)
    official_settings(flat, {})  # a non-CLD config is refused before anything loads
    opts = _sampling_settings(flat, batch_size)
    is_checkpoint = isinstance(model_or_checkpoint, (str, os.PathLike, Mapping))
    if not is_checkpoint and not callable(model_or_checkpoint):
        raise TypeError("model_or_checkpoint must be the official network (an nn.Module or a callable model(u, t)), "
                        f"a checkpoint path or a loaded checkpoint dict, got {type(model_or_checkpoint).__name__}")
    device = map_location if is_checkpoint and isinstance(map_location, (str, torch.device)) else None
    m = load_score_model(model_or_checkpoint, config=flat, use_ema=use_ema, device=device,
                         autocast_dtype=autocast_dtype)
    sources = {**m.sources, **{k: "config" if flat.get(k) is not None else "default" for k in SAMPLING_DEFAULTS}}
    run = OfficialRun(
        model=m.network, score_fn=m.score_fn, sde=m.sde, shape=(opts["batch"],) + m.data_shape, eps=opts["eps"],
        likelihood_eps=opts["likelihood_eps"], steps=opts["steps"], method=opts["method"],
        striding=opts["striding"], denoise=opts["denoise"], mixed=m.mixed, objective=m.objective, config=flat,
        rtol=opts["rtol"], atol=opts["atol"], sscs_num_stab=opts["sscs_num_stab"], solver=opts["solver"],
        likelihood_options=opts["likelihood_options"], sources=sources)
    run.sample_kwargs()  # the config's own sampler must be reproducible: fail now, not at sample()
    return run
