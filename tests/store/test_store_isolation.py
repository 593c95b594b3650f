"""Tenant isolation: another tenant's job, file, batch and usage are invisible and untouchable."""

from __future__ import annotations

import io
import json

import pytest

from store import FinishedJob, InvalidTransition, JobSpec, NotFound, Store


@pytest.fixture
def acme(store: Store, tenant_id: str) -> dict[str, str]:
    """Acme's job (finished), file and batch (in progress)."""
    job_id = store.jobs.create_job(tenant_id, JobSpec(model="m", request={"prompt": "secret"}, idempotency_key="k")).id
    store.jobs.record_results([FinishedJob(job_id, "secret output", "stop", 11, 22)])
    queued = store.jobs.create_job(tenant_id, JobSpec(model="m", request={"prompt": "q"})).id
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "s"}}
    file_id = store.files.create(tenant_id, io.BytesIO(json.dumps(line).encode()), purpose="batch", filename="f").id
    batch_id = store.batches.create(tenant_id, input_file_id=file_id, endpoint="/v1/completions").id
    store.batches.start_ingest(tenant_id, batch_id)
    spec = JobSpec(model="m", request=line["body"], kind="bulk", batch_id=batch_id, custom_id="c1")
    assert store.batches.add_jobs(tenant_id, batch_id, [spec]) is None
    assert store.batches.finish_ingest(tenant_id, batch_id, total=1, errors=[]) is None
    return {"job": job_id, "queued": queued, "file": file_id, "batch": batch_id}


def test_another_tenant_cannot_read_count_or_cancel_a_job(
    store: Store, tenant_id: str, other_tenant_id: str, acme: dict[str, str]
) -> None:
    assert store.jobs.get_job(other_tenant_id, acme["job"]) is None
    assert store.jobs.get_result(other_tenant_id, acme["job"]) is None
    assert store.jobs.get_usage(other_tenant_id, acme["job"]) is None
    assert store.jobs.cancel(other_tenant_id, acme["queued"]) is None
    assert store.jobs.get_job(tenant_id, acme["queued"]).status == "queued"  # type: ignore[union-attr]
    assert store.jobs.count_jobs(other_tenant_id) == 0
    assert store.jobs.list_jobs(other_tenant_id).jobs == []
    assert store.jobs.list_jobs(other_tenant_id, batch_id=acme["batch"]).jobs == []
    assert list(store.jobs.iter_job_ids(other_tenant_id, status=None)) == []
    # The same idempotency key from another tenant makes a new job, not a view of acme's.
    theirs = store.jobs.create_job(other_tenant_id, JobSpec(model="m", request={}, idempotency_key="k"))
    assert theirs.created and theirs.id != acme["job"]


def test_another_tenant_cannot_see_or_delete_a_file(
    store: Store, tenant_id: str, other_tenant_id: str, acme: dict[str, str]
) -> None:
    assert store.files.get(other_tenant_id, acme["file"]) is None
    assert store.files.list_files(other_tenant_id) == [] and store.files.count_files(other_tenant_id) == 0
    with pytest.raises(NotFound):
        store.files.open_content(other_tenant_id, acme["file"])
    with pytest.raises(NotFound):
        store.files.open_lines(other_tenant_id, acme["file"])
    assert store.files.delete(other_tenant_id, acme["file"]) is False
    assert store.files.get(tenant_id, acme["file"]) is not None


def test_another_tenant_cannot_see_use_or_cancel_a_batch(
    store: Store, tenant_id: str, other_tenant_id: str, acme: dict[str, str]
) -> None:
    batch = acme["batch"]
    assert store.batches.get(other_tenant_id, batch) is None
    assert store.batches.counts(other_tenant_id, batch) is None
    assert store.batches.list_batches(other_tenant_id) == [] and store.batches.count_batches(other_tenant_id) == 0
    assert store.batches.job_by_custom_id(other_tenant_id, batch, "c1") is None
    for attempt in (
        lambda: store.batches.cancel(other_tenant_id, batch),
        lambda: store.batches.advance(other_tenant_id, batch),
        lambda: store.batches.transition(other_tenant_id, batch, "cancelling"),
        lambda: store.batches.iter_outcomes(other_tenant_id, batch),
        lambda: store.batches.start_ingest(other_tenant_id, batch),
        lambda: store.batches.list_batches(other_tenant_id, after=batch),
        lambda: store.batches.create(other_tenant_id, input_file_id=acme["file"], endpoint="/v1/completions"),
        lambda: store.jobs.create_job(other_tenant_id, JobSpec(model="m", request={}, batch_id=batch, custom_id="x")),
    ):
        with pytest.raises(NotFound):
            attempt()
    # Another tenant's ingestion steps find no such batch: nothing is added, nothing finished.
    theirs = JobSpec(model="m", request={}, kind="bulk", batch_id=batch, custom_id="x")
    assert store.batches.add_jobs(other_tenant_id, batch, [theirs]) == "deleted"
    assert store.batches.finish_ingest(other_tenant_id, batch, total=0, errors=[{"code": "x"}]) == "deleted"
    assert store.batches.get(tenant_id, batch).status == "in_progress"  # type: ignore[union-attr]
    assert store.jobs.count_jobs(tenant_id, batch_id=batch) == 1
    assert store.jobs.count_jobs(other_tenant_id) == 0
    with pytest.raises(InvalidTransition):  # acme itself gets a real answer
        store.batches.transition(tenant_id, batch, "completed")


def test_another_tenant_sees_no_usage(store: Store, tenant_id: str, other_tenant_id: str, acme: dict[str, str]) -> None:
    assert store.usage.totals(other_tenant_id).requests == 0
    assert store.usage.summary(other_tenant_id, group_by=["model"]) == []
    assert store.usage.totals(tenant_id).prompt_tokens == 11
