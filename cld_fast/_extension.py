"""Loads the compiled extension ``cld_fast._C`` once; a missing or broken build is not an error.

The build report (``cld_fast/_build_info.json``) records the torch the extension was built against.
The extension is not ABI-stable across torch releases, so a build for another torch is not loaded
(loading it can fail with undefined symbols or, worse, misbehave); ``check_build`` warns about that
and about an install without the extension (pip's build isolation) once, at ``import cld_fast``.
"""
from __future__ import annotations

import warnings

_state = {}


def _problem():
    """'' or why the recorded build must not be loaded with the running torch."""
    import torch

    from .build_info import read_report, torch_mismatch

    return torch_mismatch(read_report(), torch.__version__)


def load_extension():
    """(module or None, reason it is missing)."""
    if "ext" not in _state:
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)
            problem = _problem()
            if problem:
                _state["ext"], _state["why"] = None, problem
                return _state["ext"], _state["why"]
            from . import _C
            _state["ext"], _state["why"] = _C, ""
        except Exception as exc:  # noqa: BLE001 - ImportError, or an undefined symbol from a stale build
            _state["ext"], _state["why"] = None, f"{type(exc).__name__}: {exc}"
    return _state["ext"], _state["why"]


def check_build() -> str:
    """Warn (``UserWarning``, once per process) when the build report says the extension was built
    against another torch than the running one, or that the package was installed without it because
    torch was missing at build time. Returns the message ('' when all is well). Reads only the report."""
    if "checked" in _state:
        return _state["checked"]
    from .build_info import missing_torch_message, read_report

    try:
        message = _problem() or missing_torch_message(read_report())
    except Exception as exc:  # noqa: BLE001 - a broken report must not break the import
        message = f"cld_fast: the build report could not be read ({type(exc).__name__}: {exc})"
    _state["checked"] = message
    if message:
        warnings.warn(message, UserWarning, stacklevel=3)
    return message


def compiled_parts():
    """Which parts the extension was built with: a subset of {'cpu', 'cuda'}."""
    ext, _ = load_extension()
    if ext is None:
        return []
    parts = []
    if getattr(ext, "has_cpu_kernels", False):
        parts.append("cpu")
    if getattr(ext, "with_cuda", lambda: False)():
        parts.append("cuda")
    return parts
