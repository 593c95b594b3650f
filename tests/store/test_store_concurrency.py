"""Concurrent writers: many threads and two processes finishing overlapping jobs count each once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import URL

from store import JobSpec, Store
from store.models import Result, Usage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_worker import record_all, tokens  # noqa: E402

WORKER = Path(__file__).resolve().parent / "record_worker.py"


def _jobs(store: Store, tenant_id: str, n: int) -> list[str]:
    return [c.id for c in store.jobs.create_jobs(tenant_id, [JobSpec(model="m", request={"i": i}) for i in range(n)])]


def _assert_counted_once(store: Store, tenant_id: str, ids: list[str], recorded_lists: list[list[str]]) -> None:
    everything = [job_id for recorded in recorded_lists for job_id in recorded]
    assert sorted(everything) == sorted(ids), "each job must be recorded by exactly one writer"
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == len(ids)
        assert s.scalar(select(func.count()).select_from(Usage)) == len(ids)
        assert s.scalar(select(func.count(func.distinct(Usage.job_id)))) == len(ids)
    total = store.usage.totals(tenant_id)
    assert total.requests == len(ids)
    assert total.prompt_tokens == sum(tokens(i)[0] for i in range(len(ids)))
    assert total.completion_tokens == sum(tokens(i)[1] for i in range(len(ids)))
    assert store.jobs.count_jobs(tenant_id, status="succeeded") == len(ids)


def test_many_threads_recording_overlapping_jobs_count_each_once(store: Store, tenant_id: str) -> None:
    ids = _jobs(store, tenant_id, 400)
    results: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(t: int) -> None:
        try:
            # Thread 0 writes every job; the others a random overlapping half each.
            keep = None if t == 0 else set(random.Random(t).sample(ids, len(ids) // 2))
            barrier.wait()
            results[t] = record_all(store, ids, seed=t, writer=f"t{t}", batch=20, keep=keep)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    _assert_counted_once(store, tenant_id, ids, results)


def test_two_processes_recording_the_same_jobs_count_each_once(
    store: Store, tenant_id: str, db_url: URL, tmp_path: Path
) -> None:
    ids = _jobs(store, tenant_id, 600)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(ids))
    url = db_url.render_as_string(hide_password=False)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, str(ids_file), str(seed), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{seed}").exists() for seed in (1, 2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both processes start writing at the same moment
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    assert all(outputs), "both processes should have recorded some jobs (they raced)"
    _assert_counted_once(store, tenant_id, ids, outputs)


def test_concurrent_creates_with_one_idempotency_key_make_one_job(store: Store, tenant_id: str) -> None:
    barrier = threading.Barrier(6)
    got: list[str] = []
    lock = threading.Lock()

    def create() -> None:
        barrier.wait()
        job = store.jobs.create_job(tenant_id, JobSpec(model="m", request={}, idempotency_key="same"))
        with lock:
            got.append(job.id)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 6 and len(set(got)) == 1
    assert store.jobs.count_jobs(tenant_id) == 1
