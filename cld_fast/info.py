"""``cld-fast info``: versions, backends, compiled parts, GPU."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    """A dict of what this installation can do (versions, backends and why others can't run)."""
    import torch

    from . import __version__, backends
    from ._extension import compiled_parts, load_extension

    info = {
        "cld_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = "not installed"
    ext, why = load_extension()
    info["compiled"] = ", ".join(compiled_parts()) or f"none ({why})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    else:
        info["gpu"] = "none"
    avail = backends.available()
    info["backends"] = ", ".join(avail)
    for name in backends.BACKEND_NAMES:
        if name not in avail:
            info[f"  {name} unavailable"] = backends.get(name).why_unavailable()
    forced = backends.forced()
    if forced:
        info["CLD_FAST_BACKEND"] = forced
    return info


def main(argv=None) -> int:
    for key, value in collect().items():
        print(f"{key:<24} {value}")
    return 0
