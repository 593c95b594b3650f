"""`tokenmill batch submit|status|cancel|list`: bulk work as OpenAI-style batch files, with a
progress bar until the output is written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from tokenmill.cli_client import Api, ApiFailure, ApiKey, ApiUrl, connect, console, fail
from tokenmill.command import tokenmill_command

FINAL_BATCH = {"completed", "failed", "expired", "cancelled"}

batch_app = typer.Typer(name="batch", help="Bulk work: OpenAI-style batch files with progress.",
                        no_args_is_help=True, add_completion=False)


def batch_endpoint(path: Path) -> str:
    """The endpoint an OpenAI batch file's requests name (its first request's ``url``)."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    first = json.loads(line)
                except ValueError:
                    raise ApiFailure(f"{path}, line {n}: not JSON") from None
                url = first.get("url") if isinstance(first, dict) else None
                if not url or "body" not in first:
                    raise ApiFailure(f"{path} is not a batch file: each line is one request, "
                                     '{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}')
                return str(url)
    except OSError as exc:
        raise ApiFailure(f"cannot read {path}: {exc.strerror}") from None
    raise ApiFailure(f"{path} is empty")


@batch_app.command("submit")
def batch_submit(
    file: Path = typer.Argument(..., help="OpenAI batch input file (JSONL)."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Show progress until done, then write the output."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the output goes (implies --wait)."),
    endpoint: Optional[str] = typer.Option(None, help="/v1/chat/completions or /v1/completions [default: the file's]."),
    completion_window: str = typer.Option("24h", help="Hours the batch may take, like 24h."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """Upload a batch file, create the batch, and (with --wait or -o) follow it to the end."""
    api = connect(api_url, api_key)
    try:
        endpoint = endpoint or batch_endpoint(file)
        with open(file, "rb") as f:
            uploaded = api.request("POST", "/v1/files", files={"file": (file.name, f, "application/jsonl")},
                                   data={"purpose": "batch"})
        batch = api.request("POST", "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint,
                                                        "completion_window": completion_window})
    except ApiFailure as exc:
        fail(str(exc))
    typer.echo(batch["id"])
    if wait or output is not None:
        try:
            _follow(api, batch["id"], output)
        except KeyboardInterrupt:  # before the progress bar began
            _detached_hint(batch["id"], output or Path(f"{batch['id']}.output.jsonl"))
    else:
        typer.echo(f"follow it: {tokenmill_command()} batch status {batch['id']} --wait -o {batch['id']}.output.jsonl",
                   err=True)


@batch_app.command("status")
def batch_status(
    batch_id: str = typer.Argument(..., help="The batch's id."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Show progress until done, then write the output."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the output goes (implies --wait)."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """A batch's status and counts; with --wait, follow it (this is also how to reattach)."""
    api = connect(api_url, api_key)
    if wait or output is not None:
        _follow(api, batch_id, output)
        return
    try:
        b = api.request("GET", f"/v1/batches/{batch_id}")
    except ApiFailure as exc:
        fail(str(exc))
    _batch_line(b)


@batch_app.command("cancel")
def batch_cancel(batch_id: str = typer.Argument(..., help="The batch's id."),
                 api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a batch: requests not started are dropped, running ones finish and are kept."""
    api = connect(api_url, api_key)
    try:
        b = api.request("POST", f"/v1/batches/{batch_id}/cancel")
    except ApiFailure as exc:
        fail(str(exc))
    _batch_line(b)


@batch_app.command("list")
def batch_list(limit: int = typer.Option(20, min=1, max=100, help="How many (newest first)."),
               api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Your tenant's batches, newest first."""
    from rich.table import Table

    api = connect(api_url, api_key)
    try:
        page = api.request("GET", "/v1/batches", params={"limit": limit})
    except ApiFailure as exc:
        fail(str(exc))
    table = Table(box=None, padding=(0, 2))
    for col in ("id", "status", "endpoint", "done", "failed", "total", "created"):
        table.add_column(col)
    for b in page["data"]:
        c = b["request_counts"]
        table.add_row(b["id"], b["status"], b["endpoint"], str(c["completed"]), str(c["failed"]), str(c["total"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"])))
    console(stderr=False).print(table)


def _batch_line(b: dict[str, Any]) -> None:
    c = b["request_counts"]
    usage = b.get("usage") or {}
    typer.echo(f"{b['id']} {b['status']}: {c['completed']} completed, {c['failed']} failed of {c['total']} · "
               f"{usage.get('input_tokens', 0)} prompt + {usage.get('output_tokens', 0)} completion tokens")
    if b.get("output_file_id"):
        typer.echo(f"output file {b['output_file_id']}" + (f", errors file {b['error_file_id']}"
                                                            if b.get("error_file_id") else ""))
    for e in ((b.get("errors") or {}).get("data") or [])[:10]:
        typer.echo(f"  line {e.get('line')}: {e.get('code')}: {e.get('message')}", err=True)


def _detached_hint(batch_id: str, out: Path) -> None:
    typer.echo(f"\nstopped watching; batch {batch_id} keeps running on the server. Reattach with:\n"
               f"  {tokenmill_command()} batch status {batch_id} --wait -o {out}", err=True)
    raise typer.Exit(130)


def _follow(api: Api, batch_id: str, output: Path | None) -> None:
    """A progress bar until the batch is final, then its output (and errors) written to disk.
    Ctrl-C leaves the batch running on the server and says how to come back."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    out = output or Path(f"{batch_id}.output.jsonl")
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:>8.1f} tokens/s"), TimeElapsedColumn(), TextColumn("ETA"),
                      TimeRemainingColumn(), console=console(), transient=False) as progress:
            task = progress.add_task(batch_id, total=None, rate=0.0)
            samples: list[tuple[float, int]] = []
            while True:
                b = api.request("GET", f"/v1/batches/{batch_id}")
                c = b["request_counts"]
                now, tokens = time.monotonic(), int((b.get("usage") or {}).get("output_tokens", 0))
                samples = [s for s in samples if now - s[0] <= 10.0] + [(now, tokens)]
                rate = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) if len(samples) > 1 else 0.0
                progress.update(task, total=c["total"] or None, completed=c["completed"] + c["failed"],
                                description=f"{batch_id} {b['status']}", rate=max(rate, 0.0))
                if b["status"] in FINAL_BATCH:
                    break
                time.sleep(1.0)
    except KeyboardInterrupt:
        _detached_hint(batch_id, out)
    except ApiFailure as exc:
        fail(f"{exc} (batch {batch_id} goes on; reattach with "
             f"`{tokenmill_command()} batch status {batch_id} --wait -o {out}`)")
    _batch_line(b)
    try:
        if b.get("output_file_id"):
            n = api.download(f"/v1/files/{b['output_file_id']}/content", out)
            typer.echo(f"wrote {out} ({n} bytes)", err=True)
        if b.get("error_file_id"):
            err_out = out.with_name(out.stem + ".errors" + (out.suffix or ".jsonl"))
            n = api.download(f"/v1/files/{b['error_file_id']}/content", err_out)
            typer.echo(f"wrote {err_out} ({n} bytes): requests that failed", err=True)
    except ApiFailure as exc:
        fail(str(exc))
    if b["status"] != "completed":
        raise typer.Exit(1)
