"""Guided decoding (structured output): what a request may ask its output to match, and the one
check of it.

A request names at most one of OpenAI's ``response_format`` (``{"type": "json_object"}`` or
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; ``{"type": "text"}`` asks
for nothing) and vLLM's ``guided_json`` (a JSON schema), ``guided_regex``, ``guided_choice`` (a list
of strings) and ``guided_grammar`` (Lark or GBNF/EBNF), under vLLM's names so its users' payloads
run unchanged. :func:`grammar_of` turns that into one grammar for the grammar library, llguidance
(docs/structured-output.md says why that one), and :func:`guided_problems` checks it, so that an
invalid schema, regex or grammar is refused where the request is made (the API's 400 naming the
field, `SamplingParams`' ValueError) and never reaches an engine. llguidance is torch-free and has
no Python dependencies: the API process validates with the very library the engine compiles with.

Plain Python (llguidance imported on first use): no torch, pydantic, FastAPI or SQL.
"""

from __future__ import annotations

import json
from typing import Any

GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
MAX_CHOICES = 1024  # guided_choice alternatives
MAX_GUIDE_CHARS = 1_000_000  # a schema (as JSON text), regex or grammar
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class GuideError(ValueError):
    """A guided-decoding field that cannot be used: ``param`` names it, the message says why."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):  # vLLM takes guided_json as a JSON text too
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GuideError(param, f"is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GuideError(param, f"a JSON schema must be an object, got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_GUIDE_CHARS:
        raise GuideError(param, f"a schema may have at most {MAX_GUIDE_CHARS} characters as JSON")
    return text


def _response_format(value: Any) -> tuple[str, str] | None:
    """(param, schema JSON text) of a response_format, or None for plain text."""
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMAT_TYPES:
        raise GuideError("response_format.type", f"must be one of {', '.join(RESPONSE_FORMAT_TYPES)}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", json.dumps({"type": "object"})
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise GuideError("response_format.json_schema",
                         'type "json_schema" needs json_schema: {"name", "schema", "strict"}')
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= 64):
        raise GuideError("response_format.json_schema.name", "must be a string of 1 to 64 characters")
    if "schema" not in spec:
        raise GuideError("response_format.json_schema.schema", "this field is required")
    return "response_format.json_schema.schema", _schema_text(spec["schema"], "response_format.json_schema.schema")


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise GuideError(param, "must be a non-empty string")
    if len(value) > MAX_GUIDE_CHARS:
        raise GuideError(param, f"may have at most {MAX_GUIDE_CHARS} characters")
    return value


def grammar_of(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(the field it came from, the llguidance grammar) that ``fields`` (a request's guided
    fields, None for those not given) ask the output to match, or None for free text.

    Raises GuideError naming the field when more than one is given or one is malformed; the
    grammar itself is checked by :func:`check_grammar`.
    """
    given = [name for name in GUIDED_FIELDS if fields.get(name) is not None]
    if given and given[0] == "response_format":
        fmt = _response_format(fields["response_format"])
        if fmt is None:
            given = given[1:]
    if len(given) > 1:
        raise GuideError(given[1], f"give at most one of {', '.join(GUIDED_FIELDS)} (got {', '.join(given)})")
    if not given:
        return None
    from llguidance import LLMatcher, grammar_from, regex_to_lark

    name = given[0]
    value = fields[name]
    if name == "response_format":
        assert fmt is not None
        param, schema = fmt
        return param, LLMatcher.grammar_from_json_schema(schema)
    if name == "guided_json":
        return name, LLMatcher.grammar_from_json_schema(_schema_text(value, name))
    if name == "guided_regex":
        # \d is [0-9], as in JSON Schema's patterns and other engines' guided_regex (the regex
        # library's own \d takes every Unicode digit, which a model then happily writes).
        return name, LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(_text(value, name), 'd')}/")
    if name == "guided_choice":
        if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise GuideError(name, f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
        # Each choice a quoted literal of a Lark grammar: exactly one of them, nothing else.
        return name, LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    try:
        return name, grammar_from("grammar", _text(value, name))  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise GuideError(name, str(exc)) from None


def check_grammar(param: str, grammar: str) -> None:
    """Raises GuideError naming ``param`` if llguidance cannot use ``grammar`` (an invalid
    schema, regex or grammar, or a JSON-schema keyword it does not enforce)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GuideError(param, f"invalid: {error.strip()}")


def guided_problems(fields: dict[str, Any]) -> list[str]:
    """What is wrong with a request's guided fields, one sentence each (empty when usable)."""
    try:
        found = grammar_of(fields)
        if found is not None:
            check_grammar(*found)
    except GuideError as exc:
        return [str(exc)]
    return []
