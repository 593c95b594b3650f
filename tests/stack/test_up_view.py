"""The live view of `tokenmill up` in a narrow (80-column) terminal: a worker's full name is shown
(folded onto the next lines when it is long), never cut."""

from __future__ import annotations

import io

from rich.console import Console

from tokenmill.up_view import render_status

HOSTNAME = "smollm2-135m-instruct-cpu@a-rather-long-hostname.example.org"


def test_the_worker_name_is_shown_in_full_at_80_columns() -> None:
    status = {"children": [{"name": "worker-cpu", "state": "ready", "pid": 4242, "restarts": 0}],
              "workers": [{"hostname": HOSTNAME, "device": "cpu", "running": "3", "waiting": "1",
                           "kv_blocks_used": "12", "kv_blocks_total": "4096", "tokens_per_s": "123.4",
                           "peak_batch_size": "8"}],
              "queue": {"name": "tokenmill.smollm2-135m-instruct", "interactive": 0, "bulk": 0},
              "jobs": {"queued": 0, "running": 3, "succeeded": 10, "failed": 0}, "tokens_per_s": 123.4}
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render_status(None, status))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = lines[lines.index(next(x for x in lines if x.split()[:1] == ["worker"])) + 1:]
    name = ""
    for line in rows:
        if not line.strip():
            break
        name += line.split()[0]
    assert name == HOSTNAME, "\n".join(lines)
    assert "123.4" in rows[0] and "12/4096" in rows[0]
