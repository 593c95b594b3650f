"""`tokenmill usage`: token usage per model and day, from the command line."""

from __future__ import annotations

from typing import Any, Optional

import typer

from tokenmill.cli_client import ApiFailure, ApiKey, ApiUrl, connect, console, fail


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
        fail(str(exc))
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
    console(stderr=False).print(table)
