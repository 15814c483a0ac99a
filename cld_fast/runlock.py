"""An OS-level lock on a run folder, so two trainers never write into one ``--out``.

    with RunLock("runs/toy"):        # raises RunLockedError naming the holder's PID if taken
        ...train...

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run>/.lock``, which also holds the holder's
PID (for the error message only). The kernel drops a flock when its process dies however it dies
(SIGKILL included), so a ``.lock`` file left behind by a crash is stale by construction: the next
trainer simply takes the lock; the file's presence alone means nothing. Released on ``release()``,
on leaving the ``with`` block, and by the OS on process exit. Where ``fcntl`` is missing (Windows)
the lock is a no-op with a warning.
"""
from __future__ import annotations

import errno
import os
import warnings
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock. ``pid``: the holder's PID (None if unreadable)."""

    def __init__(self, run_dir: str, pid: Optional[int]):
        self.run_dir = run_dir
        self.pid = pid
        who = f"process {pid}" if pid is not None else "another process (PID unreadable)"
        super().__init__(f"the run folder {run_dir} is in use by {who} (lock {os.path.join(run_dir, LOCK_NAME)}); "
                         "wait for it to finish or stop it, or choose another --out")


def _read_pid(fd: int) -> Optional[int]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """Exclusive lock of ``run_dir`` (created if missing) for this process; see the module docstring."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError`; a no-op if this object holds it already."""
        if self._fd is not None:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn("no fcntl on this platform: the run folder is not locked", RuntimeWarning)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(self.run_dir, pid) from None
                raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: only a live flock means 'in use')."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
