"""Loads the compiled extension ``cld_fast._C`` once; a missing or broken build is not an error."""
from __future__ import annotations

_state = {}


def load_extension():
    """(module or None, reason it is missing)."""
    if "ext" not in _state:
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)
            from . import _C
            _state["ext"], _state["why"] = _C, ""
        except Exception as exc:  # noqa: BLE001 - ImportError, or an undefined symbol from a stale build
            _state["ext"], _state["why"] = None, f"{type(exc).__name__}: {exc}"
    return _state["ext"], _state["why"]


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
