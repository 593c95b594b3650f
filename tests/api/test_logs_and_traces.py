"""An API and a worker run with TOKENMILL_LOG_FORMAT=json and an OpenTelemetry endpoint (a real
OTLP/HTTP receiver in this test, fed by the real exporters of both processes): one JSON object per
log line naming the job, tenant and worker, never a prompt or an output; and one job's trace, from
the HTTP submit through Redis to the result write, with its parent links across the processes."""

from __future__ import annotations

import gzip
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from conftest import Proc, start_server, wait_job
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from store import Store
from tokenmill.settings import Settings

TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
MODEL = "tinyobs"  # a queue of its own: only this module's worker runs its jobs


@dataclass
class Received:
    """Spans an OTLP/HTTP receiver got: (service, name, trace id, span id, parent id, start, end, attrs)."""

    spans: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def otlp_receiver(received: Received) -> ThreadingHTTPServer:
    """A minimal OTLP/HTTP trace receiver on a free port (protobuf, as the exporter sends)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
            with received.lock:
                for rs in request.resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            received.spans.append({
                                "service": service, "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None, "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "attrs": {a.key: a.value.string_value or a.value.int_value for a in s.attributes}})
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Observed:
    """What one traced job left behind."""

    job_id: str
    tenant_id: str
    hostname: str
    prompt: str
    output: str
    api_log: Path
    worker_log: Path
    spans: Received


@pytest.fixture(scope="module")
def observed(database_url: str, redis_url: str, tiny_dir: Path, redis_client: redis.Redis, store: Store,
             make_key, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observed")
    received = Received()
    receiver = otlp_receiver(received)
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    hostname = f"obs-{uuid.uuid4().hex[:6]}@logtest"
    env = {"TOKENMILL_DATABASE_URL": database_url, "TOKENMILL_REDIS_URL": redis_url, "TOKENMILL_LOG_FORMAT": "json",
           "TOKENMILL_OTEL_ENDPOINT": endpoint}
    worker = Proc([sys.executable, "-m", "tokenmill.cli", "worker", "--model", str(tiny_dir), "--served-name", MODEL,
                   "--device", "cpu", "--dtype", "float32", "--concurrency", "4", "--hostname", hostname],
                  env, tmp / "worker.log")
    server = start_server(database_url, redis_url, tiny_dir, tmp, served_models=f"{MODEL}={tiny_dir}",
                          log_format="json", otel_endpoint=endpoint)
    try:
        deadline = time.monotonic() + 180
        while not redis_client.exists(f"tokenmill:worker:{hostname}"):
            assert worker.proc.poll() is None, worker.log()
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)
        key = make_key("observed-tenant")
        tenant_id = store.keys.tenant_by_name("observed-tenant").id
        prompt = "the secret prompt zebra-quokka-7431"
        with server.client(key) as c:
            job_id = c.post("/v1/jobs", json={"model": MODEL, "prompt": prompt, "params": {"max_tokens": 12}}).json()["id"]
            job = wait_job(c, job_id)
            # The OpenAI endpoints make the same trace.
            assert c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}).status_code == 200
        assert job["status"] == "succeeded"
    finally:
        # Stopping flushes each process's batch of spans (the tracer provider's exit hook).
        server.proc.stop()
        worker.stop()
        receiver.shutdown()
    yield Observed(job_id, tenant_id, hostname, prompt, job["result"]["output_text"], server.proc.log_path,
                   worker.log_path, received)


def json_lines(path: Path) -> list[dict]:
    """The log records of a process's output (the Celery banner, printed, is not one); a record
    written as text fails the test."""
    records = []
    for line in path.read_text().splitlines():
        assert not TEXT_LOG_LINE.match(line), f"a text log line in JSON mode: {line}"
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_json_logs_name_job_tenant_and_worker_never_the_text(observed: Observed) -> None:
    o = observed
    api_records = json_lines(o.api_log)
    worker_records = json_lines(o.worker_log)
    accepted = [r for r in api_records if r.get("job_id") == o.job_id]
    assert accepted and all(r["tenant_id"] == o.tenant_id for r in accepted)
    finished = [r for r in worker_records if r.get("job_id") == o.job_id]
    assert finished, "the worker wrote no line about the job"
    # Celery's own "received" line comes before the claim: the tenant is known from then on.
    assert all(r.get("tenant_id", o.tenant_id) == o.tenant_id for r in finished)
    assert any(r.get("tenant_id") == o.tenant_id and r["message"].startswith("job succeeded") for r in finished)
    assert all(r["worker"] == o.hostname for r in worker_records)  # every line names its worker
    assert {"time", "level", "logger", "message"} <= set(finished[0])
    for path in (o.api_log, o.worker_log):
        text = path.read_text()
        assert "zebra-quokka" not in text
        if len(o.output.strip()) >= 8:
            assert o.output not in text


def test_one_job_is_one_trace_from_submit_to_result_write(observed: Observed) -> None:
    o = observed
    spans = [s for s in o.spans.spans if s["attrs"].get("tokenmill.job_id") == o.job_id]
    assert spans, f"no span names the job; received {[s['name'] for s in o.spans.spans]}"
    trace_id = spans[0]["trace"]
    mine = {s["name"]: s for s in o.spans.spans if s["trace"] == trace_id}
    assert set(mine) == {"tokenmill.submit", "tokenmill.enqueue", "tokenmill.queue", "tokenmill.run",
                         "tokenmill.claim", "tokenmill.engine", "tokenmill.first_token", "tokenmill.result_write"}

    def parent(name: str) -> str | None:
        by_id = {s["id"]: s["name"] for s in mine.values()}
        return by_id.get(mine[name]["parent"]) if mine[name]["parent"] else None

    assert parent("tokenmill.submit") is None  # the root (the client sent no traceparent)
    assert parent("tokenmill.enqueue") == "tokenmill.submit"
    assert parent("tokenmill.queue") == "tokenmill.enqueue" and parent("tokenmill.run") == "tokenmill.enqueue"
    for name in ("tokenmill.claim", "tokenmill.engine", "tokenmill.result_write"):
        assert parent(name) == "tokenmill.run", name
    assert parent("tokenmill.first_token") == "tokenmill.engine"
    assert {mine["tokenmill.submit"]["service"], mine["tokenmill.enqueue"]["service"]} == {"tokenmill-api"}
    assert mine["tokenmill.run"]["service"] == "tokenmill-worker"
    assert mine["tokenmill.run"]["attrs"]["tokenmill.worker"] == o.hostname
    # The path in order: Redis before the run, admission before the first token, the write last.
    assert mine["tokenmill.queue"]["end"] <= mine["tokenmill.run"]["start"] + 1_000_000
    engine, first = mine["tokenmill.engine"], mine["tokenmill.first_token"]
    assert engine["start"] == first["start"] < first["end"] <= engine["end"]
    assert mine["tokenmill.claim"]["end"] <= engine["start"] <= mine["tokenmill.result_write"]["start"]
    assert mine["tokenmill.result_write"]["end"] <= mine["tokenmill.run"]["end"]
    assert mine["tokenmill.engine"]["attrs"]["tokenmill.completion_tokens"] > 0
    other = [s["trace"] for s in o.spans.spans if s["name"] == "tokenmill.submit" and s["trace"] != trace_id]
    assert len(other) == 1, "the /v1/completions job made no trace of its own"
    assert {s["name"] for s in o.spans.spans if s["trace"] == other[0]} == set(mine)


def test_an_unknown_log_format_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="TOKENMILL_LOG_FORMAT='xml' is not one of text, json"):
        Settings.from_env({"HOME": "/tmp", "TOKENMILL_LOG_FORMAT": "xml"})
