"""Atomic file writes and the mount point of a path.

    with atomic_writer("out/samples.npz") as f:      # a binary file object
        np.savez(f, x=x)
    atomic_write_text("run/config.json", text)

A write goes to a temporary file in the target's folder, which is flushed, fsync'ed and renamed
over the target with ``os.replace``: a reader sees the old file or the new one, never a partial
one, and a failure (full disk, kill) leaves the old file as it was and removes the temporary file.
The rename replaces a symbolic link at ``path`` instead of writing through it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_writer", "atomic_write_text", "mount_of", "fsync_dir", "process_umask", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: str) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_umask() -> int:
    """This process's file-mode creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file object whose contents replace ``path`` atomically when the block ends without error.

    ``mode``: ``"wb"`` or ``"w"`` (text, UTF-8). The folder must exist. An OSError raised while
    writing carries ``path`` as its filename.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=directory)
    except OSError as exc:
        raise _with_filename(exc, path) from exc
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; the result gets a normal file's mode
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _with_filename(exc, path) from exc
        raise
    fsync_dir(directory)


def _with_filename(exc: OSError, path: str) -> OSError:
    if exc.filename == path:
        return exc
    return OSError(exc.errno if exc.errno is not None else errno.EIO, exc.strerror or str(exc), path)


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_writer(path, "w") as f:
        f.write(text)
    return path


def mount_of(path: str) -> str:
    """The mount point holding ``path`` (or its nearest existing ancestor)."""
    p = os.path.abspath(path or ".")
    while not os.path.exists(p):
        p = os.path.dirname(p)
    p = os.path.realpath(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p
