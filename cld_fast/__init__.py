"""cld_fast: fused kernels, samplers and training for critically-damped Langevin diffusion (CLD).

    import cld_fast as cf
    sde = cf.CLD()                                   # the official CIFAR-10 SDE (cld_fast.sde.CLD_DEFAULTS)
    u, noise = cf.perturb(x0, t, sde)                # u = (x, v) stacked on dim 1
    loss = cf.hsm_loss(model(u, t), u, t, sde, noise)
    res = cf.sample(cf.score_fn(model, sde), x0.shape, sde, steps=50)

Forward time t in (0, 1], t = 0 is data.
"""
from __future__ import annotations

import importlib

from . import _extension
from . import backends  # callable: cld_fast.backends() lists the backends that can run here
from .checks import value_checks
from .ops import (Noise, em_step_, gddim_history, gddim_step_, half_step_, hsm_loss, mixed_score, perturb, pf_drift,
                  sscs_step_)
from .sde import CLD, VPSDE, PerturbationKernel

__version__ = "0.1.0"

# A build for another torch, or an install without the extension, says so once (a UserWarning).
_extension.check_build()

# Public names that live in modules imported on first use (keeps `import cld_fast` light).
_LAZY = {
    "sample": "sampling",
    "SAMPLERS": "sampling",
    "register_sampler": "sampling",
    "SampleResult": "sampling",
    "SamplingError": "sampling",
    "NonFiniteSamplesError": "sampling",
    "NFEBudgetError": "sampling",
    "score_fn": "score",
    "Scheduler": "scheduler",
    "SSCSScheduler": "scheduler",
    "GDDIMScheduler": "scheduler",
    "likelihood": "nll",
    "from_official": "official",
    "OfficialRun": "official",
    "load_score_model": "loading",
    "ScoreModel": "loading",
    "build_sde": "sde_config",
    "Inpaint": "conditions",
    "ClassifierGuidance": "guidance",
    "ClassifierFree": "guidance",
}
# Names that need an optional dependency (diffusers): lazy too, and kept out of __all__ so that
# `from cld_fast import *` works without it.
_LAZY_OPTIONAL = {
    "CLDSSCSScheduler": "diffusers_scheduler",
    "CLDEMScheduler": "diffusers_scheduler",
}
# Submodules offered as attributes before their first import (cf.kdiffusion.sample_sscs).
_LAZY_MODULES = ("kdiffusion",)


def __getattr__(name):
    if name in _LAZY or name in _LAZY_OPTIONAL:
        module = importlib.import_module(f".{_LAZY.get(name) or _LAZY_OPTIONAL[name]}", __name__)
        return getattr(module, name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cld_fast' has no attribute {name!r}")


def __dir__():
    """The module's names including the lazy ones (``dir(cf)``, tab completion)."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CLD", "VPSDE", "PerturbationKernel", "Noise", "perturb", "hsm_loss", "mixed_score", "half_step_",
    "sscs_step_", "em_step_", "gddim_step_", "gddim_history", "pf_drift", "backends", "value_checks", *_LAZY,
]
