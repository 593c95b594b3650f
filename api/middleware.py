"""Pure ASGI middleware: body size limits and Content-Type checks (before any parsing), and the
request metrics. Pure ASGI so that streaming responses pass through untouched."""

from __future__ import annotations

import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.metrics import RequestMetrics

_JSON_TYPES = ("application/json",)
_MULTIPART = "multipart/form-data"


class _TooLarge(HTTPException):
    """Raised from ``receive`` while the app reads the body; FastAPI passes HTTP exceptions on to
    the error handlers, which answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the {limit}-byte limit")


class RequestGuard:
    """Refuses bodies over the limit (413) and bodies of the wrong type (415), and counts requests.

    File uploads (``POST /v1/files``) take multipart bodies up to the file limit; every other body
    must be JSON up to the body limit. A body that lies about (or omits) its length is counted as
    it arrives.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_file_bytes: int, metrics: RequestMetrics) -> None:
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
        method = scope["method"]
        if method not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        is_upload = scope["path"].rstrip("/") == "/v1/files"
        limit = self.max_file + 64 * 1024 if is_upload else self.max_body
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "Content-Length is not a number", param="Content-Length")(scope, receive, send)
                return
            if declared > limit:
                await self._too_large(scope, receive, send, limit)
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
                    raise _TooLarge(limit)
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
                await self._too_large(scope, receive, send, limit)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response: Any = error_response(413, f"the request body is larger than the {limit}-byte limit",
                                       code="request_too_large")
        await response(scope, receive, send)
