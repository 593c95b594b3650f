"""`tokenmill up` and `tokenmill down`: the whole stack on one machine (see `tokenmill.up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

import typer


def up_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory or built-in name [default: TOKENMILL_MODEL]."),
    served_name: Optional[str] = typer.Option(None, help="Name clients use for the model [default: the model's name]."),
    device: Optional[str] = typer.Option(None, help='"cpu": one CPU worker even where GPUs are [default: one worker per visible GPU, else the CPU].'),
    gpus: Optional[int] = typer.Option(None, help="Use at most this many GPUs [default: all visible]."),
    tensor_parallel_size: Optional[int] = typer.Option(
        None, "--tensor-parallel-size", "-tp", min=1,
        help="Split the model over this many GPUs per worker (one worker per group; with --device cpu: "
             "processes) [default: TOKENMILL_TENSOR_PARALLEL_SIZE]."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    api_host: Optional[str] = typer.Option(None, help="API interface [default: TOKENMILL_API_HOST]."),
    api_port: Optional[int] = typer.Option(None, help="API port [default: TOKENMILL_API_PORT]."),
    flower: bool = typer.Option(True, "--flower/--no-flower", help="Run Flower too."),
    flower_host: Optional[str] = typer.Option(None, help="Flower interface [default: TOKENMILL_FLOWER_HOST]."),
    flower_port: Optional[int] = typer.Option(None, help="Flower port [default: TOKENMILL_FLOWER_PORT]."),
    drain_timeout: float = typer.Option(120.0, help="Seconds a stopping worker gets to finish what it holds."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start in the background, return once ready (stop with `tokenmill down`)."),
    live: bool = typer.Option(True, "--live/--no-live", help="Live status in a terminal."),
) -> None:
    """Start everything on this machine: Redis, the store, the API, workers and Flower. Ctrl-C stops it in order."""
    from rich.console import Console

    from tokenmill.settings import Settings
    from tokenmill.up import UpOptions, run_up

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if device not in (None, "cpu", "cuda"):
        raise typer.BadParameter('use "cpu" or "cuda"', param_hint="--device")
    model = model or settings.model
    opts = UpOptions(
        model=model, served_name=served_name or os.path.basename(os.path.normpath(model)),
        device=device, gpus=gpus, dtype=dtype,
        tensor_parallel_size=tensor_parallel_size or settings.tensor_parallel_size, api_host=api_host or settings.api_host,
        api_port=api_port or settings.api_port, flower=flower, flower_host=flower_host or settings.flower_host,
        flower_port=flower_port or settings.flower_port,
        # Only a Redis the user named is used; otherwise `up` runs its own (settings default to a local URL).
        redis_url=os.environ.get("TOKENMILL_REDIS_URL") or None,
        drain_timeout_s=drain_timeout, live=live)
    if detach:
        raise typer.Exit(_detach(settings))
    raise typer.Exit(run_up(settings, opts, Console()))


def _detach(settings) -> int:  # type: ignore[no-untyped-def]
    """Runs this same command in the background and waits until the stack is ready."""
    from tokenmill.data_lock import DataDirInUse, holder_pid, is_locked
    from tokenmill.up import already_running_message
    from tokenmill.up_state import read_state

    if is_locked(settings.data_dir):  # said before anything starts in the background
        refusal = DataDirInUse(settings.data_dir, holder_pid(settings.data_dir))
        typer.echo(f"error: {already_running_message(settings, refusal)}", err=True)
        return 2
    argv = [a for a in sys.argv[1:] if a not in ("--detach", "-d")] + ["--no-live"]
    log_path = settings.data_dir / "logs" / "up.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", *argv], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    typer.echo(f"starting in the background (pid {proc.pid}; log {log_path}) ...", err=True)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            typer.echo(_last_error(log_path) or f"error: tokenmill up exited with code {code}; see {log_path}", err=True)
            return code or 1
        state = read_state(settings)
        if state and state.get("pid") == proc.pid and state.get("ready"):
            _print_ready(settings, state)
            return 0
        time.sleep(0.5)
    typer.echo(f"error: not ready after 30 minutes; see {log_path}", err=True)
    return 1


def _last_error(log_path) -> str | None:  # type: ignore[no-untyped-def]
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines[-50:]):
        if "error:" in line:
            return line[line.index("error:"):]
    return None


def _print_ready(settings, state: dict) -> None:  # type: ignore[no-untyped-def]
    from tokenmill.command import activation_hint, tokenmill_command
    from tokenmill.up_state import LOCAL_TENANT, secrets_dir

    typer.echo(f"tokenmill is up (pid {state['pid']}): API {state['api_url']}"
               + (f", Flower {state['flower_url']}" if state.get("flower_url") else ""))
    d = secrets_dir(settings)
    made = state.get("first_start") or []
    shown = {"admin": ("admin key", "admin.key"), "local": (f"API key (tenant '{LOCAL_TENANT}')", "local.key"),
             "flower": (f"Flower password (user {settings.flower_user})", "flower.password")}
    for key in made:
        label, fname = shown[key]
        try:
            value = (d / fname).read_text().strip()
        except OSError:
            continue
        typer.echo(f"{label}: {value}   (first start; kept in {d / fname})")
    typer.echo(f"stop it with: {tokenmill_command()} down")
    hint = activation_hint()
    if hint:
        typer.echo(f"({hint})")


def down_command(
    timeout: float = typer.Option(300.0, help="Seconds to wait for the stack to stop."),
) -> None:
    """Stop the `tokenmill up` running with this data directory, in order (as Ctrl-C does)."""
    from tokenmill.data_lock import holder_pid, is_locked
    from tokenmill.settings import Settings
    from tokenmill.up_state import read_state

    settings = Settings.from_env()
    state = read_state(settings)
    # Without a state file (removed by hand, or not written yet), the lock's holder is the stack.
    pid = int(state["pid"]) if state else (holder_pid(settings.data_dir) if is_locked(settings.data_dir) else None)
    if pid is None:
        typer.echo(f"tokenmill up is not running (data directory {settings.data_dir})", err=True)
        raise typer.Exit(0)
    by_lock = is_locked(settings.data_dir)
    os.kill(pid, signal.SIGTERM)
    typer.echo(f"stopping tokenmill up (pid {pid}): API, then workers, then Flower and Redis ...", err=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Stopped once the data directory's lock is free: the kernel frees it when the process
        # ends (a pid can outlive it: an unreaped child, or a number used again). A stack of a
        # tokenmill that took no lock is followed by its pid.
        if not (is_locked(settings.data_dir) if by_lock else _alive(pid)):
            typer.echo("stopped")
            return
        time.sleep(0.3)
    typer.echo(f"error: still running after {timeout:.0f}s (pid {pid})", err=True)
    raise typer.Exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
