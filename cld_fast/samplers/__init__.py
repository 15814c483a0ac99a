"""The samplers of ``cf.sample``: a core that names no sampler, and one file per sampler.

    core.py    checks, time grids, the score evaluator, the step loop, the registry
    sscs.py    the symmetric splitting CLD sampler (the default)
    em.py      Euler-Maruyama on the reverse SDE
    gddim.py   deterministic exponential-integrator multistep (gDDIM)
    ode.py     the probability-flow ODE, adaptive Dormand-Prince 5(4)

A new sampler is one file that registers itself (``register_sampler``) and is imported here.
"""
from . import em, gddim, ode, sscs  # noqa: F401  (each registers itself)
from .core import (SAMPLERS, FixedPlan, NFEBudgetError, NonFiniteSamplesError, Option, SampleResult, SamplerRun,
                   SamplerSpec, SamplingError, Stepper, all_options, get_spec, register_sampler, sampler_names)
from .gddim import gddim_table
from .ode import ODE_MAX_NFE, dopri5

__all__ = ["SAMPLERS", "FixedPlan", "NFEBudgetError", "NonFiniteSamplesError", "Option", "SampleResult",
           "SamplerRun", "SamplerSpec", "SamplingError", "Stepper", "all_options", "get_spec", "register_sampler",
           "sampler_names", "gddim_table", "ODE_MAX_NFE", "dopri5"]
