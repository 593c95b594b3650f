"""Models of the health endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether the database and Redis answer and every served model has a live worker."""

    status: Literal["ready", "not_ready"]
    database: bool
    redis: bool
    workers: dict[str, int]
