"""Models of the admin endpoints (tenants and API keys)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import no_nul


class TenantCreate(BaseModel):
    """A new tenant."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)

    _storable_name = field_validator("name")(no_nul)


class Limits(BaseModel):
    """Limits of a tenant or of one key (a key's apply on top of its tenant's). A field left out or
    null: no limit. The one home of these fields and their bounds (the CLI validates with it too)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, le=10**15, description="requests per UTC minute")
    tokens_per_minute: int | None = Field(
        None, ge=1, le=10**15, description="prompt + max_tokens reserved per UTC minute (unused tokens given back)")
    max_queued_jobs: int | None = Field(
        None, ge=1, le=10**15, description="unfinished jobs submitted one by one (batch jobs not counted)")
    max_batch_tokens: int | None = Field(
        None, ge=1, le=10**15, description="tokens (prompt + max_tokens) held by unfinished batch jobs")
    daily_tokens: int | None = Field(None, ge=1, le=10**15, description="token budget per UTC day (hard stop)")
    monthly_tokens: int | None = Field(None, ge=1, le=10**15, description="token budget per UTC month (hard stop)")

    def stored(self) -> dict[str, int] | None:
        """The form the store keeps (only the limits that are set; None when none is)."""
        return self.model_dump(exclude_none=True) or None


class TenantSettings(BaseModel):
    """Settings of a tenant an administrator may change."""

    model_config = ConfigDict(extra="forbid")

    retention_days: int | None = Field(None, ge=1, le=100_000,
                                       description="days finished work is kept; null: the operator's default")
    webhook_url: str | None = Field(None, min_length=1, max_length=2000,
                                    description="the default completion webhook of the tenant's jobs and batches")
    weight: float | None = Field(None, gt=0, le=1000,
                                 description="fair-share weight: workers share their capacity between tenants "
                                             "with work in proportion to it (default 1)")


class WebhookSecret(BaseModel):
    """The secret a tenant's webhook deliveries are signed with (Standard Webhooks, ``whsec_...``)."""

    tenant_id: str
    secret: str


class Tenant(BaseModel):
    """A tenant."""

    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime
    limits: Limits = Field(default_factory=Limits)
    retention_days: int | None = None
    webhook_url: str | None = None
    weight: float = 1.0


class TenantList(BaseModel):
    """Every tenant."""

    object: Literal["list"] = "list"
    data: list[Tenant]


class KeyCreate(BaseModel):
    """A new API key."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)

    _storable_name = field_validator("name")(no_nul)


class ApiKey(BaseModel):
    """An API key (never its plaintext, except in the answer that creates it)."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str | None = None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None
    limits: Limits = Field(default_factory=Limits)


class CreatedApiKey(ApiKey):
    """A key just created: ``key`` is shown this once."""

    key: str


class ApiKeyList(BaseModel):
    """A tenant's keys."""

    object: Literal["list"] = "list"
    data: list[ApiKey]


class TenantRevoked(BaseModel):
    """A tenant whose keys were all revoked."""

    id: str
    object: Literal["tenant"] = "tenant"
    revoked_keys: int
