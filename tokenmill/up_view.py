"""What `tokenmill up` shows in a terminal: the start summary (where everything is, and the keys
made on the first start) and the live status (processes, workers, queue, jobs, tokens/s)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tokenmill.command import tokenmill_command
from tokenmill.up_state import LOCAL_TENANT, local_address, secrets_dir

_STATE_STYLE = {"ready": "green", "starting": "yellow", "backoff": "red", "failed": "bold red",
                "stopping": "yellow", "stopped": "dim"}


def render_summary(stack: Any) -> Panel:
    """The panel printed once the stack is up."""
    o, s, sec = stack.opts, stack.settings, stack.secrets
    api = f"http://{local_address(o.api_host)}:{o.api_port}"
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", o.served_name)
    t.add_row("API", f"{api}   docs {api}/docs · metrics {api}/metrics")
    if o.flower:
        t.add_row("Flower", f"http://{local_address(o.flower_host)}:{o.flower_port}   user {s.flower_user}")
    t.add_row("data", f"{s.data_dir}   logs {stack.logs}")
    d = secrets_dir(s)
    if "admin" in sec.created:
        t.add_row("admin key", Text(f"{sec.admin_key}   (first start; kept in {d / 'admin.key'})"))
    if "local" in sec.created:
        t.add_row("API key", Text(f"{sec.local_key}   (tenant '{LOCAL_TENANT}'; kept in {d / 'local.key'})"))
    if "flower" in sec.created:
        t.add_row("Flower password", Text(f"{sec.flower_password}   (kept in {d / 'flower.password'})"))
    if not sec.created:
        t.add_row("keys", f"in {d}")
    t.add_row("try", f'{tokenmill_command()} submit "Write a haiku about queues."')
    return Panel(t, title="tokenmill is up", subtitle="Ctrl-C stops it in order", border_style="green")


def render_status(stack: Any, status: dict[str, Any]) -> Group:
    """The live block under the summary, refreshed twice a second."""
    procs = Table(title="processes", title_justify="left", expand=False, box=None, padding=(0, 2))
    for col in ("name", "state", "pid", "restarts"):
        procs.add_column(col)
    for c in status["children"]:
        style = _STATE_STYLE.get(c["state"], "")
        procs.add_row(c["name"], Text(c["state"], style=style), str(c["pid"] or "-"), str(c["restarts"]))

    # The figures keep their width; a worker's name (model-device@host) takes the rest of the line
    # and folds onto the next one rather than being cut.
    workers = Table(title="workers", title_justify="left", box=None, padding=(0, 1))
    workers.add_column("worker", overflow="fold", ratio=1)
    workers.add_column("device", no_wrap=True)
    for col in ("running", "waiting", "KV blocks", "tokens/s", "peak batch"):
        workers.add_column(col, justify="right", no_wrap=True)
    for w in sorted(status["workers"], key=lambda w: w.get("hostname", "")):
        workers.add_row(w.get("hostname", "?"), w.get("device", "?"), w.get("running", "0"), w.get("waiting", "0"),
                        f"{w.get('kv_blocks_used', '0')}/{w.get('kv_blocks_total', '?')}",
                        f"{float(w.get('tokens_per_s', 0) or 0):.1f}", w.get("peak_batch_size", "0"))
    if not status["workers"]:
        workers.add_row("(none live yet)", "", "", "", "", "", "")

    q = status.get("queue") or {}
    jobs = status.get("jobs") or {}
    line = Text.assemble(
        ("queue ", "bold"), f"{q.get('name', '?')}: {q.get('interactive', '?')} interactive, {q.get('bulk', '?')} bulk   ",
        ("jobs ", "bold"), f"queued {jobs.get('queued', '?')} · running {jobs.get('running', '?')} · "
                           f"done {jobs.get('succeeded', '?')} · failed {jobs.get('failed', '?')}   ",
        ("tokens/s ", "bold"), f"{status.get('tokens_per_s', 0):.1f}")
    return Group(procs, Text(""), workers, Text(""), line)
