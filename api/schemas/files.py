"""Models of the Files API (OpenAI's shape)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class FileObject(BaseModel):
    """An uploaded or generated file."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    """The tenant's files, newest first."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
