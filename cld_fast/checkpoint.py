"""Training checkpoints: atomic writes, keep-last-N, safe loading.

A checkpoint is one ``torch.save`` file ``ckpt_<step:07d>.pt`` in the run's ``checkpoints/``
folder holding only tensors and plain Python types, so it loads with
``torch.load(..., weights_only=True)``:

    format      "cld_fast.train/1"
    step        optimizer steps done (int)
    model       state_dict of the bare network (no ``module.``/``_orig_mod.`` prefixes)
    ema         {"decay", "num_updates", "shadow_params"} (the official CLD-SGM layout)
    optimizer   optimizer.state_dict()
    scaler      GradScaler.state_dict() ({} without fp16)
    rng         {"torch_cpu": [uint8 tensor per rank], "torch_cuda": [[uint8 tensor per GPU] per rank],
                 "generator": [uint8 tensor per rank], "generator_device": str}
    sampler     {"epoch", "batch", "seed", "world_size"} of the data sampler
    config      the TrainConfig as a plain dict
    world_size  number of ranks that wrote it

The top-level ``model``/``ema``/``optimizer``/``step`` keys match the official CLD-SGM checkpoint
layout, so ``cld_fast.models.load_official_checkpoint`` can read these files too.

Loading refuses a checkpoint holding a NaN or inf in any floating tensor (weights, EMA, optimizer
state), naming the first such tensor and the newest older checkpoint of the folder that is finite
(or saying there is none): such a file can neither be sampled from nor resumed.

Writes go to a temporary file in the same folder which is flushed, fsync'ed and then renamed over
the target with ``os.replace`` (atomic on POSIX); a failure at any point removes the temporary file
and leaves every earlier checkpoint untouched.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from typing import Any, List, Mapping, Optional

import torch

from .fileio import fsync_dir, process_umask

__all__ = [
    "FORMAT", "atomic_save", "save_checkpoint", "open_checkpoint", "is_ours", "check_state", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "checkpoint_path", "resolve_resume",
    "clean_stale_temp", "CheckpointError", "rng_state_tensors", "restore_rng_states", "nonfinite_tensors",
    "last_finite_checkpoint", "check_format", "check_entries", "step_of", "bare_state_dict",
]

FORMAT = "cld_fast.train/1"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def checkpoint_path(directory: str, step: int) -> str:
    """``<directory>/ckpt_<step:07d>.pt``."""
    return os.path.join(directory, f"ckpt_{int(step):07d}.pt")


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    On any failure the temporary file is removed and an existing ``path`` is left as it was.
    Returns ``path``.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; a checkpoint gets a normal file's mode
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(exc, directory)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from exc
        raise
    fsync_dir(directory)
    return path


def _disk_full(exc: BaseException, directory: str) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or torch.save's bare RuntimeError ("unexpected
    pos ...") with under 16 MiB left next to the half-written temporary file."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, RuntimeError):
        return False
    try:
        return shutil.disk_usage(directory).free < (16 << 20)
    except OSError:
        return False


def list_checkpoints(directory: str) -> List[str]:
    """Our checkpoint files in ``directory``, oldest step first (temporary files are ignored)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(directory, name)):  # a folder or FIFO of that name is no checkpoint
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str) -> Optional[str]:
    """The checkpoint with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all); returns the removed paths."""
    if keep is None or keep <= 0:
        return []
    found = list_checkpoints(directory)
    removed = found[:-keep] if len(found) > keep else []
    for p in removed:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    return removed


def save_checkpoint(state: Mapping[str, Any], directory: str, step: int, keep: int = 3) -> str:
    """Write ``state`` (with ``format`` and ``step`` filled in) as ``ckpt_<step>.pt``, then keep the last ``keep``."""
    payload = dict(state)
    payload["format"] = FORMAT
    payload["step"] = int(step)
    path = atomic_save(payload, checkpoint_path(directory, step))
    prune_checkpoints(directory, keep)
    return path


def clean_stale_temp(directory: str) -> List[str]:
    """Remove temporary files left by a writer that was killed mid-write; returns their paths."""
    removed = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".ckpt_") and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(directory, name))
                    removed.append(os.path.join(directory, name))
                except OSError:
                    pass
    return removed


def nonfinite_tensors(obj: Any, prefix: str = "", limit: int = 1) -> List[str]:
    """Names (``model['net.0.weight']``, ``ema['shadow_params'][3]`` ...) of floating tensors in a nested
    dict/list that hold NaN or inf; at most ``limit`` of them (depth-first, in insertion order)."""
    found: List[str] = []

    def walk(x, name):
        if len(found) >= limit:
            return
        if isinstance(x, torch.Tensor):
            if (x.is_floating_point() or x.is_complex()) and x.numel() and not bool(torch.isfinite(x).all()):
                found.append(name)
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, f"{name}[{k!r}]" if name else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}[{i}]")

    walk(obj, prefix)
    return found


def _loads_finite(path: str) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable counts as not good
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT and not nonfinite_tensors(state)


def last_finite_checkpoint(directory: str, before: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint of ``directory`` (older than ``before`` if given) that loads and is finite."""
    found = list_checkpoints(directory)
    if before is not None:
        found = [p for p in found if _step_of(p) < _step_of(before)]
    for p in reversed(found):
        if _loads_finite(p):
            return p
    return None


def step_of(path: str) -> int:
    """The step in a checkpoint's file name ``ckpt_<step>.pt`` (2**62 for another name)."""
    m = _NAME.match(os.path.basename(path))
    return int(m.group(1)) if m else 2**62


_step_of = step_of
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def bare_state_dict(sd: Mapping[str, Any]) -> dict:
    """``sd`` without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for k, v in sd.items():
        nk = k
        stripped = True
        while stripped:
            stripped = False
            for pre in _WRAPPER_PREFIXES:
                if nk.startswith(pre):
                    nk, stripped = nk[len(pre):], True
        out[nk] = v
    return out


def open_checkpoint(path: str, map_location="cpu") -> Any:
    """The object a checkpoint file holds, read once with ``torch.load(..., weights_only=True)``
    (ours or an official one); CheckpointError for a missing, folder, non-regular or unreadable path."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file (ckpt_<step>.pt) or use resolve_resume")
    if not os.path.isfile(path):  # a FIFO or device: reading it could block forever
        raise CheckpointError(f"{path} is not a regular file (a pipe, socket or device); pass a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"could not load checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def is_ours(state: Any) -> bool:
    """Whether a loaded checkpoint is one of our training checkpoints (its ``format`` entry)."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_checkpoint(path: str, map_location="cpu", check_finite: bool = True) -> dict:
    """Load one of our checkpoints with ``torch.load(..., weights_only=True)``; clear errors otherwise.

    ``check_finite``: refuse (CheckpointError) a checkpoint with a NaN/inf tensor, naming it.
    """
    return check_state(open_checkpoint(path, map_location), path, check_finite)


def check_state(state: Any, path: Optional[str], check_finite: bool = True) -> dict:
    """``state`` (loaded from ``path``; None for a dict loaded by the caller) if it is one of our
    checkpoints with a ``model`` entry and a valid ``step``, finite when ``check_finite``;
    CheckpointError naming the problem otherwise."""
    name = path or "the checkpoint dict"
    check_format(state, name)
    check_entries(state, name, ("model",))
    if check_finite:
        bad = nonfinite_tensors(state)
        if bad:
            good = last_finite_checkpoint(os.path.dirname(os.path.abspath(path)), before=path) if path else None
            hint = (f"the newest finite checkpoint before it is {good} (resume with --resume {good})" if good
                    else "no earlier checkpoint in its folder is finite")
            raise CheckpointError(f"checkpoint {name} holds NaN or inf in {bad[0]}; it cannot be sampled from or "
                                  f"resumed ({hint})")
    return state


def check_format(state: Any, path: str) -> None:
    """CheckpointError naming ``path`` unless ``state`` is a checkpoint of this format."""
    fmt = state.get("format") if isinstance(state, dict) else None
    if isinstance(fmt, str) and fmt.startswith("cld_fast.train/") and fmt != FORMAT:
        raise CheckpointError(f"{path} was written by another cld_fast version (format {fmt!r}; this version reads "
                              f"{FORMAT!r}); use the cld_fast version that wrote it")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path} is not a cld_fast training checkpoint (no format={FORMAT!r} entry); official CLD-SGM "
            "checkpoints are sampled with `cld-fast sample CKPT --config cifar10` (a preset or the official config "
            "JSON) or loaded with cld_fast.load_score_model(path, config)")


def check_entries(state: Mapping[str, Any], path: str, keys) -> None:
    """CheckpointError naming ``path`` and the key when an entry is missing, or ``step`` is not an int >= 0."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no {missing[0]!r} entry (a damaged or hand-made checkpoint)")
    step = state.get("step")
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: entry 'step' must be an int >= 0 (optimizer steps done), got {step!r}")
    if "config" in keys and not isinstance(state["config"], Mapping):
        raise CheckpointError(f"{path}: entry 'config' must be a dict, got {type(state['config']).__name__}")


def resolve_resume(resume: str, run_dir: str, what: str = "--resume") -> Optional[str]:
    """The checkpoint file that ``--resume`` names.

    ``resume`` is ``"latest"`` (the newest checkpoint of ``<run_dir>/checkpoints``, None if there is
    none), a checkpoint file, or a run/checkpoints folder (its newest checkpoint). ``what``: how
    errors name the argument.
    """
    if resume in (None, "", False):
        return None
    if resume in ("latest", True):
        return latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if os.path.isdir(resume):
        for d in (os.path.join(resume, "checkpoints"), resume):
            found = latest_checkpoint(d)
            if found:
                return found
        raise CheckpointError(f"{what} {resume}: no checkpoint (ckpt_<step>.pt) in that folder or its checkpoints/")
    if not os.path.exists(resume):
        raise CheckpointError(f"{what} {resume}: no such file or folder")
    return resume


def rng_state_tensors(generator: Optional[torch.Generator]) -> dict:
    """This process's RNG states as uint8 tensors: torch CPU, every CUDA device, and ``generator``."""
    out = {"torch_cpu": torch.get_rng_state()}
    out["torch_cuda"] = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    out["generator"] = generator.get_state() if generator is not None else torch.zeros(0, dtype=torch.uint8)
    return out


def restore_rng_states(states: Mapping[str, Any], generator: Optional[torch.Generator]) -> None:
    """Inverse of :func:`rng_state_tensors`."""
    torch.set_rng_state(states["torch_cpu"].cpu())
    cuda = states.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if generator is not None and states.get("generator") is not None and states["generator"].numel():
        generator.set_state(states["generator"].cpu())
