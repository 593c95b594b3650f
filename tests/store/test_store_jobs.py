"""Jobs: creation, idempotency, listing, worker claims, finishing and failing in bulk."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from store import FinishedJob, JobFailure, JobSpec, Store
from store.models import Job, Result, Usage


def spec(n: int = 0, **kw) -> JobSpec:  # type: ignore[no-untyped-def]
    return JobSpec(model=kw.pop("model", "smollm2"), request={"prompt": f"hello {n}", "max_tokens": 8}, **kw)


def finished(job_id: str, prompt: int = 5, completion: int = 7, **kw) -> FinishedJob:  # type: ignore[no-untyped-def]
    return FinishedJob(
        job_id=job_id,
        output_text=f"out {job_id}",
        finish_reason="stop",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=2,
        queue_ms=1.5,
        ttft_ms=3.0,
        total_ms=9.0,
        worker="w1",
        device="cpu",
        **kw,
    )


def test_created_jobs_are_queued_and_keep_their_request(store: Store, tenant_id: str) -> None:
    created = store.jobs.create_jobs(tenant_id, [spec(i, priority=i) for i in range(3)])
    assert [c.created for c in created] == [True] * 3
    assert all(c.id.startswith("job_") for c in created)
    job = store.jobs.get_job(tenant_id, created[2].id)
    assert job is not None
    assert (job.status, job.attempts, job.priority, job.kind) == ("queued", 0, 2, "interactive")
    assert job.request == {"prompt": "hello 2", "max_tokens": 8}
    assert job.created_at.tzinfo is not None
    assert abs(job.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_a_given_job_id_is_kept(store: Store, tenant_id: str) -> None:
    created = store.jobs.create_job(tenant_id, spec(id="job_from_celery"))
    assert created.id == "job_from_celery"
    assert store.jobs.get_job(tenant_id, "job_from_celery") is not None


def test_same_idempotency_key_returns_the_existing_job(store: Store, tenant_id: str, other_tenant_id: str) -> None:
    first = store.jobs.create_job(tenant_id, spec(1, idempotency_key="k1"))
    again = store.jobs.create_job(tenant_id, spec(2, idempotency_key="k1"))
    assert first.created and not again.created and again.id == first.id
    assert store.jobs.get_job(tenant_id, first.id).request["prompt"] == "hello 1"  # type: ignore[union-attr]

    in_one_call = store.jobs.create_jobs(
        tenant_id,
        [spec(3, idempotency_key="k2"), spec(4), spec(5, idempotency_key="k2"), spec(6, idempotency_key="k1")],
    )
    assert [c.created for c in in_one_call] == [True, True, False, False]
    assert in_one_call[0].id == in_one_call[2].id and in_one_call[3].id == first.id

    theirs = store.jobs.create_job(other_tenant_id, spec(7, idempotency_key="k1"))
    assert theirs.created and theirs.id != first.id
    assert store.jobs.count_jobs(tenant_id) == 3


def test_invalid_specs_are_rejected_with_a_reason(store: Store, tenant_id: str) -> None:
    with pytest.raises(ValueError, match="kind 'urgent' is not one of interactive, bulk"):
        store.jobs.create_jobs(tenant_id, [spec(kind="urgent")])
    with pytest.raises(ValueError, match="needs a model"):
        store.jobs.create_jobs(tenant_id, [spec(model="")])
    assert store.jobs.count_jobs(tenant_id) == 0


def test_list_jobs_pages_newest_first_and_filters(store: Store, tenant_id: str) -> None:
    ids = [c.id for c in store.jobs.create_jobs(tenant_id, [spec(i) for i in range(7)])]
    later = [c.id for c in store.jobs.create_jobs(tenant_id, [spec(i) for i in range(3)])]
    seen: list[str] = []
    cursor = None
    while True:
        page = store.jobs.list_jobs(tenant_id, limit=4, cursor=cursor)
        seen += [j.id for j in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == 10 and len(set(seen)) == 10
    assert set(seen[:3]) == set(later)  # newest first
    assert seen[3:] == sorted(ids, reverse=True)  # same creation time: id order

    store.jobs.mark_running(ids[:2], "w")
    assert {j.id for j in store.jobs.list_jobs(tenant_id, status="running").jobs} == set(ids[:2])
    assert store.jobs.count_jobs(tenant_id, status=["running", "queued"]) == 10
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert store.jobs.list_jobs(tenant_id, since=future).jobs == []


def test_list_jobs_rejects_bad_arguments(store: Store, tenant_id: str) -> None:
    with pytest.raises(ValueError, match="unknown job status 'done'"):
        store.jobs.list_jobs(tenant_id, status="done")
    with pytest.raises(ValueError, match="invalid cursor"):
        store.jobs.list_jobs(tenant_id, cursor="not-a-cursor")
    with pytest.raises(ValueError, match="limit must be between 1 and 1000"):
        store.jobs.list_jobs(tenant_id, limit=0)


def test_mark_running_claims_only_runnable_jobs(store: Store, tenant_id: str) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    a, b, c, d = (
        x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1), spec(2), spec(3, expires_at=past)])
    )
    store.jobs.cancel(tenant_id, b)
    claims = store.jobs.mark_running([a, b, c, d, "job_missing"], "worker-1")
    assert [cl.id for cl in claims] == sorted([a, c])
    assert all(cl.attempts == 1 and cl.tenant_id == tenant_id and cl.request["max_tokens"] == 8 for cl in claims)
    job = store.jobs.get_job(tenant_id, a)
    assert job.status == "running" and job.worker == "worker-1" and job.started_at is not None  # type: ignore[union-attr]
    assert store.jobs.get_job(tenant_id, d).status == "expired"  # type: ignore[union-attr]
    # A redelivered task claims the running job again: a second attempt.
    assert [cl.attempts for cl in store.jobs.mark_running([a], "worker-2")] == [2]


def test_record_results_writes_result_usage_and_status_exactly_once(store: Store, tenant_id: str) -> None:
    key, _ = store.keys.create_key(tenant_id)
    ids = [c.id for c in store.jobs.create_jobs(tenant_id, [spec(i, api_key_id=key.id) for i in range(4)])]
    store.jobs.mark_running(ids, "w1")
    out = store.jobs.record_results([finished(i, token_ids=[1, 2, 3]) for i in ids[:3]] + [finished("job_nope")])
    assert sorted(out.recorded) == sorted(ids[:3]) and out.duplicates == [] and out.unknown == ["job_nope"]

    again = store.jobs.record_results([finished(ids[0], prompt=999), finished(ids[3]), finished(ids[3])])
    assert again.recorded == [ids[3]] and sorted(again.duplicates) == sorted([ids[0], ids[3]])

    job = store.jobs.get_job(tenant_id, ids[0])
    assert job.status == "succeeded" and job.finished_at is not None  # type: ignore[union-attr]
    result = store.jobs.get_result(tenant_id, ids[0])
    assert result.output_text == f"out {ids[0]}" and result.token_ids == [1, 2, 3]  # type: ignore[union-attr]
    usage = store.jobs.get_usage(tenant_id, ids[0])
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (5, 7, 2)
    assert (usage.api_key_id, usage.model, usage.attempt, usage.worker) == (key.id, "smollm2", 1, "w1")
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 4
        assert s.scalar(select(func.count()).select_from(Usage)) == 4
        assert s.scalar(select(func.sum(Usage.prompt_tokens))) == 20


def test_a_cancelled_job_keeps_its_status_but_its_tokens_count(store: Store, tenant_id: str) -> None:
    job_id = store.jobs.create_job(tenant_id, spec()).id
    store.jobs.mark_running([job_id], "w")
    assert store.jobs.cancel(tenant_id, job_id).status == "cancelled"  # type: ignore[union-attr]
    assert store.jobs.record_results([finished(job_id)]).recorded == [job_id]
    assert store.jobs.get_job(tenant_id, job_id).status == "cancelled"  # type: ignore[union-attr]
    assert store.usage.totals(tenant_id).completion_tokens == 7


def test_cancel_leaves_finished_jobs_alone(store: Store, tenant_id: str) -> None:
    job_id = store.jobs.create_job(tenant_id, spec()).id
    store.jobs.record_results([finished(job_id)])
    assert store.jobs.cancel(tenant_id, job_id).status == "succeeded"  # type: ignore[union-attr]
    assert store.jobs.cancel(tenant_id, "job_missing") is None


def test_mark_failed_requeue_and_expire(store: Store, tenant_id: str) -> None:
    a, b, c = (x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1), spec(2)]))
    store.jobs.mark_running([a, b], "w")
    assert store.jobs.requeue([b, c]) == 1  # only the running one goes back
    assert store.jobs.get_job(tenant_id, b).status == "queued"  # type: ignore[union-attr]
    assert store.jobs.mark_failed([JobFailure(a, "oom", "out of KV blocks"), JobFailure(b, "bad", "x")]) == 2
    job = store.jobs.get_job(tenant_id, a)
    assert (job.status, job.error_code, job.error_message) == ("failed", "oom", "out of KV blocks")  # type: ignore[union-attr]
    assert store.jobs.mark_failed([JobFailure(a, "again", "y")]) == 0
    assert store.jobs.expire([a, c]) == 1
    assert store.jobs.get_job(tenant_id, c).status == "expired"  # type: ignore[union-attr]
    assert store.jobs.record_results([finished(a)]).recorded == [a]
    assert store.jobs.get_job(tenant_id, a).status == "failed"  # type: ignore[union-attr]


def test_a_job_stopped_at_its_deadline_is_expired_with_its_result_and_usage_in_one_write(
        store: Store, tenant_id: str) -> None:
    a, b, c = (x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1), spec(2)]))
    store.jobs.mark_running([a, b, c], "w")
    store.jobs.cancel(tenant_id, c)
    out = store.jobs.record_results([finished(a, completion=4, expired=True), finished(b),
                                     finished(c, expired=True)])
    assert sorted(out.recorded) == sorted([a, b, c])
    job = store.jobs.get_job(tenant_id, a)
    assert (job.status, job.error_code) == ("expired", "expired") and job.finished_at is not None  # type: ignore[union-attr]
    assert "deadline" in job.error_message  # type: ignore[union-attr]
    assert store.jobs.get_usage(tenant_id, a).completion_tokens == 4  # type: ignore[union-attr]
    assert store.jobs.get_result(tenant_id, a) is not None
    assert store.jobs.get_job(tenant_id, b).status == "succeeded"  # type: ignore[union-attr]
    assert store.jobs.get_job(tenant_id, c).status == "cancelled"  # a cancel wins; the tokens still count  # type: ignore[union-attr]
    assert store.jobs.get_usage(tenant_id, c) is not None


def test_hot_path_handles_thousands_of_jobs_in_few_calls(store: Store, tenant_id: str) -> None:
    ids = [c.id for c in store.jobs.create_jobs(tenant_id, [spec(i) for i in range(3000)])]
    assert len(store.jobs.mark_running(ids, "w")) == 3000
    out = store.jobs.record_results([finished(j, prompt=n % 13, completion=1) for n, j in enumerate(ids)])
    assert len(out.recorded) == 3000
    assert store.jobs.count_jobs(tenant_id, status="succeeded") == 3000
    total = store.usage.totals(tenant_id)
    assert total.requests == 3000 and total.prompt_tokens == sum(i % 13 for i in range(3000))
    assert list(store.jobs.iter_job_ids(tenant_id, status="succeeded", page_size=700)) == sorted(ids)


def test_naive_datetimes_are_refused(store: Store, tenant_id: str) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        store.jobs.create_job(tenant_id, spec(expires_at=datetime(2030, 1, 1)))


def test_jobs_of_a_deleted_tenant_go_with_it(store: Store, tenant_id: str) -> None:
    job_id = store.jobs.create_job(tenant_id, spec()).id
    store.jobs.record_results([finished(job_id)])
    from store.models import Tenant

    with store.db.write() as s:
        s.delete(s.get(Tenant, tenant_id))
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Usage)) == 0


def test_a_claim_records_the_instance_and_never_takes_a_live_instances_job(store: Store, tenant_id: str) -> None:
    a, b = (x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1)]))
    assert [c.id for c in store.jobs.mark_running([a, b], "w", "inst-1", takeover=())] == sorted([a, b])
    assert store.jobs.running_instances([a, b, "job_missing"]) == {a: "inst-1", b: "inst-1"}
    # inst-1 lives: a redelivered copy elsewhere claims nothing.
    assert store.jobs.mark_running([a, b], "w2", "inst-2", takeover=()) == []
    # inst-1 is known dead: its running jobs are taken over (a second attempt).
    claims = store.jobs.mark_running([a], "w2", "inst-2", takeover={"inst-1"})
    assert [(c.id, c.attempts) for c in claims] == [(a, 2)]
    assert store.jobs.claimed_by([a, b], "inst-1") == {b}


def test_requeue_lost_moves_only_the_lost_instances_running_jobs_once(store: Store, tenant_id: str) -> None:
    a, b, c = (x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1), spec(2)]))
    store.jobs.mark_running([a, b], "w", "dead")
    store.jobs.mark_running([c], "w", "alive")
    store.jobs.record_results([finished(b, worker_instance="dead")])
    assert store.jobs.requeue_lost("dead") == [a]
    assert store.jobs.requeue_lost("dead") == []  # a second recoverer changes nothing
    job = store.jobs.get_job(tenant_id, a)
    assert job.status == "queued" and job.worker_instance is None and job.attempts == 1  # type: ignore[union-attr]
    assert store.jobs.get_job(tenant_id, c).status == "running"  # type: ignore[union-attr]


def test_a_result_from_an_instance_that_lost_the_job_is_fenced(store: Store, tenant_id: str) -> None:
    a, b = (x.id for x in store.jobs.create_jobs(tenant_id, [spec(0), spec(1)]))
    store.jobs.mark_running([a, b], "w", "cut-off")
    store.jobs.requeue_lost("cut-off")
    store.jobs.mark_running([a], "w2", "new", takeover=())
    late = store.jobs.record_results([finished(a, worker_instance="cut-off"), finished(b, worker_instance="cut-off")])
    assert late.recorded == [] and late.fenced == sorted([a, b]) and late.duplicates == []
    assert store.jobs.get_result(tenant_id, a) is None
    out = store.jobs.record_results([finished(a, worker_instance="new")])
    assert out.recorded == [a]
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Usage).where(Usage.job_id == a)) == 1
