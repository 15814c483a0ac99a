"""The ``triton`` backend: Triton kernels (``cld_fast.triton_kernels``), one launch per op.

Every op of ``cld_fast.opdefs.OPS`` is registered from its declaration (schema, mutated arguments,
fake) in the ``cld_fast_triton`` namespace, so it runs inside ``torch.compile``d code without a
graph break; ``op(name)`` returns ``torch.ops.cld_fast_triton.<name>``, called with the schema's
arguments positionally. Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before the Triton kernels were defined (the Triton interpreter; slow, for tests). State float32 or
float64; network outputs may be bf16 / fp16. Coefficients are computed in-kernel from ``t`` / ``ts``
and the (5,) ``sde`` tensor; seeds and steps are (1,) int64 device tensors read inside the kernels:
no host synchronisation.

* GPU (normal Triton): ``torch.library.triton_op`` with ``wrap_triton`` launches, so Inductor sees
  the Triton kernels themselves.
* TRITON_INTERPRET=1: ``torch.library.custom_op`` + ``register_fake`` (an opaque op): ``triton_op``
  traces its body with fake tensors, which an interpreted kernel cannot run on.
* A torch whose ``triton_op`` / ``custom_op`` lack the ``schema`` argument: ``Library.define`` +
  ``impl`` + the fake (an opaque op).
"""
import importlib
import inspect
import os
import pkgutil
import re
from typing import Callable, Dict, Optional

import torch

from .. import opdefs

NAME = "triton"
NAMESPACE = opdefs.TRITON_NAMESPACE

try:
    import triton  # noqa: F401

    from .. import triton_kernels as _tk
    from ..triton_kernels import _common as _tk_common
    from ..triton_kernels import perturb as _tk_perturb

    _IMPORT_ERROR = ""
except ImportError as _exc:  # triton missing: the backend reports itself unavailable
    _IMPORT_ERROR = f"triton is not importable ({_exc})"


def _interpreted() -> bool:
    """Whether this process's kernels were built for the Triton interpreter."""
    return not _IMPORT_ERROR and _tk_common.kernel_is_interpreted(_tk_perturb._perturb_kernel)


def is_available() -> bool:
    if _IMPORT_ERROR:
        return False
    return _interpreted() or torch.cuda.is_available()


def why_unavailable() -> str:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if _interpreted() or torch.cuda.is_available():
        return ""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return ("no CUDA device, and TRITON_INTERPRET=1 was set only after cld_fast's Triton kernels "
                "were defined (set it before importing cld_fast)")
    return "no CUDA device (set TRITON_INTERPRET=1 before importing cld_fast to run the kernels on the CPU)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run on ``device`` with a state of ``dtype`` (float32 or float64)."""
    if not is_available() or dtype not in (torch.float32, torch.float64):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreted()


def _bodies() -> Dict[str, Callable]:
    """Op name -> launcher taking the schema's arguments positionally.

    Found by name: every public module of ``cld_fast.triton_kernels`` is scanned for functions named
    after an op of ``opdefs.OPS``, so a new kernel file needs no edit here.
    """
    found: Dict[str, Callable] = {}
    for info in pkgutil.iter_modules(_tk.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_tk.__name__}.{info.name}")
        for name in opdefs.OPS:
            fn = module.__dict__.get(name)
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
                if name in found:
                    raise RuntimeError(f"triton backend: two launchers named {name!r} "
                                       f"({found[name].__module__} and {module.__name__})")
                found[name] = fn
    missing = sorted(set(opdefs.OPS) - set(found))
    if missing:
        raise RuntimeError(f"triton backend: no launcher in cld_fast.triton_kernels for {missing}")
    return found


_ANNOTATIONS = {"Tensor": torch.Tensor, "Optional[Tensor]": Optional[torch.Tensor], "int": int, "float": float,
                "bool": bool}


def _typed(d: opdefs.OpDef, body: Callable) -> Callable:
    """``body`` behind a signature built from ``d.schema``: ``triton_op`` infers the schema from type
    annotations (torch 2.13 accepts but ignores its ``schema`` argument), so the annotations come
    from the declaration instead of being written out per op here."""
    schema = torch._C.parse_schema(d.qualified_schema())
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[str(a.type)])
              for a in schema.arguments]
    returns = [_ANNOTATIONS[str(r.type)] for r in schema.returns]
    if len(returns) > 1:
        raise NotImplementedError(f"{d.name}: ops with several outputs are not supported")

    def run(*args, **kwargs):
        return body(*args, **kwargs)

    run.__name__ = run.__qualname__ = d.name
    run.__signature__ = inspect.Signature(params, return_annotation=returns[0] if returns else None)
    return run


def _same_schema(registered: str, declared: str) -> bool:
    """Schemas equal up to what ``triton_op``'s inference writes differently: alias-set names
    (``Tensor(a0!)``, ``Tensor(a1!)`` for ``Tensor(a!)``, ``Tensor(b!)``), ``SymInt`` for ``int`` and the
    spelling of defaults (``0.`` for ``0.0``: both sides go through torch's schema parser)."""
    def norm(s):
        s = str(torch._C.parse_schema(s.split("::", 1)[-1]))
        s = re.sub(r"\([a-z]\d*!\)", "(!)", s)
        return re.sub(r"\bSymInt\b", "int", s)
    return norm(registered) == norm(declared)


REGISTRATION = ""  # "triton_op", "custom_op" or "library", set by _register()
_LIBRARIES = []  # keeps the fallback's torch.library.Library objects alive


def _existing(name):
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None


def _register_with_library(d: opdefs.OpDef, body: Callable) -> None:
    """Fallback for a torch without the ``schema`` argument: define, implement, fake."""
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    lib.define(d.qualified_schema())
    lib.impl(d.name, body, "CompositeExplicitAutograd")
    if hasattr(torch.library, "register_fake"):
        torch.library.register_fake(f"{NAMESPACE}::{d.name}", d.fake, lib=lib)
    _LIBRARIES.append(lib)


def _register() -> str:
    """Register every op of ``opdefs.OPS`` once per process; returns how (see REGISTRATION)."""
    lib = torch.library
    how = "triton_op" if hasattr(lib, "triton_op") and not _interpreted() else "custom_op"
    if not hasattr(lib, how):
        how = "library"
    bodies = _bodies()
    for d in opdefs.OPS.values():
        if _existing(d.name) is not None:
            continue
        qualname = f"{NAMESPACE}::{d.name}"
        body = _typed(d, bodies[d.name])
        try:
            if how == "triton_op":
                lib.triton_op(qualname, body, mutates_args=d.mutates, schema=d.schema)
            elif how == "custom_op":
                op = lib.custom_op(qualname, body, mutates_args=d.mutates, schema=d.schema)
                op.register_fake(d.fake)
            else:
                _register_with_library(d, body)
        except TypeError:  # pragma: no cover - an older torch: no ``schema`` keyword
            how = "library"
            _register_with_library(d, body)
        registered = str(_existing(d.name).default._schema)
        if not _same_schema(registered, d.qualified_schema()):
            raise RuntimeError(f"triton backend: {qualname} registered as {registered}, "
                               f"declared {d.qualified_schema()}")
    return how


if not _IMPORT_ERROR:
    REGISTRATION = _register()


def op(name: str):
    """The registered op ``name`` of ``cld_fast.opdefs.OPS`` (``torch.ops.cld_fast_triton.<name>``),
    called with the schema's arguments positionally; raises if the backend is unavailable."""
    if name not in opdefs.OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {tuple(opdefs.OPS)}")
    if _IMPORT_ERROR:
        raise RuntimeError(f"triton backend unavailable: {_IMPORT_ERROR}")
    return getattr(getattr(torch.ops, NAMESPACE), name)
