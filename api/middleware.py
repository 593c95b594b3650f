"""Pure ASGI middleware: body size limits and Content-Type checks (before any parsing), and the
request metrics. Pure ASGI so that streaming responses pass through untouched."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.metrics import ApiMetrics

_JSON_TYPES = ("application/json",)
_MULTIPART = "multipart/form-data"


class _TooLarge(HTTPException):
    """Raised from ``receive`` while the app reads the body; FastAPI passes HTTP exceptions on to
    the error handlers, which answer 413."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class RequestGuard:
    """Refuses bodies over the limit (413) and bodies of the wrong type (415), and counts requests.

    File uploads (``POST /v1/files``) take multipart bodies up to the file limit; every other body
    must be JSON up to the body limit. A body that lies about (or omits) its length is counted as
    it arrives.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_file_bytes: int, metrics: ApiMetrics) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_file = max_file_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_box = {"status": 500}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], path, status_box["status"], time.perf_counter() - started)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        nul_in = _nul_parameter(scope)
        if nul_in is not None:
            # No id, name or filter of this API holds a NUL, and the database takes none in text:
            # refused here, naming the parameter, rather than by the database later.
            await error_response(400, f"{nul_in} holds a NUL character", param=nul_in,
                                 code="invalid_value")(scope, receive, send)
            return
        method = scope["method"]
        if method not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        is_upload = scope["path"].rstrip("/") == "/v1/files"
        # An upload may carry the form's own bytes (boundaries, headers) on top of the file; the
        # file itself is held to the file limit by the route, and every message names that limit.
        limit = self.max_file + 64 * 1024 if is_upload else self.max_body
        too_large = (f"the file is larger than the {self.max_file}-byte limit" if is_upload
                     else f"the request body is larger than the {limit}-byte limit")
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "Content-Length is not a number", param="Content-Length")(scope, receive, send)
                return
            if declared > limit:
                await self._too_large(scope, receive, send, too_large, is_upload)
                return
        else:
            declared = None
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        has_body = declared != 0 and not (declared is None and "transfer-encoding" not in headers)
        if has_body:
            wanted = _MULTIPART if is_upload else "application/json"
            if ctype != wanted and not (not is_upload and ctype.endswith("+json")):
                await error_response(415, f"Content-Type must be {wanted}, got {ctype or 'none'}",
                                     param="Content-Type", code="unsupported_media_type")(scope, receive, send)
                return
        received = 0
        started_response = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(too_large)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except _TooLarge:
            if not started_response:
                await self._too_large(scope, receive, send, too_large, is_upload)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, message: str, is_upload: bool) -> None:
        response: Any = error_response(413, message, param="file" if is_upload else None,
                                       code="file_too_large" if is_upload else "request_too_large")
        await response(scope, receive, send)


def _nul_parameter(scope: Scope) -> str | None:
    """The query parameter (or "path") whose value holds a NUL character, if any."""
    if "\x00" in scope.get("path", ""):
        return "path"
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in value or "\x00" in name:
                return name.replace("\x00", "") or "query"
        return "query"
    return None
