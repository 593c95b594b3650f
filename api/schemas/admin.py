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


class Tenant(BaseModel):
    """A tenant."""

    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime


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
