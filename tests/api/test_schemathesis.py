"""schemathesis over the live server's OpenAPI schema: zero server errors (5xx) and zero schema
violations. Its settings are in tests/api/schemathesis.toml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, Server, wait_job

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_and_no_schema_violations(server: Server, key: str,
                                                                      tmp_path: Path) -> None:
    with server.client(key) as c:
        job = c.post("/v1/jobs", json={"model": TINY, "prompt": "x", "params": {"max_tokens": 2}}).json()
        wait_job(c, job["id"])
        line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
                "body": {"model": TINY, "prompt": "x", "max_tokens": 2}}
        f = c.post("/v1/files", files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
                   data={"purpose": "batch"}).json()
        batch = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions"}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/v1/batches/{batch['id']}").json()["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.2)
    ids = {"TOKENMILL_ST_JOB_ID": job["id"], "TOKENMILL_ST_FILE_ID": f["id"], "TOKENMILL_ST_BATCH_ID": batch["id"]}
    cli = Path(sys.executable).with_name("schemathesis")
    out = subprocess.run(
        [str(cli), "--config-file", str(HERE / "schemathesis.toml"), "--no-color", "run",
         f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {key}", "--report", "junit",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1", **ids})
    (tmp_path / "schemathesis.txt").write_text(out.stdout + out.stderr)
    report = out.stdout[-12000:] + out.stderr[-3000:]
    print(report)
    assert out.returncode == 0, report
