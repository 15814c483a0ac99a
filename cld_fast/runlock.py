"""An OS-level lock on a run folder, so two trainers never write into one ``--out``.

    with RunLock("runs/toy") as lock:   # raises RunLockedError naming the holder's PID if taken
        ...train...
        lock.check()                     # RunFolderGoneError if the folder was removed or replaced

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the run folder itself (a descriptor of the
directory), not on a file inside it: deleting or replacing any file of the folder cannot let a second
trainer in, and a symbolic link planted in the folder is never followed. ``<run>/.lock`` holds the
holder's PID for the error message only; it is written with an atomic rename (a link at that name is
replaced, its target untouched) and read with ``O_NOFOLLOW``. The kernel drops a flock when its
process dies however it dies (SIGKILL included), so a ``.lock`` file left behind by a crash means
nothing. :meth:`RunLock.check` compares the folder at the path with the locked one (device and
inode), so a trainer whose folder was deleted (``rm -rf``) or swapped stops instead of re-creating
an unlocked folder. Released on ``release()``, on leaving the ``with`` block, and by the OS on process
exit. Where ``fcntl`` is missing (Windows) the lock is a no-op with a warning.
"""
from __future__ import annotations

import errno
import os
import stat
import warnings
from typing import Optional

from .fileio import atomic_write_text

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunLock", "RunLockedError", "RunFolderGoneError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock. ``pid``: the holder's PID (None if unreadable)."""

    def __init__(self, run_dir: str, pid: Optional[int]):
        self.run_dir = run_dir
        self.pid = pid
        who = f"process {pid}" if pid is not None else "another process (PID unreadable)"
        super().__init__(f"the run folder {run_dir} is in use by {who} (lock {os.path.join(run_dir, LOCK_NAME)}); "
                         "wait for it to finish or stop it, or choose another --out")


class RunFolderGoneError(RuntimeError):
    """The locked run folder was deleted, moved or replaced while this process held it."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        super().__init__(f"the run folder {run_dir} was deleted or replaced while training; stopped without writing "
                         "into it (nothing is re-created). Restore the folder and resume with --resume, or choose "
                         "another --out")


def _read_pid(path: str) -> Optional[int]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock of ``run_dir`` (created if missing) for this process; see the module docstring."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._identity = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError`; a no-op if this object holds it already."""
        if self._fd is not None:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows: folders cannot be opened as files there
            warnings.warn("no fcntl on this platform: the run folder is not locked", RuntimeWarning)
            st, fd = os.stat(self.run_dir), -1
        else:
            fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(self.run_dir, _read_pid(self.path)) from None
                raise
            st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        self._fd = fd
        try:
            atomic_write_text(self.path, f"{os.getpid()}\n")
        except BaseException:
            self.release()
            raise
        return self

    def check(self) -> None:
        """Raise :class:`RunFolderGoneError` if the folder at ``run_dir`` is not the folder this lock holds."""
        if self._fd is None:
            return
        try:
            st = os.stat(self.run_dir)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise RunFolderGoneError(self.run_dir)

    def release(self) -> None:
        """Drop the lock; the PID file is removed when it still names this process."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if _read_pid(self.path) == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if fd >= 0:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
