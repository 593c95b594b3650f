"""The soak benchmark, short: `benchmarks/soak.py --duration 45` against a real `tokenmill up`
stack (embedded Redis, SQLite, API, a CPU worker on a tiny model, Flower) under mixed interactive
and bulk load. Not a job may be lost or doubled, none may fail, and the stack must stop cleanly.
The long run (and its memory figures) is `benchmarks/soak.py --duration 600` by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hostile_fixtures import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_short_soak_loses_and_doubles_no_job(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--duration", "45", "--model",
         str(tiny_model_dir("llama")), "--batch-every", "10", "--batch-lines", "16", "--sample-every", "3",
         "--drain-timeout", "90", "--data-dir", str(tmp_path / "stack"), "--report", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    print(out.stdout[-4000:])
    assert report_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["lost"] == 0, report["lost_detail"]
    assert report["doubled"] == 0, report["doubled_detail"]
    assert report["failed"] == 0, report["by_status"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert report["jobs_done"]["interactive"] >= 20 and report["jobs_done"]["bulk"] >= 16, report["jobs_done"]
    assert report["batches"] >= 2
    assert report["jobs_in_store"] == report["by_status"]["succeeded"] == report["usage_requests"]
    assert report["latency_ms"]["chat"]["n"] > 0 and report["latency_ms"]["job"]["n"] > 0
    assert {"api", "worker", "redis", "flower", "up"} <= set(report["rss_mb"]), report["rss_mb"]
    assert not any(m["restarted"] for m in report["rss_mb"].values()), report["rss_mb"]
    assert len(report["rss_samples"]) >= 5
    assert report["stack_exit_code"] == 0, "tokenmill up did not stop cleanly"
