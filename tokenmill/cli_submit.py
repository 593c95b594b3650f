"""`tokenmill submit`: one job from the command line, its text printed when it is done."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

import typer

from tokenmill.cli_client import Api, ApiFailure, ApiKey, ApiUrl, connect, console, default_model, fail
from tokenmill.command import tokenmill_command

FINAL_JOB = {"succeeded", "failed", "cancelled", "expired"}


def submit_command(
    prompt: str = typer.Argument(..., help='The prompt ("-" reads it from standard input).'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Served model [default: the local stack's]."),
    max_tokens: int = typer.Option(256, help="Most tokens to generate."),
    # Greedy unless asked: the same question gets the same answer, and a small model sampled at a
    # higher temperature drifts into nonsense on a first try.
    temperature: float = typer.Option(0.0, help="0 picks the likeliest token every time; 0.7 or so samples."),
    raw: bool = typer.Option(False, "--raw", help="Send the text as a plain prompt, not as a chat message."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the result (else print the job id)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole job as JSON."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the result."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """Submit one job and print its text when it is done."""
    text = sys.stdin.read() if prompt == "-" else prompt
    api = connect(api_url, api_key)
    body: dict[str, Any] = {"model": default_model(model),
                            "params": {"max_tokens": max_tokens, "temperature": temperature}}
    if raw:
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    try:
        job = api.request("POST", "/v1/jobs", json=body)
        if not wait:
            typer.echo(job["id"])
            return
        job = wait_for_job(api, job["id"], timeout)
    except ApiFailure as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    elif job["status"] == "succeeded":
        typer.echo((job.get("result") or {}).get("output_text", ""))
    _job_footer(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def wait_for_job(api: Api, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Polls a job until it is final (gently: 0.1 s at first, then up to 1 s apart)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    with console().status(f"job {job_id}: queued", spinner="dots") as status:
        while True:
            job = api.request("GET", f"/v1/jobs/{job_id}")
            if job["status"] in FINAL_JOB:
                return job
            status.update(f"job {job_id}: {job['status']}")
            if time.monotonic() > deadline:
                raise ApiFailure(f"job {job_id} is still {job['status']} after {timeout_s:.0f}s; "
                                 f"follow it with `{tokenmill_command()} jobs show {job_id}`")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


def _job_footer(job: dict[str, Any]) -> None:
    usage = job.get("usage") or {}
    timings = job.get("timings") or {}
    parts = [f"{job['id']} {job['status']}"]
    if usage:
        parts.append(f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens")
    if timings:
        parts.append(f"{timings.get('total_ms', 0) / 1000:.2f}s")
    if job.get("error"):
        parts.append(f"{job['error'].get('code')}: {job['error'].get('message')}")
    typer.echo(" · ".join(parts), err=True)
