"""Command-line clients of the HTTP API: `tokenmill submit`, `tokenmill jobs list|show|cancel`,
`tokenmill batch submit|status|cancel|list` and `tokenmill usage`.

They speak only HTTP (httpx) with a Bearer key, like any other client. The API's address and key
come from --api-url / --api-key, else TOKENMILL_API_URL / TOKENMILL_API_KEY, else the stack that
`tokenmill up` runs with this data directory (its state file and the key it made).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

FINAL_JOB = {"succeeded", "failed", "cancelled", "expired"}
FINAL_BATCH = {"completed", "failed", "expired", "cancelled"}

jobs_app = typer.Typer(name="jobs", help="List, show and cancel jobs.", no_args_is_help=True, add_completion=False)
batch_app = typer.Typer(name="batch", help="Bulk work: OpenAI-style batch files with progress.",
                        no_args_is_help=True, add_completion=False)

ApiUrl = typer.Option(None, "--api-url", help="The API [default: TOKENMILL_API_URL, else the one `tokenmill up` runs].")
ApiKey = typer.Option(None, "--api-key", help="Bearer key [default: TOKENMILL_API_KEY, else the local key `tokenmill up` made].")


class ApiFailure(Exception):
    """A request that did not succeed; the message is for the user."""


# -- connection -----------------------------------------------------------------------------------

class Api:
    """A thin httpx client that turns failures into one clear line."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                   headers={"Authorization": f"Bearer {key}", "User-Agent": "tokenmill-cli"})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Sends a request; returns the decoded JSON body (raises ApiFailure otherwise)."""
        try:
            resp = self.client.request(method, path, **kwargs)
        except self._httpx.ConnectError:
            raise ApiFailure(f"cannot reach the API at {self.url}: is `tokenmill up` (or `tokenmill api`) running? "
                             "Set --api-url or TOKENMILL_API_URL for another address.") from None
        except self._httpx.TimeoutException:
            raise ApiFailure(f"the API at {self.url} did not answer {method} {path} in time") from None
        if resp.status_code >= 400:
            raise ApiFailure(_error_text(resp))
        return resp.json() if resp.content else None

    def download(self, path: str, out: Path) -> int:
        """Streams a response body into ``out``; returns the bytes written."""
        written = 0
        tmp = out.with_name(out.name + ".part")
        try:
            with self.client.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiFailure(_error_text(resp))
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                        written += len(chunk)
        except self._httpx.ConnectError:
            raise ApiFailure(f"cannot reach the API at {self.url}") from None
        tmp.replace(out)
        return written


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message") or json.dumps(err)
        else:
            message = body.get("detail") if isinstance(body, dict) else str(body)
    except ValueError:
        message = resp.text[:300]
    hint = " (check --api-key / TOKENMILL_API_KEY)" if resp.status_code == 401 else ""
    return f"HTTP {resp.status_code}: {message}{hint}"


def connect(api_url: str | None, api_key: str | None) -> Api:
    """The API client for a command, from options, settings or the local `tokenmill up`."""
    from tokenmill.settings import Settings
    from tokenmill.up import read_state, secrets_dir

    settings = Settings.from_env()
    state = read_state(settings) or {}
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    url = api_url or settings.api_url or state.get("api_url") or f"http://{host}:{settings.api_port}"
    key = api_key or settings.api_key
    if not key:
        try:
            key = (secrets_dir(settings) / "local.key").read_text().strip()
        except OSError:
            key = ""
    if not key:
        _fail("no API key: set TOKENMILL_API_KEY or pass --api-key (`tokenmill up` makes a local one on its first "
              "start; `tokenmill keys create --tenant NAME` makes others)")
    return Api(url, key)


def default_model(model: str | None) -> str:
    """The model a command asks for: the option, else the running stack's, else TOKENMILL_MODEL's name."""
    import os

    from tokenmill.settings import Settings
    from tokenmill.up import read_state

    if model:
        return model
    settings = Settings.from_env()
    state = read_state(settings) or {}
    return state.get("model") or os.path.basename(os.path.normpath(settings.model))


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr)
    # Piped into a file or another program: wide lines rather than wrapped cells.
    return console if console.is_terminal else Console(stderr=stderr, width=200)


# -- tokenmill submit -----------------------------------------------------------------------------

def submit_command(
    prompt: str = typer.Argument(..., help='The prompt ("-" reads it from standard input).'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Served model [default: the local stack's]."),
    max_tokens: int = typer.Option(256, help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, help="0 for greedy decoding."),
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
        _fail(str(exc))
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
    console = _console()
    with console.status(f"job {job_id}: queued", spinner="dots") as status:
        while True:
            job = api.request("GET", f"/v1/jobs/{job_id}")
            if job["status"] in FINAL_JOB:
                return job
            status.update(f"job {job_id}: {job['status']}")
            if time.monotonic() > deadline:
                raise ApiFailure(f"job {job_id} is still {job['status']} after {timeout_s:.0f}s; "
                                 f"follow it with `tokenmill jobs show {job_id}`")
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


# -- tokenmill jobs -------------------------------------------------------------------------------

@jobs_app.command("list")
def jobs_list(
    status: Optional[list[str]] = typer.Option(None, "--status", "-s", help="Only these statuses (repeat)."),
    batch: Optional[str] = typer.Option(None, help="Only this batch's jobs."),
    limit: int = typer.Option(20, min=1, max=1000, help="How many (newest first)."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """The newest jobs of your tenant."""
    from rich.table import Table

    api = connect(api_url, api_key)
    params: list[tuple[str, Any]] = [("limit", limit)] + [("status", s) for s in status or []]
    if batch:
        params.append(("batch_id", batch))
    try:
        page = api.request("GET", "/v1/jobs", params=params)
    except ApiFailure as exc:
        _fail(str(exc))
    table = Table(box=None, padding=(0, 2))
    for col in ("id", "status", "model", "kind", "created", "finished", "error"):
        table.add_column(col)
    for j in page["data"]:
        table.add_row(j["id"], j["status"], j["model"], j["kind"], _when(j.get("created_at")),
                      _when(j.get("finished_at")), (j.get("error") or {}).get("code", ""))
    _console(stderr=False).print(table)
    if page.get("has_more"):
        typer.echo("(more: raise --limit, or filter with --status)", err=True)


@jobs_app.command("show")
def jobs_show(job_id: str = typer.Argument(..., help="The job's id."),
              api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """One job as JSON: request, status, and once final its result, usage and timings."""
    api = connect(api_url, api_key)
    try:
        job = api.request("GET", f"/v1/jobs/{job_id}")
    except ApiFailure as exc:
        _fail(str(exc))
    typer.echo(json.dumps(job, indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="The job's id."),
                api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a queued or running job (a finished one is left as it is)."""
    api = connect(api_url, api_key)
    try:
        job = api.request("DELETE", f"/v1/jobs/{job_id}")
    except ApiFailure as exc:
        _fail(str(exc))
    typer.echo(f"{job['id']} {job['status']}")


def _when(value: Any) -> str:
    if not value:
        return ""
    text = str(value).replace("T", " ")
    return text[:19]


# -- tokenmill usage ------------------------------------------------------------------------------

def usage_command(
    since: Optional[str] = typer.Option(None, help="First UTC day, YYYY-MM-DD."),
    until: Optional[str] = typer.Option(None, help="Last UTC day, YYYY-MM-DD."),
    model: Optional[str] = typer.Option(None, help="Only this model."),
    api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey,
) -> None:
    """Token usage per model and day (your tenant; all tenants with the admin key)."""
    from rich.table import Table

    api = connect(api_url, api_key)
    params: list[tuple[str, Any]] = [("group_by", "day"), ("group_by", "model")]
    for name, value in (("since", since), ("until", until), ("model", model)):
        if value:
            params.append((name, value))
    try:
        report = api.request("GET", "/v1/usage", params=params)
    except ApiFailure as exc:
        _fail(str(exc))
    table = Table(box=None, padding=(0, 2))
    for col in ("day", "model", "requests", "prompt", "cached prompt", "completion", "total"):
        table.add_column(col, justify="left" if col in ("day", "model") else "right")
    totals = [0, 0, 0, 0, 0]
    rows = sorted(report["data"], key=lambda b: (str(b.get("day") or ""), b.get("model") or ""))
    for b in rows:
        nums = [b["requests"], b["prompt_tokens"], b["cached_prompt_tokens"], b["completion_tokens"], b["total_tokens"]]
        totals = [t + n for t, n in zip(totals, nums)]
        table.add_row(str(b.get("day") or ""), b.get("model") or "", *[f"{n:,}" for n in nums])
    if len(rows) > 1:
        table.add_row("all", "", *[f"{n:,}" for n in totals], style="bold")
    if not rows:
        typer.echo("no usage recorded for this period", err=True)
        return
    _console(stderr=False).print(table)


# -- tokenmill batch ------------------------------------------------------------------------------

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
        _fail(str(exc))
    typer.echo(batch["id"])
    if wait or output is not None:
        try:
            _follow(api, batch["id"], output)
        except KeyboardInterrupt:  # before the progress bar began
            _detached_hint(batch["id"], output or Path(f"{batch['id']}.output.jsonl"))
    else:
        typer.echo(f"follow it: tokenmill batch status {batch['id']} --wait -o {batch['id']}.output.jsonl", err=True)


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
        _fail(str(exc))
    _batch_line(b)


@batch_app.command("cancel")
def batch_cancel(batch_id: str = typer.Argument(..., help="The batch's id."),
                 api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a batch: requests not started are dropped, running ones finish and are kept."""
    api = connect(api_url, api_key)
    try:
        b = api.request("POST", f"/v1/batches/{batch_id}/cancel")
    except ApiFailure as exc:
        _fail(str(exc))
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
        _fail(str(exc))
    table = Table(box=None, padding=(0, 2))
    for col in ("id", "status", "endpoint", "done", "failed", "total", "created"):
        table.add_column(col)
    for b in page["data"]:
        c = b["request_counts"]
        table.add_row(b["id"], b["status"], b["endpoint"], str(c["completed"]), str(c["failed"]), str(c["total"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"])))
    _console(stderr=False).print(table)


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
               f"  tokenmill batch status {batch_id} --wait -o {out}", err=True)
    raise typer.Exit(130)


def _follow(api: Api, batch_id: str, output: Path | None) -> None:
    """A progress bar until the batch is final, then its output (and errors) written to disk.
    Ctrl-C leaves the batch running on the server and says how to come back."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    out = output or Path(f"{batch_id}.output.jsonl")
    console = _console()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:>8.1f} tokens/s"), TimeElapsedColumn(), TextColumn("ETA"),
                      TimeRemainingColumn(), console=console, transient=False) as progress:
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
        _fail(f"{exc} (batch {batch_id} goes on; reattach with `tokenmill batch status {batch_id} --wait -o {out}`)")
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
        _fail(str(exc))
    if b["status"] != "completed":
        raise typer.Exit(1)
