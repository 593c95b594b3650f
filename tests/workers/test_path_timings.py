"""The worker's clock readings of the job path (workers.path_timings), and the dummy-weight worker
that the GPU queue-overhead benchmark runs."""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest

from contract.celery_app import send_bulk, send_job
from contract.payload import job_payload
from store.types import JobSpec
from workers.path_timings import STAGES, PathTimings, stage_deltas

MODEL = "tiny-dummy"


def test_readings_add_up_per_stage_and_deltas_cover_a_window():
    t = PathTimings()
    t.add("claim", 0.25)
    t.add("write", 1.5, count=3)
    before = {k: str(v) for k, v in t.snapshot().items()}  # as read back from Redis
    t.add("claim", 0.5)
    t.add("ack", 0.125, count=2)
    after = {k: str(v) for k, v in t.snapshot().items()}
    assert after["path.claim.n"] == "2" and float(after["path.claim.s"]) == pytest.approx(0.75)
    d = stage_deltas(before, after)
    assert set(d) == set(STAGES)
    assert d["claim"] == {"n": 1, "s": pytest.approx(0.5)}
    assert d["ack"] == {"n": 2, "s": pytest.approx(0.125)}
    assert d["write"] == {"n": 0, "s": pytest.approx(0.0)}


def test_readings_from_many_threads_are_all_counted():
    t = PathTimings()

    def work() -> None:
        for _ in range(1000):
            t.add("inbox", 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = t.snapshot()
    assert snap["path.inbox.n"] == 8000
    assert snap["path.inbox.s"] == pytest.approx(8.0)


def test_unknown_stage_is_refused():
    with pytest.raises(KeyError):
        PathTimings().add("nap", 1.0)


@pytest.fixture(scope="module")
def config_only_dir(tiny_model_dir, tmp_path_factory):
    """A model directory with a config.json and no weights: only `--load-format dummy` loads it."""
    d = tmp_path_factory.mktemp("dummy-model")
    shutil.copy(tiny_model_dir("llama") / "config.json", d / "config.json")
    return d


@pytest.mark.slow
def test_dummy_weight_worker_runs_jobs_and_publishes_where_its_time_went(
        start_worker, config_only_dir, store, celery_app, redis_client):
    worker = start_worker(config_only_dir, MODEL, extra_args=["--load-format", "dummy"])
    tenant = store.keys.create_tenant(f"t-{random.randrange(10**9)}")
    rng = random.Random(3)
    payloads = [job_payload(prompt=[rng.randrange(3, 1000) for _ in range(rng.randint(4, 30))],
                            params={"max_tokens": rng.randint(2, 8), "temperature": 0, "ignore_eos": True})
                for _ in range(90)]
    ids = [c.id for c in store.jobs.create_jobs(tenant.id, [JobSpec(model=MODEL, request=p) for p in payloads])]
    for i in ids[:20]:
        send_job(celery_app, i, MODEL)
    send_bulk(celery_app, ids[20:], MODEL)  # 70 jobs: two bulk tasks (64 + 6)
    tasks, jobs = 20 + 2, 90

    deadline = time.monotonic() + 180
    while store.jobs.count_jobs(tenant.id, status="succeeded") < jobs:
        assert time.monotonic() < deadline, "the jobs did not finish"
        time.sleep(0.2)
    assert store.usage.totals(tenant.id).completion_tokens == sum(p["params"]["max_tokens"] for p in payloads)

    # The figures are published about once a second; the acknowledgements come last.
    key = f"tokenmill:worker:{worker.hostname}"
    deadline = time.monotonic() + 20
    while True:
        figures = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
        if float(figures.get("path.ack.n", 0)) >= float(figures.get("path.delivery.n", 0)) >= tasks \
                or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    d = stage_deltas({}, figures)
    # Should a copy of a task be delivered (a redelivery), it is run (it waits for the original) and
    # acknowledged, but claims nothing.
    assert d["claim"]["n"] == tasks
    assert d["delivery"]["n"] == d["task"]["n"] == d["ack"]["n"] >= tasks
    for stage in ("inbox", "engine", "handoff", "write"):
        assert d[stage]["n"] == jobs, (stage, d[stage])
    assert 1 <= d["write_txn"]["n"] <= jobs
    assert d["loop_step"]["n"] == float(figures["steps"]) > 0
    assert d["loop_inbox"]["n"] >= 1 and d["loop_idle"]["n"] >= 1
    assert all(s["s"] >= 0 for s in d.values())
    # A job's engine time is part of its task's time, which holds the claim too.
    assert 0 < d["engine"]["s"] and d["claim"]["s"] < d["task"]["s"]
