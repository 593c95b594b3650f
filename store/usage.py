"""Token accounting: usage totals per tenant, grouped by key, model, day and hour (UTC)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any, Literal

from sqlalchemy import func, select

from store.db import Database
from store.models import Usage
from store.types import UsageBucket

GroupBy = Literal["tenant", "model", "api_key", "day", "hour"]
_COLUMNS = {
    "tenant": Usage.tenant_id,
    "model": Usage.model,
    "api_key": Usage.api_key_id,
    "day": Usage.day,
    "hour": Usage.hour,
}


class UsageStore:
    """Aggregates over the ``usage`` table (one row per job that produced output)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def summary(
        self,
        tenant_id: str | None,
        *,
        group_by: Sequence[GroupBy] = (),
        since: date | None = None,
        until: date | None = None,
        api_key_id: str | None = None,
        model: str | None = None,
    ) -> list[UsageBucket]:
        """The tenant's usage totals, one bucket per group, ordered by the group fields.

        ``group_by`` takes any of ``model``, ``api_key``, ``day``, ``hour`` (``hour`` groups by day
        and hour). ``since`` and ``until`` are inclusive UTC days. With no grouping the result is
        one bucket of totals (zeros when there is no usage). ``tenant_id`` None sums every tenant
        (administrators only; group by ``tenant`` to tell them apart).
        """
        wanted = list(dict.fromkeys(group_by))
        bad = [g for g in wanted if g not in _COLUMNS]
        if bad:
            raise ValueError(f"cannot group usage by {bad[0]!r}; choose from {', '.join(_COLUMNS)}")
        if "hour" in wanted and "day" not in wanted:
            wanted.insert(wanted.index("hour"), "day")
        keys = [_COLUMNS[g] for g in wanted]
        stmt = select(
            *keys,
            func.count(),
            func.coalesce(func.sum(Usage.prompt_tokens), 0),
            func.coalesce(func.sum(Usage.cached_prompt_tokens), 0),
            func.coalesce(func.sum(Usage.completion_tokens), 0),
        )
        if tenant_id is not None:
            stmt = stmt.where(Usage.tenant_id == tenant_id)
        if since is not None:
            stmt = stmt.where(Usage.day >= since)
        if until is not None:
            stmt = stmt.where(Usage.day <= until)
        if api_key_id is not None:
            stmt = stmt.where(Usage.api_key_id == api_key_id)
        if model is not None:
            stmt = stmt.where(Usage.model == model)
        if keys:
            stmt = stmt.group_by(*keys).order_by(*keys)
        with self._db.read() as s:
            rows = s.execute(stmt).all()
        buckets = []
        for row in rows:
            group: dict[str, Any] = dict(zip(wanted, row[: len(keys)], strict=True))
            requests, prompt, cached, completion = (int(v) for v in row[len(keys) :])
            buckets.append(
                UsageBucket(
                    model=group.get("model"),
                    api_key_id=group.get("api_key"),
                    day=group.get("day"),
                    hour=group.get("hour"),
                    requests=requests,
                    prompt_tokens=prompt,
                    cached_prompt_tokens=cached,
                    completion_tokens=completion,
                    tenant_id=group.get("tenant", tenant_id),
                )
            )
        return buckets

    def totals(self, tenant_id: str, *, since: date | None = None, until: date | None = None) -> UsageBucket:
        """The tenant's overall totals (one bucket)."""
        return self.summary(tenant_id, since=since, until=until)[0]
