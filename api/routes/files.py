"""/v1/files: upload (multipart, purpose ``batch``), read, download and delete files."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.auth import Principal, tenant
from api.errors import ApiError
from api.formats import unix
from api.schemas.common import AUTH, BAD, MEDIA, MISSING, TOO_LARGE, DeletedObject, responses
from api.schemas.files import FileList, FileObject
from api.state import ApiState, get_state

router = APIRouter(prefix="/v1/files", tags=["files"])

UPLOAD_PURPOSES = ("batch",)


def file_object(f: Any) -> dict[str, Any]:
    """A stored file in OpenAI's shape."""
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": unix(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed" if f.status == "uploaded" else f.status,
            "status_details": None, "expires_at": None}


@router.post("", response_model=FileObject, summary="Upload a file",
             responses=responses(BAD, AUTH, TOO_LARGE, MEDIA))
async def upload(
    file: Annotated[UploadFile, File(description="the file (JSONL for batches)")],
    purpose: Annotated[str, Form(max_length=64, description="'batch'")],
    who: Principal = Depends(tenant), state: ApiState = Depends(get_state),
) -> Any:
    """Stores an uploaded file (streamed into the store in pieces; never held whole in memory)."""
    assert who.tenant_id is not None
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(400, f"purpose {purpose!r} is not accepted; use one of {', '.join(UPLOAD_PURPOSES)}",
                       param="purpose", code="invalid_value")
    limit = state.config.max_file_bytes
    if file.size is not None and file.size > limit:
        raise ApiError(413, f"the file is larger than the {limit}-byte limit", param="file", code="file_too_large")
    name = _stored_name(file.filename)
    try:
        stored = await run_in_threadpool(state.store.files.create, who.tenant_id, file.file, purpose=purpose,
                                         filename=name, max_bytes=limit)
    except ValueError as exc:
        raise ApiError(413, str(exc), param="file", code="file_too_large") from None
    finally:
        await file.close()
    if stored.bytes == 0:
        await run_in_threadpool(state.store.files.delete, who.tenant_id, stored.id)
        raise ApiError(400, "the file is empty", param="file", code="empty_file")
    return file_object(stored)


@router.get("", response_model=FileList, summary="List files", responses=responses(BAD, AUTH))
def list_files(who: Principal = Depends(tenant), state: ApiState = Depends(get_state),
               purpose: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000) -> Any:
    """The tenant's files, newest first."""
    assert who.tenant_id is not None
    files = state.store.files.list_files(who.tenant_id, purpose=purpose, limit=limit + 1)
    return {"object": "list", "data": [file_object(f) for f in files[:limit]], "has_more": len(files) > limit}


def _get(state: ApiState, tenant_id: str, file_id: str) -> Any:
    f = state.store.files.get(tenant_id, file_id)
    if f is None or f.status != "uploaded":
        raise ApiError(404, f"no file {file_id!r}", code="file_not_found")
    return f


@router.get("/{file_id}", response_model=FileObject, summary="Read a file's metadata",
            responses=responses(AUTH, MISSING))
def get_file(file_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """The file's metadata."""
    assert who.tenant_id is not None
    return file_object(_get(state, who.tenant_id, file_id))


@router.get("/{file_id}/content", summary="Download a file", response_class=StreamingResponse,
            responses=responses({200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                        "format": "binary"}}},
                                       "description": "the file's bytes"}}, AUTH, MISSING))
def content(file_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> StreamingResponse:
    """The file's content, streamed a piece at a time."""
    assert who.tenant_id is not None
    f = _get(state, who.tenant_id, file_id)
    chunks: Iterator[bytes] = state.store.files.open_content(who.tenant_id, file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(f.bytes),
                                      "Content-Disposition": f'attachment; filename="{_safe(f.filename)}"'})


def _stored_name(filename: str | None) -> str:
    """The name kept for an upload: as sent, less control characters (NUL cannot be stored), at
    most 255 characters. It is only a label: content is stored and found by the file's id alone."""
    name = re.sub(r"[\x00-\x1f\x7f]", "_", filename or "")[:255]
    return name or "upload.jsonl"


def _safe(name: str) -> str:
    """A filename that is safe in a header (ASCII letters, digits, dot, dash, underscore)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "file"


@router.delete("/{file_id}", response_model=DeletedObject, summary="Delete a file",
               responses=responses(AUTH, MISSING))
def delete(file_id: str, who: Principal = Depends(tenant), state: ApiState = Depends(get_state)) -> Any:
    """Deletes the file and its content."""
    assert who.tenant_id is not None
    if not state.store.files.delete(who.tenant_id, file_id):
        raise ApiError(404, f"no file {file_id!r}", code="file_not_found")
    return {"id": file_id, "object": "file", "deleted": True}
