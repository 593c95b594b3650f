"""Models of GET /v1/usage."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel


class UsageBucket(BaseModel):
    """Token totals of one group; the fields not grouped by are null."""

    tenant_id: str | None = None
    model: str | None = None
    api_key_id: str | None = None
    day: date | None = None
    hour: int | None = None
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    """Usage of the caller's tenant (or, for the admin key, of every tenant)."""

    object: Literal["list"] = "list"
    group_by: list[str]
    data: list[UsageBucket]
