"""`tokenmill worker --gpus all` on a machine without GPUs: the parent starts one fresh interpreter
per visible GPU, each pinned with its own CUDA_VISIBLE_DEVICES, restarts the ones that die, passes
SIGTERM on, and never loads torch itself (it must not initialise CUDA before children exist).
The children here cannot load a model on the CPU machine; what is checked is the supervision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A stand-in worker: records its pin and pid, dies the first time, then waits for SIGTERM.
CHILD = r"""
import os, signal, sys, time
log = sys.argv[1]
gpu = os.environ["CUDA_VISIBLE_DEVICES"]
first = not os.path.exists(f"{log}.{gpu}")
with open(log, "a") as f:
    f.write(f"{gpu} {os.getpid()} {'start' if first else 'restart'}\n")
if first:
    open(f"{log}.{gpu}", "w").close()
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: (open(log, "a").write(f"{gpu} {os.getpid()} term\n"), sys.exit(0)))
while True:
    time.sleep(0.1)
"""


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_supervisor_pins_one_process_per_gpu_restarts_the_dead_and_passes_sigterm_on(tmp_path):
    log = tmp_path / "children.log"
    code = ("import sys; from tokenmill.supervisor import supervise; "
            f"argv = [sys.executable, '-c', {CHILD!r}, {str(log)!r}]; "
            "rc = supervise([argv, argv], [{'CUDA_VISIBLE_DEVICES': '3'}, {'CUDA_VISIBLE_DEVICES': '5'}]); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(1 for line in _lines(log) if line[2] == "restart") == 2:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # the restarted children install their SIGTERM handler
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
    lines = _lines(log)
    events = {(gpu, what) for gpu, _, what in lines}
    assert events == {(g, w) for g in ("3", "5") for w in ("start", "restart", "term")}, lines
    pids = {(gpu, what): pid for gpu, pid, what in lines}
    # One process per GPU at a time, a fresh one after each death, and the live one got SIGTERM.
    for g in ("3", "5"):
        assert pids[(g, "start")] != pids[(g, "restart")] == pids[(g, "term")]


@pytest.mark.parametrize(("visible", "tp", "pins"), [
    ("3,5", 1, {"3", "5"}),
    # one worker per group of 2 GPUs; the fifth GPU makes no whole group and gets no worker
    ("3,5,6,7,9", 2, {"3,5", "6,7"}),
])
def test_worker_gpus_all_pins_each_child_and_keeps_torch_out_of_the_parent(tmp_path, redis_url, visible, tp, pins):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "TOKENMILL_REDIS_URL": redis_url,
           "TOKENMILL_DATABASE_URL": f"sqlite:///{tmp_path}/store.db"}
    parent = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "worker", "--gpus", "all",
                               "--tensor-parallel-size", str(tp), "--model", "smollm2-135m-instruct"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(seen.values())) < len(pins):
            parent_cmdline = _cmdline(parent.pid)
            for child in _children(parent.pid):
                # Between fork and exec a child still shows the parent's command line and
                # environment (CUDA_VISIBLE_DEVICES=3,5): read its pin only once it has exec'd.
                if _cmdline(child) in (b"", parent_cmdline):
                    continue
                pin = _environ(child).get("CUDA_VISIBLE_DEVICES")
                if pin is not None:
                    seen[child] = pin
            time.sleep(0.05)
        maps = Path(f"/proc/{parent.pid}/maps").read_text()
    finally:
        parent.send_signal(signal.SIGTERM)
        try:
            parent.wait(60)
        except subprocess.TimeoutExpired:
            parent.kill()
    assert set(seen.values()) == pins, seen
    assert "libtorch" not in maps, "the supervising parent loaded torch"


def test_worker_gpus_all_with_fewer_gpus_than_one_tensor_parallel_group_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
    out = subprocess.run([sys.executable, "-m", "tokenmill.cli", "worker", "--gpus", "all", "--tensor-parallel-size", "4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--tensor-parallel-size 4 needs 4 GPUs per worker, but 2 are visible (3,5)" in out.stderr


def test_worker_gpus_all_without_a_visible_gpu_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "tokenmill.cli", "worker", "--gpus", "all"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no GPU is visible" in out.stderr


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
