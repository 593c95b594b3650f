"""The lock that keeps two `tokenmill up` off one data directory.

Two stacks on one directory would share the SQLite file and Redis's append-only file, and each
would take the other's `up.json` for its own. The stack holds an exclusive `flock` on
``<data dir>/up.lock`` for its whole life; the kernel releases it when the process ends, however
it ends, so a crash never leaves a stale lock behind. The file holds the holder's pid, for the
message a refused start prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "up.lock"


class DataDirInUse(Exception):
    """Another process holds the data directory's lock; ``pid`` is the holder (None if unknown)."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"the data directory {data_dir} is in use by another tokenmill up ({holder})")


class DataDirLock:
    """An exclusive lock on a data directory, held from `acquire()` until `release()` or the end
    of the process. Not inherited by child processes (the descriptor is close-on-exec)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock at once or raises DataDirInUse (never waits)."""
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.data_dir, holder_pid(self.data_dir)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Gives the lock back (the file stays: removing it could race a starting stack)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder_pid(data_dir: Path) -> int | None:
    """The pid written by the lock's holder, or None when there is none to read."""
    try:
        return int((data_dir / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def is_locked(data_dir: Path) -> bool:
    """True when a live process holds the data directory's lock. Looks with a shared lock taken
    and dropped at once, and writes nothing."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
