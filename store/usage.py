"""Token accounting: usage totals per tenant, grouped by key, model, day and hour (UTC)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any, Literal

from sqlalchemy import func, select

from store.db import Database
from store.models import Usage, UsageHourly
from store.types import UsageBucket

GroupBy = Literal["tenant", "model", "api_key", "day", "hour"]
_COLUMNS = {"tenant": "tenant_id", "model": "model", "api_key": "api_key_id", "day": "day", "hour": "hour"}


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
        # Per-job rows, plus the hourly sums of purged jobs (store.retention): totals are the same
        # before and after a purge.
        merged: dict[tuple[Any, ...], list[int]] = {}
        for table, requests in ((Usage, func.count()), (UsageHourly, func.coalesce(func.sum(UsageHourly.requests), 0))):
            keys = [getattr(table, _COLUMNS[g]) for g in wanted]
            stmt = select(
                *keys,
                requests,
                func.coalesce(func.sum(table.prompt_tokens), 0),
                func.coalesce(func.sum(table.cached_prompt_tokens), 0),
                func.coalesce(func.sum(table.completion_tokens), 0),
            )
            if tenant_id is not None:
                stmt = stmt.where(table.tenant_id == tenant_id)
            if since is not None:
                stmt = stmt.where(table.day >= since)
            if until is not None:
                stmt = stmt.where(table.day <= until)
            if api_key_id is not None:
                stmt = stmt.where(table.api_key_id == api_key_id)
            if model is not None:
                stmt = stmt.where(table.model == model)
            if keys:
                stmt = stmt.group_by(*keys)
            with self._db.read() as s:
                rows = s.execute(stmt).all()
            for row in rows:
                group = tuple(row[: len(keys)])
                numbers = [int(v) for v in row[len(keys):]]
                before = merged.get(group)
                merged[group] = numbers if before is None else [a + b for a, b in zip(before, numbers, strict=True)]
        buckets = []
        # Ordered by the group fields, as SQL would (NULLs last)
        for group_values in sorted(merged, key=lambda g: tuple((v is None, v if v is not None else "") for v in g)):
            group: dict[str, Any] = dict(zip(wanted, group_values, strict=True))
            requests_n, prompt, cached, completion = merged[group_values]
            buckets.append(
                UsageBucket(
                    model=group.get("model"),
                    api_key_id=group.get("api_key"),
                    day=group.get("day"),
                    hour=group.get("hour"),
                    requests=requests_n,
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
