"""tokenmill's one process supervisor: child processes started as fresh interpreters, watched,
restarted with backoff when they crash, and stopped in a chosen order. `tokenmill up` drives it for
its whole stack; :func:`supervise` drives it for `tokenmill worker --gpus all` (one pinned worker
per GPU).

Each child runs in a session of its own, so the Ctrl-C a terminal sends to its foreground process
group reaches only the supervisor, which then stops the children one group at a time. On Linux
each child also gets SIGTERM if the supervisor itself dies, so nothing is left running. Nothing
here imports torch: a parent of GPU workers must not initialise CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
    """The function a child runs between fork and exec to get SIGTERM when the supervisor dies
    (Linux; None elsewhere). libc is found here, in the parent: finding it in the child (it runs
    ldconfig) would keep the child a copy of the parent for longer than it needs to be."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def in_child() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return in_child


@dataclass
class ChildSpec:
    """What to run and how to tell that it is ready."""

    name: str
    argv: list[str]
    log_path: Path | None  # stdout and stderr together; None: the supervisor's own
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None  # None: ready as soon as it runs
    # Linux: SIGTERM when the supervisor dies. That takes a hook run between fork and exec, while
    # the child is still a copy of the supervisor (its environment included); without it the
    # child is spawned directly (vfork, then exec at once).
    die_with_parent: bool = True
    stop_timeout_s: float = 20.0  # after the stop signal, before the harder one
    start_timeout_s: float = 300.0  # not ready by then: killed and restarted


@dataclass
class Child:
    """A supervised child and what has happened to it."""

    spec: ChildSpec
    proc: subprocess.Popen | None = None
    state: str = "new"  # new, starting, ready, backoff, failed, stopping, stopped
    restarts: int = 0
    early_exits: int = 0  # exits in a row before ever becoming ready
    quick_crashes: int = 0  # exits in a row soon after starting (sets the backoff)
    started_at: float = 0.0
    restart_at: float = 0.0
    last_exit: int | None = None
    ever_ready: bool = False

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self, lines: int = 8) -> list[str]:
        """The last lines the child wrote (stdout and stderr go to one log file)."""
        if self.spec.log_path is None:
            return []
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.strip()][-lines:]


class Supervisor:
    """Starts, watches, restarts and stops child processes. Call `poll()` often from one thread
    (the one that started the children: on Linux a child's parent-death signal follows that thread)."""

    def __init__(self, *, base_env: dict[str, str] | None = None, max_backoff_s: float = 30.0,
                 give_up_after: int = 3, stable_after_s: float = 60.0) -> None:
        self.children: dict[str, Child] = {}
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._max_backoff = max_backoff_s
        self._give_up_after = give_up_after
        self._stable_after = stable_after_s
        self.events: list[str] = []  # human-readable log of restarts and failures

    def add(self, spec: ChildSpec) -> Child:
        """Registers a child (not started yet)."""
        child = Child(spec)
        self.children[spec.name] = child
        return child

    def start(self, name: str) -> Child:
        """Starts (or restarts) the named child."""
        child = self.children[name]
        spec = child.spec
        if spec.log_path is None:
            child.proc = self._popen(spec, None)
        else:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(spec.log_path, "ab") as logf:
                logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}: "
                           f"{' '.join(spec.argv)}\n".encode())
                logf.flush()
                child.proc = self._popen(spec, logf)
        child.state = "starting"
        child.started_at = time.monotonic()
        return child

    def _popen(self, spec: ChildSpec, logf: Any) -> subprocess.Popen:
        output = {} if logf is None else {"stdout": logf, "stderr": subprocess.STDOUT}
        return subprocess.Popen(
            spec.argv, env={**self._base_env, **spec.env}, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent() if spec.die_with_parent else None, **output,
        )

    def poll(self) -> None:
        """Reaps exited children, schedules or performs restarts, and checks readiness."""
        now = time.monotonic()
        for child in self.children.values():
            if child.state in ("new", "failed", "stopping", "stopped"):
                continue
            if child.state == "backoff":
                if now >= child.restart_at:
                    child.restarts += 1
                    self.start(child.spec.name)
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                self._exited(child, code, now)
            elif child.state == "starting":
                if child.spec.ready is None or _safe(child.spec.ready):
                    child.state = "ready"
                    child.ever_ready = True
                    child.early_exits = 0
                elif now - child.started_at > child.spec.start_timeout_s:
                    self.events.append(f"{child.spec.name} was not ready after "
                                       f"{child.spec.start_timeout_s:.0f}s; restarting it")
                    self._signal(child, signal.SIGKILL)

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.last_exit = code
        ran_for = now - child.started_at
        if child.state == "starting" and not child.ever_ready:
            child.early_exits += 1
        if child.early_exits >= self._give_up_after:
            child.state = "failed"
            self.events.append(f"{child.spec.name} exited with code {code} before it was ready, "
                               f"{child.early_exits} times in a row; not restarting it")
            return
        # Backoff doubles with each quick crash and starts over once a run lasted a while.
        if ran_for < self._stable_after:
            child.quick_crashes += 1
            delay = min(self._max_backoff, 2.0 ** min(child.quick_crashes - 1, 6))
        else:
            child.quick_crashes = 0
            delay = 1.0
        child.state = "backoff"
        child.restart_at = now + delay
        self.events.append(f"{child.spec.name} exited with code {code} after {ran_for:.0f}s; "
                           f"restarting in {delay:.0f}s")

    def failed(self) -> list[Child]:
        """Children that were given up on."""
        return [c for c in self.children.values() if c.state == "failed"]

    def stop(self, names: list[str], sig: int = signal.SIGTERM, timeout_s: float | None = None,
             hurry: Callable[[], bool] | None = None, on_wait: Callable[[], None] | None = None) -> list[str]:
        """Sends ``sig`` to the named children and waits for them (at most each one's stop
        timeout, or ``timeout_s``). Those still running then get SIGQUIT and, 10 s later, SIGKILL.
        ``hurry()`` returning True cuts the wait short. Returns the names that had to be killed."""
        targets = [self.children[n] for n in names if n in self.children]
        for child in targets:
            if child.state in ("backoff", "new", "failed"):
                child.state = "stopped"
            elif child.pid is not None:
                child.state = "stopping"
                self._signal(child, sig)
        limit = timeout_s if timeout_s is not None else max((c.spec.stop_timeout_s for c in targets), default=0)
        forced: list[str] = []
        deadline = time.monotonic() + limit
        self._wait(targets, deadline, hurry, on_wait)
        for harder in (signal.SIGQUIT, signal.SIGKILL):
            alive = [c for c in targets if c.pid is not None]
            if not alive:
                break
            for child in alive:
                if child.spec.name not in forced:
                    forced.append(child.spec.name)
                self._signal(child, harder)
            self._wait(alive, time.monotonic() + 10.0, None, on_wait)
        for child in targets:
            if child.proc is not None:
                child.last_exit = child.proc.poll()
            child.state = "stopped"
        return forced

    def _wait(self, targets: list[Child], deadline: float, hurry: Callable[[], bool] | None,
              on_wait: Callable[[], None] | None) -> None:
        while time.monotonic() < deadline and any(c.pid is not None for c in targets):
            if hurry is not None and hurry():
                return
            if on_wait is not None:
                on_wait()
            time.sleep(0.1)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        if child.proc is not None and child.proc.poll() is None:
            try:
                child.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a readiness probe that fails means "not yet"
        return False


def supervise(argv_for_gpu: list[list[str]], env_for_gpu: list[dict[str, str]]) -> int:
    """Runs one worker process per GPU (fresh interpreters, each pinned by its own environment,
    never forks of a CUDA process; their output goes to this process's), restarting any that die,
    until SIGINT or SIGTERM. The signal is passed on to every worker, which drains as it does
    alone (`TOKENMILL_SHUTDOWN_GRACE_S` bounds that); a second signal hurries them (SIGQUIT: the
    jobs they hold go back to the queue at once, then SIGKILL). Returns 0 once they have stopped,
    or 1 if every worker kept dying before it ran and was given up on."""
    sup = Supervisor()
    names = []
    for i, (argv, env) in enumerate(zip(argv_for_gpu, env_for_gpu)):
        name = f"worker-gpu{env.get('CUDA_VISIBLE_DEVICES', i)}"
        # The worker bounds its own drain; the supervisor waits for it (a second signal hurries).
        # No parent-death hook, as `--gpus all` always ran them: the hook would run in a forked
        # copy of this process, which sees every GPU, before the pinned worker starts.
        sup.add(ChildSpec(name, argv, None, env=env, stop_timeout_s=math.inf, die_with_parent=False))
        names.append(name)
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for name in names:
        sup.start(name)
    seen = 0
    code = 0
    while not received:
        sup.poll()
        for event in sup.events[seen:]:
            log.warning("%s", event)
        seen = len(sup.events)
        if len(sup.failed()) == len(names):
            log.error("every worker was given up on; stopping")
            code = 1
            break
        time.sleep(0.2)
    sup.stop(names, received[0] if received else signal.SIGTERM, hurry=lambda: len(received) > 1)
    return code
