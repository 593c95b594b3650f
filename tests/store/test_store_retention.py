"""Retention: finished jobs, batches and files past a tenant's retention are purged in small
transactions; usage is kept, folded per hour, so every usage total is the same before and after."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import func, select, update

from store import FinishedJob, JobSpec, Store
from store.models import Batch, File, Job, Result, Usage, UsageHourly
from store.sql import utcnow

GROUPINGS: list[tuple[str, ...]] = [(), ("model",), ("api_key",), ("day",), ("hour",), ("model", "api_key", "hour")]


def _finish(store: Store, tenant_id: str, model: str, key_id: str | None, prompt: int, completion: int,
            *, day: date, hour: int) -> str:
    job_id = store.jobs.create_job(tenant_id, JobSpec(model=model, request={"prompt": "p"}, api_key_id=key_id)).id
    store.jobs.mark_running([job_id], "w")
    assert store.jobs.record_results([FinishedJob(job_id, "x", "length", prompt_tokens=prompt,
                                                  completion_tokens=completion, cached_prompt_tokens=1)]).recorded
    with store.db.write() as s:  # as if it ran then (the store stamps "now")
        s.execute(update(Usage).where(Usage.job_id == job_id).values(day=day, hour=hour))
    return job_id


def _age(store: Store, days: int, *job_ids: str) -> None:
    when = utcnow() - timedelta(days=days)
    with store.db.write() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(created_at=when, finished_at=when))


def _totals(store: Store, tenant_id: str) -> list[list[object]]:
    out = []
    for group_by in GROUPINGS:
        out.append([(b.model, b.api_key_id, b.day, b.hour, b.requests, b.prompt_tokens, b.cached_prompt_tokens,
                     b.completion_tokens) for b in store.usage.summary(tenant_id, group_by=group_by)])
    out.append([store.usage.summary(None, group_by=("tenant",))])
    return out


def test_purge_removes_old_finished_work_and_keeps_every_usage_total(store: Store, tenant_id: str,
                                                                     other_tenant_id: str) -> None:
    k1, _ = store.keys.create_key(tenant_id, "one")
    d1, d2 = date(2026, 10, 1), date(2026, 10, 2)
    old = [_finish(store, tenant_id, "small", k1.id, 10, 1, day=d1, hour=9),
           _finish(store, tenant_id, "small", k1.id, 20, 2, day=d1, hour=9),
           _finish(store, tenant_id, "large", None, 30, 3, day=d2, hour=23)]
    recent = _finish(store, tenant_id, "small", k1.id, 40, 4, day=d2, hour=9)
    _age(store, 40, *old)
    other = _finish(store, other_tenant_id, "small", None, 50, 5, day=d1, hour=9)
    _age(store, 40, other)
    store.limits.set_retention(other_tenant_id, 60)  # its own retention: kept
    still_open = store.jobs.create_job(tenant_id, JobSpec(model="small", request={"prompt": "p"})).id
    with store.db.write() as s:
        s.execute(update(Job).where(Job.id == still_open).values(created_at=utcnow() - timedelta(days=90)))
    old_file = store.files.create(tenant_id, [b"{}\n"], purpose="batch", filename="old.jsonl")
    new_file = store.files.create(tenant_id, [b"{}\n"], purpose="batch", filename="new.jsonl")
    with store.db.write() as s:
        s.execute(update(File).where(File.id == old_file.id).values(created_at=utcnow() - timedelta(days=31)))
    before = _totals(store, tenant_id)

    report = store.retention.purge(30)

    assert report.jobs == 3 and report.files == 1 and report.usage_rows_folded == 3
    assert _totals(store, tenant_id) == before
    assert store.jobs.get_job(tenant_id, old[0]) is None and store.jobs.get_result(tenant_id, old[0]) is None
    assert store.jobs.get_job(tenant_id, recent) is not None
    assert store.jobs.get_job(tenant_id, still_open) is not None  # open work is never purged
    assert store.jobs.get_job(other_tenant_id, other) is not None
    assert store.files.get(tenant_id, old_file.id) is None and store.files.get(tenant_id, new_file.id) is not None
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Result).where(Result.job_id.in_(old))) == 0
        # Two old jobs shared an hour, key and model: three rows became two hourly sums.
        assert s.scalar(select(func.count()).select_from(UsageHourly)) == 2
    # The budget counters start from the same sums.
    assert store.limits.spent_tokens(tenant_id, since=d1) == 11 + 22 + 33 + 44
    assert store.retention.purge(30).jobs == 0  # nothing left to do: a second run is a no-op
    assert _totals(store, tenant_id) == before


def test_purge_removes_a_finished_batch_with_its_jobs_and_files(store: Store, tenant_id: str) -> None:
    infile = store.files.create(tenant_id, [b'{"custom_id": "a"}\n'], purpose="batch", filename="in.jsonl")
    batch = store.batches.create(tenant_id, input_file_id=infile.id, endpoint="/v1/completions",
                                 completion_window="24h")
    store.batches.start_ingest(tenant_id, batch.id)
    from store import batch_job_id

    ids = [batch_job_id(batch.id, i) for i in range(3)]
    store.batches.add_jobs(tenant_id, batch.id, [JobSpec(id=i, model="m", request={"prompt": "p"}, kind="bulk",
                                                         batch_id=batch.id, custom_id=f"c{n}")
                                                 for n, i in enumerate(ids)])
    store.batches.finish_ingest(tenant_id, batch.id, total=3, errors=[])
    store.jobs.mark_running(ids, "w")
    store.jobs.record_results([FinishedJob(i, "x", "stop", prompt_tokens=3, completion_tokens=2,
                                           cached_prompt_tokens=0) for i in ids])
    store.batches.advance(tenant_id, batch.id)
    out = store.files.create(tenant_id, [b"out\n"], purpose="batch_output", filename="out.jsonl")
    store.batches.transition(tenant_id, batch.id, "completed", output_file_id=out.id, error_file_id=None)
    before = _totals(store, tenant_id)
    long_ago = utcnow() - timedelta(days=45)
    with store.db.write() as s:
        s.execute(update(Batch).where(Batch.id == batch.id).values(completed_at=long_ago, created_at=long_ago))
        s.execute(update(File).where(File.tenant_id == tenant_id).values(created_at=long_ago))

    report = store.retention.purge(30)

    assert (report.batches, report.jobs, report.files) == (1, 3, 2)
    assert store.batches.get(tenant_id, batch.id) is None
    assert store.files.get(tenant_id, out.id) is None and store.files.get(tenant_id, infile.id) is None
    assert _totals(store, tenant_id) == before
