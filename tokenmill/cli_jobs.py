"""`tokenmill jobs list|show|cancel`: your tenant's jobs from the command line."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from tokenmill.cli_client import ApiFailure, ApiKey, ApiUrl, connect, console, fail

jobs_app = typer.Typer(name="jobs", help="List, show and cancel jobs.", no_args_is_help=True, add_completion=False)


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
        fail(str(exc))
    table = Table(box=None, padding=(0, 2))
    for col in ("id", "status", "model", "kind", "created", "finished", "error"):
        table.add_column(col)
    for j in page["data"]:
        table.add_row(j["id"], j["status"], j["model"], j["kind"], _when(j.get("created_at")),
                      _when(j.get("finished_at")), (j.get("error") or {}).get("code", ""))
    console(stderr=False).print(table)
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
        fail(str(exc))
    typer.echo(json.dumps(job, indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="The job's id."),
                api_url: Optional[str] = ApiUrl, api_key: Optional[str] = ApiKey) -> None:
    """Cancel a queued or running job (a finished one is left as it is)."""
    api = connect(api_url, api_key)
    try:
        job = api.request("DELETE", f"/v1/jobs/{job_id}")
    except ApiFailure as exc:
        fail(str(exc))
    typer.echo(f"{job['id']} {job['status']}")


def _when(value: Any) -> str:
    if not value:
        return ""
    text = str(value).replace("T", " ")
    return text[:19]
