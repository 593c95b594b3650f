"""The OpenAI batch-line rules: what one line of a batch input file must be, and what it becomes.

A line is ``{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": {"model", ...}}``
with a custom_id unique in the file, a body that is a valid request of the endpoint, and the same
model as every other line. :class:`LineRules` checks the lines of one file in order and says what
became of each: a :class:`BatchLine` (the request its job stores) or a :class:`LineError` (an entry
of OpenAI's ``errors.data``). Nothing here touches the store: `api.batch_ingest` streams a file
through these rules into it.
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

# Checks one request body and turns it into the request its job stores: returns the request (a
# dict), or a message saying what is wrong with the body (a str).
BodyPreparer = Callable[[dict[str, Any]], "dict[str, Any] | str"]


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
    refused: such an error concerns that one request, not the file.
    """

    line: int | None
    code: str
    message: str
    custom_id: str | None = None

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
        # Only a line that escapes a surrogate can hold one (raw surrogates are no UTF-8): the
        # costly re-encoding of the body is paid by those lines alone.
        if _SURROGATE_ESCAPE.search(raw) and not _storable(json.dumps(body, ensure_ascii=False), nul_ok=True):
            return LineError(number, "invalid_body",
                             "body holds an unpaired surrogate (\\ud800-\\udfff), which is not text", custom_id)
        self._seen.add(custom_id)
        request = body if self._prepare is None else self._prepare(body)
        if isinstance(request, str):
            return LineError(number, "invalid_body", request, custom_id)
        if self.model is None:
            self.model = body["model"]
        elif body["model"] != self.model:
            return LineError(number, "invalid_body",
                             f"model: every request of a batch must use the same model ({self.model!r})")
        return BatchLine(number, custom_id, body["model"], request)


def request_preparer(endpoint: str, registry: ModelRegistry, *, default_max_tokens: int) -> BodyPreparer:
    """The body rule of a batch line: the body is validated as a request of ``endpoint`` (as the
    endpoint itself would validate it, streaming refused) and turned into its job payload."""
    chat = endpoint == "/v1/chat/completions"

    def prepare(body: dict[str, Any]) -> dict[str, Any] | str:
        if body.get("stream"):
            return "stream: batch requests cannot stream"
        try:
            if chat:
                prepared = prepare_chat(ChatCompletionRequest.model_validate(body), registry,
                                        default_max_tokens=default_max_tokens, stream=False)
            else:
                prepared = prepare_completion(CompletionRequest.model_validate(body), registry, stream=False)
        except ValidationError as exc:
            return _validation_message(list(exc.errors()))[1]  # type: ignore[arg-type]
        except ApiError as exc:
            return f"{exc.param}: {exc.message}" if exc.param else exc.message
        return prepared.payload

    return prepare
