"""Token accounting aggregates: per tenant, key, model, day and hour."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import update

from store import FinishedJob, JobSpec, Store
from store.models import Usage


def _finish(store: Store, tenant_id: str, model: str, key_id: str | None, prompt: int, completion: int) -> str:
    job_id = store.jobs.create_job(tenant_id, JobSpec(model=model, request={"prompt": "p"}, api_key_id=key_id)).id
    store.jobs.mark_running([job_id], "w")
    out = store.jobs.record_results(
        [FinishedJob(job_id, "x", "length", prompt_tokens=prompt, completion_tokens=completion, cached_prompt_tokens=1)]
    )
    assert out.recorded == [job_id]
    return job_id


def _move(store: Store, job_id: str, day: date, hour: int) -> None:
    """Pretends a usage row was written on another day and hour (the store stamps 'now')."""
    with store.db.write() as s:
        s.execute(update(Usage).where(Usage.job_id == job_id).values(day=day, hour=hour))


@pytest.fixture
def usage_rows(store: Store, tenant_id: str, other_tenant_id: str) -> dict[str, object]:
    k1, _ = store.keys.create_key(tenant_id, "one")
    k2, _ = store.keys.create_key(tenant_id, "two")
    d1, d2 = date(2026, 11, 1), date(2026, 11, 2)
    rows = [
        ("small", k1.id, 10, 1, d1, 9),
        ("small", k1.id, 20, 2, d1, 9),
        ("small", k2.id, 30, 3, d1, 17),
        ("large", k2.id, 40, 4, d2, 9),
        ("large", None, 50, 5, d2, 23),
    ]
    for model, key, prompt, completion, day, hour in rows:
        _move(store, _finish(store, tenant_id, model, key, prompt, completion), day, hour)
    _finish(store, other_tenant_id, "small", None, 1000, 1000)
    return {"k1": k1.id, "k2": k2.id, "d1": d1, "d2": d2}


def test_totals_add_up_for_the_tenant_only(store: Store, tenant_id: str, usage_rows) -> None:  # type: ignore[no-untyped-def]
    total = store.usage.totals(tenant_id)
    assert (total.requests, total.prompt_tokens, total.completion_tokens) == (5, 150, 15)
    assert total.cached_prompt_tokens == 5 and total.total_tokens == 165


def test_grouped_by_model_key_day_and_hour(store: Store, tenant_id: str, usage_rows) -> None:  # type: ignore[no-untyped-def]
    by_model = {b.model: b.prompt_tokens for b in store.usage.summary(tenant_id, group_by=["model"])}
    assert by_model == {"large": 90, "small": 60}
    by_key = {b.api_key_id: b.requests for b in store.usage.summary(tenant_id, group_by=["api_key"])}
    assert by_key == {usage_rows["k1"]: 2, usage_rows["k2"]: 2, None: 1}
    by_day = [(b.day, b.completion_tokens) for b in store.usage.summary(tenant_id, group_by=["day"])]
    assert by_day == [(usage_rows["d1"], 6), (usage_rows["d2"], 9)]
    by_hour = [(b.day, b.hour, b.requests) for b in store.usage.summary(tenant_id, group_by=["hour"])]
    assert by_hour == [
        (usage_rows["d1"], 9, 2),
        (usage_rows["d1"], 17, 1),
        (usage_rows["d2"], 9, 1),
        (usage_rows["d2"], 23, 1),
    ]
    per_model_day = store.usage.summary(tenant_id, group_by=["model", "day"])
    assert sum(b.prompt_tokens for b in per_model_day) == 150


def test_filtered_by_days_key_and_model(store: Store, tenant_id: str, usage_rows) -> None:  # type: ignore[no-untyped-def]
    d1, d2 = usage_rows["d1"], usage_rows["d2"]
    assert store.usage.totals(tenant_id, since=d2).prompt_tokens == 90
    assert store.usage.totals(tenant_id, until=d1).prompt_tokens == 60
    assert store.usage.totals(tenant_id, since=d2 + timedelta(days=1)).requests == 0
    only_k2 = store.usage.summary(tenant_id, api_key_id=usage_rows["k2"], group_by=["model"])
    assert [(b.model, b.prompt_tokens) for b in only_k2] == [("large", 40), ("small", 30)]
    assert store.usage.summary(tenant_id, model="small")[0].requests == 3


def test_unknown_grouping_is_refused(store: Store, tenant_id: str) -> None:
    with pytest.raises(ValueError, match="cannot group usage by 'week'"):
        store.usage.summary(tenant_id, group_by=["week"])  # type: ignore[list-item]
    assert store.usage.totals(tenant_id).requests == 0
