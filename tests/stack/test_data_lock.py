"""The data directory's lock between real processes: one holder at a time, the holder's pid in the
refusal, and the lock gone with its holder however the holder ends (SIGKILL included)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenmill.data_lock import DataDirInUse, DataDirLock, is_locked

HOLD = "import sys, time\nfrom pathlib import Path\nfrom tokenmill.data_lock import DataDirLock\n" \
       "DataDirLock(Path(sys.argv[1])).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"


def _holder(data_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_until_the_holder_is_killed(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "data")
    try:
        assert is_locked(tmp_path / "data")
        with pytest.raises(DataDirInUse) as refused:
            DataDirLock(tmp_path / "data").acquire()
        assert refused.value.pid == holder.pid
        assert f"in use by another tokenmill up (pid {holder.pid})" in str(refused.value)
    finally:
        holder.kill()
        holder.wait(10)
    # Killed without a chance to clean up: the kernel released the lock with the process.
    assert not is_locked(tmp_path / "data")
    lock = DataDirLock(tmp_path / "data")
    lock.acquire()
    assert lock.held and is_locked(tmp_path / "data")
    lock.release()
    assert not is_locked(tmp_path / "data")


def test_a_child_process_does_not_keep_the_lock(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    lock.acquire()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock.release()
        time.sleep(0.1)
        assert not is_locked(tmp_path), "a child process inherited the lock"
    finally:
        child.kill()
        child.wait(10)
