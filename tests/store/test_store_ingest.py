"""Large batch files stream through upload and ingestion (the API's, api/batch_ingest.py, into the
store) with bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

from api.batch_ingest import ingest_batch
from api.config import ApiConfig
from store import Store

MB = 1_000_000


def _jsonl(total_bytes: int, lines: int) -> Iterator[bytes]:
    pad = total_bytes // lines - 170
    for i in range(lines):
        body = {"model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": "z" * pad}]}
        yield (
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()
            + b"\n"
        )


def test_a_large_file_uploads_and_ingests_in_bounded_memory(store: Store, tenant_id: str) -> None:
    size, lines = 32 * MB, 4000  # the 200 MB / 50,000-line figure is in benchmarks/store.py
    tracemalloc.start()
    try:
        file = store.files.create(tenant_id, _jsonl(size, lines), purpose="batch", filename="big.jsonl")
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        batch = store.batches.create(tenant_id, input_file_id=file.id, endpoint="/v1/chat/completions")
        report = ingest_batch(store, tenant_id, batch.id, prepare=None,
                              max_lines=ApiConfig.batch_max_lines, jobs_per_insert=250)
        _, ingest_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert file.line_count == lines and abs(file.bytes - size) < MB
    assert report.ok and report.total == lines
    assert store.jobs.count_jobs(tenant_id, batch_id=batch.id) == lines
    # Whole-file reading would need >= 32 MB; streaming holds a chunk (1 MiB) and one insert batch.
    assert upload_peak < 6 * MB, f"upload peaked at {upload_peak / MB:.1f} MB"
    assert ingest_peak < 12 * MB, f"ingestion peaked at {ingest_peak / MB:.1f} MB"
    job = store.batches.job_by_custom_id(tenant_id, batch.id, f"r{lines - 1}")
    assert job is not None and len(job.request["messages"][0]["content"]) > 7000
