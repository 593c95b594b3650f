"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and the handlers
that make every failure one of them, so no input ever surfaces as a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.errors import Conflict, InvalidTransition, NotFound

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client: a status, a message that says what to do, and the field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def not_found(what: str, ident: str) -> ApiError:
    """404 for a missing row, or one of another tenant (they must look the same)."""
    return ApiError(404, f"no {what} {ident!r}", param=None, code=f"{what.replace(' ', '_')}_not_found")


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "list", "dict", "bytes"}


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``.

    pydantic puts the union member it tried into the location (``constrained-str``,
    ``list[int]``, ``function-after[...]``); those are no field names and are left out.
    """
    out = ""
    for i, p in enumerate(loc):
        if i == 0 and p in ("body", "query", "path", "header", "cookie"):
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and ("[" in p or "-" in p or "(" in p or p in _TYPE_NAMES):
            continue
        else:
            out += ("." if out else "") + str(p)
    return out or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The field of the first problem and one message for it (a union's alternatives joined)."""
    first = errors[0]
    param = _param_of(tuple(first.get("loc", ())))
    same = [e for e in errors if _param_of(tuple(e.get("loc", ()))) == param]
    msgs: list[str] = []
    for e in same:
        m = {"missing": "this field is required", "extra_forbidden": "unrecognized request argument"}.get(
            str(e.get("type")), str(e.get("msg", "invalid value")))
        m = m.removeprefix("Value error, ")
        if m not in msgs:
            msgs.append(m)
    message = " or ".join(msgs[:3])
    others = len({_param_of(tuple(e.get("loc", ()))) for e in errors} - {param})
    if param:
        message = f"{param}: {message}"
    if others:
        message += f" (and problems with {others} more field{'s' if others > 1 else ''})"
    return param, message


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    scope = dict(request.scope)
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Routes every exception to an OpenAI-shaped error response."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors()) or [{"loc": (), "msg": "invalid request"}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        if tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body must be a JSON object", code="invalid_body")
        param, message = _validation_message(errors)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words for a body its parser raised on (invalid UTF-8, JSON nested past
            # Python's recursion limit, a broken multipart form)
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
            what = "a multipart form" if multipart else "JSON (it is not UTF-8, or it is nested too deeply)"
            return error_response(400, f"the request body could not be read as {what}",
                                  code="invalid_multipart" if multipart else "invalid_json")
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path; a path served
            # by several routes (GET and POST /v1/jobs) allows all of theirs.
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"method {request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return error_response(exc.status_code, message, headers=headers or None)

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc), code="not_found")

    @app.exception_handler(InvalidTransition)
    async def _transition(_request: Request, exc: InvalidTransition) -> JSONResponse:
        return error_response(409, str(exc), code="invalid_state")

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict) -> JSONResponse:
        return error_response(409, str(exc), code="conflict")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        if _refused_data(exc):
            # The database refused a value the schema let through (PostgreSQL takes no NUL
            # character in text): the request was wrong, not the server.
            return error_response(400, "a field holds characters that cannot be stored (such as NUL)",
                                  code="invalid_value")
        if is_outage(exc):
            log.warning("backing service unavailable: %r", exc)
            return error_response(503, "a backing service (database or Redis) is unavailable; retry shortly",
                                  code="service_unavailable", headers={"Retry-After": "2"})
        log.exception("unhandled error: %r", exc)
        return error_response(500, "internal error; the server log has the details", code="internal_error")


def _refused_data(exc: BaseException) -> bool:
    from sqlalchemy.exc import DataError

    return isinstance(exc, DataError)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database or Redis cannot be reached (a 503, not a bug)."""
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated) or exc.__class__.__name__ in ("OperationalError", "InterfaceError")
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, KombuOperationalError, ConnectionError, TimeoutError))
