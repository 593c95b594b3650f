"""Store throughput: rows per second for the hot paths, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/store.py                    # both backends, 20,000 jobs, batches of 500
    .venv/bin/python benchmarks/store.py --jobs 50000 --batch 1000 --backends postgresql
    .venv/bin/python benchmarks/store.py --ingest-mb 200 --ingest-lines 50000   # large batch file

Each backend gets a fresh database (a temporary SQLite file; a throwaway PostgreSQL database,
dropped afterwards) migrated with Alembic, as in production. Phases, each in batches:
``create`` (insert queued jobs), ``claim`` (mark them running), ``record`` (finished jobs with
result and usage, the worker's write path). ``--ingest-mb`` adds a batch-file upload and ingestion,
with the Python heap's peak as tracemalloc sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402

from api.batch_ingest import ingest_batch  # noqa: E402
from api.config import ApiConfig  # noqa: E402
from store import FinishedJob, JobSpec, Store  # noqa: E402
from store.migrate import upgrade  # noqa: E402

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _timed(label: str, n: int, batches: list[list], call: Callable[[list], object]) -> tuple[str, int, float]:
    start = time.perf_counter()
    for batch in batches:
        call(batch)
    return label, n, time.perf_counter() - start


def run_backend(url: URL, jobs: int, batch: int) -> list[tuple[str, int, float]]:
    """Runs the three phases on a migrated, empty database; returns (phase, rows, seconds)."""
    upgrade(url)
    store = Store.open(url)
    try:
        tenant = store.keys.create_tenant("bench").id
        key, _ = store.keys.create_key(tenant)
        request = {"prompt": "Write a haiku about queues.", "max_tokens": 64, "temperature": 0.7}
        specs = [JobSpec(model="smollm2-135m-instruct", request=request, api_key_id=key.id) for _ in range(jobs)]
        spec_batches = [specs[i : i + batch] for i in range(0, jobs, batch)]
        ids: list[str] = []
        rows = [
            _timed(
                "create jobs", jobs, spec_batches, lambda b: ids.extend(c.id for c in store.jobs.create_jobs(tenant, b))
            )
        ]
        id_batches = [ids[i : i + batch] for i in range(0, jobs, batch)]
        rows.append(
            _timed("claim (mark running)", jobs, id_batches, lambda b: store.jobs.mark_running(b, "bench-worker"))
        )
        finished = [
            FinishedJob(
                job_id=j,
                output_text="Tasks wait in line / a worker takes the next one / the queue breathes again",
                finish_reason="stop",
                prompt_tokens=24,
                completion_tokens=20,
                cached_prompt_tokens=16,
                queue_ms=3.2,
                ttft_ms=12.5,
                total_ms=180.0,
                worker="bench-worker",
                device="cuda:0",
            )
            for j in ids
        ]
        done_batches = [finished[i : i + batch] for i in range(0, jobs, batch)]
        rows.append(_timed("record finished + usage", jobs, done_batches, store.jobs.record_results))
        total = store.usage.totals(tenant)
        assert total.requests == jobs and total.completion_tokens == 20 * jobs, "usage does not add up"
        return rows
    finally:
        store.close()


def _batch_file(megabytes: int, lines: int) -> Iterator[bytes]:
    pad = max(megabytes * 1_000_000 // lines - 160, 1)
    for i in range(lines):
        body = {"model": "smollm2-135m-instruct", "max_tokens": 16, "prompt": "x" * pad}
        item = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body}
        yield json.dumps(item).encode() + b"\n"


def run_ingest(url: URL, megabytes: int, lines: int) -> list[tuple[str, int, float]]:
    """Uploads a generated batch file and ingests it into jobs, tracing the Python heap's peak."""
    upgrade(url)
    store = Store.open(url)
    try:
        tenant = store.keys.create_tenant("bench-ingest").id
        tracemalloc.start()
        start = time.perf_counter()
        file = store.files.create(tenant, _batch_file(megabytes, lines), purpose="batch", filename="big.jsonl")
        upload_s = time.perf_counter() - start
        batch = store.batches.create(tenant, input_file_id=file.id, endpoint="/v1/completions")
        start = time.perf_counter()
        # The batch-line rules without the body check (which needs a served model).
        report = ingest_batch(store, tenant, batch.id, prepare=None, max_lines=max(lines, ApiConfig.batch_max_lines))
        ingest_s = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.ok and report.total == lines, report.errors[:3]
        print(f"  file {file.bytes / 1e6:.0f} MB, {file.line_count} lines; Python heap peak {peak / 2**20:.1f} MiB")
        return [
            ("upload file (MB, MB/s)", file.bytes // 1_000_000, upload_s),
            ("ingest lines -> jobs", lines, ingest_s),
        ]
    finally:
        store.close()


class _PgDatabase:
    """A throwaway PostgreSQL database (created on enter, dropped on exit)."""

    def __init__(self, admin_url: str) -> None:
        self.admin = create_engine(
            make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
        )
        self.name = f"tokenmill_bench_{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> URL:
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self.admin.url.set(database=self.name)

    def __exit__(self, *exc: object) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def main() -> None:
    """Parses the arguments, runs the phases on each backend and prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="an admin URL of the PostgreSQL server")
    parser.add_argument("--ingest-mb", type=int, default=0, help="also ingest a batch file of this many MB")
    parser.add_argument("--ingest-lines", type=int, default=50_000)
    args = parser.parse_args()

    table: list[tuple[str, str, int, float]] = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            pg = _PgDatabase(args.pg_url) if backend == "postgresql" else None
            url = pg.__enter__() if pg else make_url(f"sqlite:///{tmp}/bench.db")
            try:
                print(f"{backend}: {args.jobs} jobs in batches of {args.batch} ...", flush=True)
                table += [(backend, *row) for row in run_backend(url, args.jobs, args.batch)]
            finally:
                if pg:
                    pg.__exit__()
            if args.ingest_mb:
                pg = _PgDatabase(args.pg_url) if backend == "postgresql" else None
                url = pg.__enter__() if pg else make_url(f"sqlite:///{tmp}/ingest.db")
                try:
                    print(f"{backend}: ingest {args.ingest_mb} MB / {args.ingest_lines} lines ...", flush=True)
                    table += [(backend, *row) for row in run_ingest(url, args.ingest_mb, args.ingest_lines)]
                finally:
                    if pg:
                        pg.__exit__()

    print()
    print(f"| {'backend':<10} | {'phase':<28} | {'rows':>8} | {'seconds':>8} | {'rows/s':>9} |")
    print(f"|{'-' * 12}|{'-' * 30}|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|")
    for backend, phase, n, seconds in table:
        print(f"| {backend:<10} | {phase:<28} | {n:>8} | {seconds:>8.2f} | {n / seconds:>9,.0f} |")


if __name__ == "__main__":
    main()
