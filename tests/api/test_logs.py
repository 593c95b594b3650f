"""TOKENMILL_LOG_FORMAT=json: the API and a worker write one JSON object per log line, naming the
job, tenant and worker, and never a prompt or an output."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from conftest import Proc, start_server, wait_job

from store import Store
from tokenmill.settings import Settings

TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def json_lines(path: Path) -> list[dict]:
    """The log records of a process's output (the Celery banner, printed, is not one); a record
    written as text fails the test."""
    records = []
    for line in path.read_text().splitlines():
        assert not TEXT_LOG_LINE.match(line), f"a text log line in JSON mode: {line}"
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_json_logs_name_job_tenant_and_worker_never_the_text(database_url: str, redis_url: str, tiny_dir: Path,
                                                             redis_client: redis.Redis, store: Store,
                                                             make_key, tmp_path: Path) -> None:
    model = "tinyjson"  # a queue of its own: only this worker runs the job
    hostname = f"json-{uuid.uuid4().hex[:6]}@logtest"
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url, "TOKENMILL_LOG_FORMAT": "json"}
    worker = Proc([sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(tiny_dir), "--served-name", model,
                   "--device", "cpu", "--dtype", "float32", "--concurrency", "4", "--hostname", hostname],
                  env, tmp_path / "worker.log")
    server = start_server(database_url, redis_url, tiny_dir, tmp_path, served_models=f"{model}={tiny_dir}",
                          log_format="json")
    try:
        deadline = time.monotonic() + 180
        while not redis_client.exists(f"tokenmill:worker:{hostname}"):
            assert worker.proc.poll() is None, worker.log()
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)
        key = make_key("logs-tenant")
        tenant_id = store.keys.tenant_by_name("logs-tenant").id
        prompt = "the secret prompt zebra-quokka-7431"
        with server.client(key) as c:
            job_id = c.post("/v1/jobs", json={"model": model, "prompt": prompt, "params": {"max_tokens": 12}}).json()["id"]
            job = wait_job(c, job_id)
        assert job["status"] == "succeeded"
        output = job["result"]["output_text"]
    finally:
        server.proc.stop()
        worker.stop()
    api_records = json_lines(server.proc.log_path)
    worker_records = json_lines(worker.log_path)
    accepted = [r for r in api_records if r.get("job_id") == job_id]
    assert accepted and all(r["tenant_id"] == tenant_id for r in accepted)
    finished = [r for r in worker_records if r.get("job_id") == job_id]
    assert finished, "the worker wrote no line about the job"
    # Celery's own "received" line comes before the claim: the tenant is known from then on.
    assert all(r.get("tenant_id", tenant_id) == tenant_id for r in finished)
    assert any(r.get("tenant_id") == tenant_id and r["message"].startswith("job succeeded") for r in finished)
    assert all(r["worker"] == hostname for r in worker_records)  # every line names its worker
    assert {"time", "level", "logger", "message"} <= set(finished[0])
    for path in (server.proc.log_path, worker.log_path):
        text = path.read_text()
        assert "zebra-quokka" not in text
        if len(output.strip()) >= 8:
            assert output not in text


def test_an_unknown_log_format_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="TOKENMILL_LOG_FORMAT='xml' is not one of text, json"):
        Settings.from_env({"HOME": "/tmp", "TOKENMILL_LOG_FORMAT": "xml"})
