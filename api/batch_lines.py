"""The OpenAI batch-line rules: what one line of a batch input file must be, and what it becomes.

A line is ``{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": {"model", ...}}``
with a custom_id unique in the file, a body that is a valid request of the endpoint, and the same
(served) model as every other line. :class:`LineRules` checks the lines of one file in order and
says what became of each: a :class:`BatchLine` (the request its job stores) or a :class:`LineError`.

Two kinds of error, as OpenAI's Batch API has them. A line that is not a well-formed request line
(not JSON, a missing or repeated custom_id, another method, url or model) is the file's error: an
entry of the batch's ``errors.data``, and the batch fails. A well-formed line whose body the
endpoint refuses (``max_tokens: -5``, an unknown parameter, an invalid schema, a prompt longer than
the context) is that request's error alone (``LineError.custom_id`` set): its request fails with a
400 in the error file and every other line runs. Nothing here touches the store: `api.batch_ingest`
streams a file through these rules into it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.convert import prepare_chat, prepare_completion
from api.errors import ApiError, _validation_message
from api.registry import ModelRegistry
from api.schemas.openai import ChatCompletionRequest, CompletionRequest

MAX_ID_CHARS = 200  # custom_id and model name
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # how an unpaired surrogate gets into a line



@dataclass(frozen=True)
class BodyRefusal:
    """Why the endpoint refuses a request body, as its 4xx answer would say it: the message, the
    field (``param``) and OpenAI's ``code``. ``whole_file``: the refusal holds for every line of
    the batch (the model is not served), so it is the file's error, not one request's."""

    message: str
    param: str | None = None
    code: str | None = None
    whole_file: bool = False


# Checks one request body and turns it into the request its job stores: returns the request (a
# dict), or why the body is refused (a BodyRefusal, or just a message as a str).
BodyPreparer = Callable[[dict[str, Any]], "dict[str, Any] | BodyRefusal | str"]


@dataclass(frozen=True)
class BatchLine:
    """A good line: the request its job stores, and the model it names."""

    line: int
    custom_id: str
    model: str
    request: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    """A refused line (``line`` None: the file as a whole), as OpenAI reports it in ``errors.data``.

    ``custom_id`` is set when the line itself is well-formed and only its request body was
    refused: such an error concerns that one request, not the file (``param`` then names the
    body's field, as the endpoint's 400 would).
    """

    line: int | None
    code: str
    message: str
    custom_id: str | None = None
    param: str | None = None

    @property
    def of_request(self) -> bool:
        """Whether this error is one request's alone (its body was refused), not the file's."""
        return self.custom_id is not None

    def entry(self) -> dict[str, Any]:
        """The ``errors.data`` entry: ``{"code", "message", "line"}``."""
        return {"code": self.code, "message": self.message, "line": self.line}


def _no_constant(name: str) -> float:
    """json.loads hook: NaN and Infinity are no JSON (and no database takes them in a JSON value)."""
    raise ValueError(f"{name} is not a JSON number")


def _storable(text: str, *, nul_ok: bool = False) -> bool:
    """Whether a text column takes ``text``: UTF-8 (no unpaired surrogate) and, unless ``nul_ok``,
    no NUL (PostgreSQL refuses it in text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return nul_ok or "\x00" not in text


def _short_name(value: Any) -> bool:
    """A custom_id or model name: a storable string of 1 to MAX_ID_CHARS characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and _storable(value)


def _load(raw: bytes) -> Any:
    """The line's JSON value; raises ValueError with a message for the user."""
    try:
        # Without the line break: an error at the end of the line is placed there, not at
        # "column 1" of a next line.
        return json.loads(raw.rstrip(b"\r\n"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("the line is not valid JSON: it is not UTF-8") from None
    except ValueError as exc:
        where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"the line is not valid JSON: {getattr(exc, 'msg', exc)}{where}") from None
    except RecursionError:  # not a ValueError: it would end the whole ingestion
        raise ValueError("the line is not valid JSON: it is nested too deeply") from None


REFUSED = "refused"  # the key of the request stored for a line whose body was refused


def refused_request(error: LineError) -> dict[str, Any]:
    """The ``request`` a refused line's job stores: which line it was and the field refused (the
    body itself may not even be storable; the client has it in its file)."""
    return {REFUSED: {"line": error.line, "param": error.param}}


def refused_param(request: dict[str, Any] | None) -> str | None:
    """The refused field of a job made from a refused line (None for any other job)."""
    refused = (request or {}).get(REFUSED)
    return refused.get("param") if isinstance(refused, dict) else None


def is_refused(request: dict[str, Any] | None) -> bool:
    """Whether a job stands for a batch line whose body was refused."""
    return isinstance((request or {}).get(REFUSED), dict)


class LineRules:
    """The rules for the lines of one batch file, checked in file order: it remembers the
    custom_ids seen and the batch's model (that of its first good line)."""

    def __init__(self, endpoint: str, prepare: BodyPreparer | None = None) -> None:
        self._endpoint = endpoint
        self._prepare = prepare
        self._seen: set[str] = set()
        self.model: str | None = None

    def check(self, number: int, raw: bytes) -> BatchLine | LineError:
        """What becomes of line ``number`` (from 1) holding ``raw``."""
        try:
            item = _load(raw)
        except ValueError as exc:
            return LineError(number, "invalid_json", str(exc))
        if not isinstance(item, dict):
            return LineError(number, "invalid_request", "each line must be a JSON object")
        custom_id, body = item.get("custom_id"), item.get("body")
        if not _short_name(custom_id):
            return LineError(number, "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_ID_CHARS} "
                                                          "characters, without NUL or unpaired surrogates")
        if custom_id in self._seen:
            return LineError(number, "duplicate_custom_id", f"custom_id {custom_id!r} appears more than once")
        if item.get("method") != "POST":
            return LineError(number, "invalid_method", "method must be POST")
        if item.get("url") != self._endpoint:
            return LineError(number, "mismatched_url", f"url must be the batch's endpoint {self._endpoint!r}")
        if not isinstance(body, dict) or not _short_name(body.get("model")):
            return LineError(number, "invalid_body",
                             f"body must be an object with a model (a name of 1 to {MAX_ID_CHARS} characters)")
        if self.model is not None and body["model"] != self.model:
            return LineError(number, "mismatched_model",
                             f"model: every request of a batch must use the same model ({self.model!r})")
        self._seen.add(custom_id)
        first_model = self.model is None
        if first_model:
            self.model = body["model"]
        # Only a line that escapes a surrogate can hold one (raw surrogates are no UTF-8): the
        # costly re-encoding of the body is paid by those lines alone.
        if _SURROGATE_ESCAPE.search(raw) and not _storable(json.dumps(body, ensure_ascii=False), nul_ok=True):
            return LineError(number, "invalid_body",
                             "body holds an unpaired surrogate (\\ud800-\\udfff), which is not text", custom_id)
        request = body if self._prepare is None else self._prepare(body)
        if isinstance(request, str):
            request = BodyRefusal(request)
        if isinstance(request, BodyRefusal):
            if request.whole_file:
                if first_model:  # a model that is not served is not the batch's model
                    self.model = None
                return LineError(number, request.code or "invalid_body", request.message)
            return LineError(number, request.code or "invalid_body", request.message, custom_id, request.param)
        return BatchLine(number, custom_id, body["model"], request)


def request_preparer(endpoint: str, registry: ModelRegistry, *, default_max_tokens: int) -> BodyPreparer:
    """The body rule of a batch line: the body is validated as a request of ``endpoint`` (as the
    endpoint itself would validate it, streaming refused) and turned into its job payload."""
    chat = endpoint == "/v1/chat/completions"

    def prepare(body: dict[str, Any]) -> dict[str, Any] | BodyRefusal:
        if registry.get(body["model"]) is None:  # the same for every line: the file's error
            return BodyRefusal(f"model: {body['model']!r} is not served here; served models: "
                               f"{', '.join(registry.names()) or 'none'}", "model", "model_not_found",
                               whole_file=True)
        if body.get("stream"):
            return BodyRefusal("stream: batch requests cannot stream", "stream", "invalid_value")
        try:
            if chat:
                prepared = prepare_chat(ChatCompletionRequest.model_validate(body), registry,
                                        default_max_tokens=default_max_tokens, stream=False)
            else:
                prepared = prepare_completion(CompletionRequest.model_validate(body), registry, stream=False)
        except ValidationError as exc:
            param, message = _validation_message(list(exc.errors()))  # type: ignore[arg-type]
            return BodyRefusal(message, param, "invalid_value")
        except ApiError as exc:
            message = f"{exc.param}: {exc.message}" if exc.param else exc.message
            return BodyRefusal(message, exc.param, exc.code or "invalid_value", whole_file=exc.status == 404)
        return prepared.payload

    return prepare
