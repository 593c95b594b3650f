"""Hypothesis against the API's request models and the code that turns a validated request into a
job (`api.convert`, with the tiny model's real tokenizer and chat template): whatever a client
sends — malformed JSON, huge fields, deep nesting, unpaired surrogates, control characters, NUL,
template syntax, prompts of every length up to and past the context — the answer is a validation
error or a 4xx `ApiError` whose field is the one that was wrong, never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from api.convert import prepare_chat, prepare_completion, prepare_job
from api.errors import ApiError, _validation_message
from api.registry import ModelRegistry
from api.schemas.admin import KeyCreate, TenantCreate
from api.schemas.batches import BatchCreate
from api.schemas.jobs import JobCreate
from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from api.schemas.sampling import SamplingParams
from hostile_fixtures import BASES, CONTEXT, PATHS, TINY, deep, hostile, json_values, put, tiny_dir  # noqa: F401

MODELS: dict[str, type[BaseModel]] = {"job": JobCreate, "job_chat": JobCreate, "completion": CompletionRequest,
                                      "chat": ChatCompletionRequest}


@pytest.fixture(scope="module")
def registry(tiny_dir: Path) -> ModelRegistry:  # noqa: F811 - the imported fixture
    return ModelRegistry({TINY: str(tiny_dir)})


def _prepare(kind: str, req: Any, registry: ModelRegistry) -> Any:
    if kind.startswith("job"):
        return prepare_job(req, registry)
    if kind == "completion":
        return prepare_completion(req, registry, stream=False)
    return prepare_chat(req, registry, default_max_tokens=64, stream=False)


def _check(kind: str, body: Any, field: str | None, registry: ModelRegistry) -> str:
    """Validates ``body`` as the API does; returns the outcome, asserting that every refusal is a
    validation error or a 4xx naming ``field`` (when one field was made hostile)."""
    try:
        req = MODELS[kind].model_validate(body)
    except ValidationError as exc:
        param, message = _validation_message(list(exc.errors()))  # type: ignore[arg-type]
        assert message.strip(), exc
        if field is not None and param is not None:
            top = param.split(".")[0].split("[")[0]
            # a value that makes prompt and messages both present is reported on the whole body
            assert top == field, (field, param, message)
        return "invalid"
    try:
        prepared = _prepare(kind, req, registry)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message, (exc.status, exc.message)
        if field is not None and exc.param is not None:
            # the field itself, or max_tokens when a longer prompt leaves less room for it
            assert exc.param.split(".")[0].split("[")[0] == field or exc.param in (
                "max_tokens", "params.max_tokens", "min_tokens", "params.min_tokens"), (field, exc.param, exc.message)
        return "refused"
    json.dumps(prepared.payload, allow_nan=False).encode("utf-8")  # storable as the job's request
    return "ok"


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_hostile_value_in_any_field_is_refused_naming_that_field_or_accepted_cleanly(data, registry) -> None:
    kind = data.draw(st.sampled_from(sorted(BASES)), label="kind")
    path = data.draw(st.sampled_from(PATHS[kind]), label="path")
    value = data.draw(hostile, label="value")
    body = put(BASES[kind], path, value)
    event(_check(kind, body, path[0], registry))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_values | deep, kind=st.sampled_from(sorted(BASES)))
def test_any_json_document_as_a_whole_body_never_raises_anything_but_a_validation_error(body, kind, registry) -> None:
    _check(kind, body, None, registry)
    for model in (SamplingParams, BatchCreate, TenantCreate, KeyCreate):
        try:
            model.model_validate(body)
        except ValidationError as exc:
            assert _validation_message(list(exc.errors()))[1]  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"{", b"[" * 100_000, b'{"model": "tiny", "prompt": "\xff\xfe"}', b"\xef\xbb\xbf{}",
                     b'{"model": "tiny", "prompt": NaN}', b'{"model": "tiny", "prompt": "a\\ud800"}',
                     b'{"model": "tiny", "model": "x", "prompt": "a"}', b"null", b"1e999999"]),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"))))
def test_malformed_json_bytes_are_a_validation_error(raw: bytes) -> None:
    for model in (JobCreate, CompletionRequest, ChatCompletionRequest, BatchCreate):
        try:
            model.model_validate_json(raw)
        except ValidationError as exc:
            assert _validation_message(list(exc.errors()))[1]  # type: ignore[arg-type]


# -- prompts of every length ------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, CONTEXT + 80), max_tokens=st.integers(1, CONTEXT + 10) | st.none(),
       as_text=st.booleans())
@example(n=CONTEXT - 1, max_tokens=1, as_text=False)
@example(n=CONTEXT, max_tokens=None, as_text=False)
@example(n=CONTEXT - 1, max_tokens=2, as_text=False)
@example(n=CONTEXT + 1, max_tokens=1, as_text=True)
def test_a_prompt_of_any_length_is_accepted_exactly_when_it_fits_the_context(n, max_tokens, as_text, registry) -> None:
    model = registry.get(TINY)
    assert model is not None and model.context_length == CONTEXT
    if as_text:
        prompt: Any = " hello" * n  # about one token a word, but counted for real below
        tokens = model.count_text(prompt)
    else:
        prompt, tokens = [7] * n, n
    params = {} if max_tokens is None else {"max_tokens": max_tokens}
    for kind, body in (("job", {"model": TINY, "prompt": prompt, "params": params}),
                       ("completion", {"model": TINY, "prompt": prompt, **params})):
        req = MODELS[kind].model_validate(body)
        try:
            prepared = _prepare(kind, req, registry)
        except ApiError as exc:
            assert exc.status == 400 and exc.code == "context_length_exceeded", exc.message
            if tokens >= CONTEXT:
                assert exc.param == "prompt" and str(tokens) in exc.message, exc.message
            else:
                assert max_tokens is not None and tokens + max_tokens > CONTEXT
                assert exc.param in ("params.max_tokens", "max_tokens") and str(max_tokens) in exc.message
            continue
        assert tokens < CONTEXT, f"a {tokens}-token prompt was accepted for a {CONTEXT}-token context"
        assert prepared.prompt_tokens == tokens
        assert tokens + prepared.max_tokens <= CONTEXT


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(words=st.integers(1, CONTEXT + 50), parts=st.integers(1, 3))
def test_a_conversation_past_the_context_is_refused_naming_messages(words, parts, registry) -> None:
    messages = [{"role": "user", "content": " hello" * (words // parts)} for _ in range(parts)]
    req = ChatCompletionRequest.model_validate({"model": TINY, "messages": messages})
    model = registry.get(TINY)
    tokens = model.count_messages([{"role": "user", "content": m["content"]} for m in messages])
    try:
        prepared = prepare_chat(req, registry, default_max_tokens=512, stream=False)
    except ApiError as exc:
        assert tokens >= CONTEXT and exc.param == "messages" and exc.code == "context_length_exceeded"
        return
    assert tokens < CONTEXT and prepared.max_tokens == min(512, CONTEXT - tokens)


# -- what validation lets through, the engine runs ----------------------------------------------------

EDGE_FLOATS = [0.0, 5e-324, 1e-45, 1e-40, 1e-38, 1e-30, 1e-6, 0.0099, 0.01, 0.5, 1.0, 2.0, 99.99, 100.0]
sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from(EDGE_FLOATS) | st.floats(0, 100),
    "top_p": st.sampled_from(EDGE_FLOATS) | st.floats(0, 1),
    "min_p": st.sampled_from(EDGE_FLOATS) | st.floats(0, 1),
    "top_k": st.sampled_from([0, 1, 2, 1_000_000]),
    "repetition_penalty": st.sampled_from(EDGE_FLOATS) | st.floats(0, 100),
    "presence_penalty": st.sampled_from([-2.0, -5e-324, 0.0, 2.0]) | st.floats(-2, 2),
    "frequency_penalty": st.sampled_from([-2.0, 5e-324, 2.0]) | st.floats(-2, 2),
    "seed": st.sampled_from([None, 0, -(2**63), 2**64 - 1]),
    "min_tokens": st.integers(0, 3), "ignore_eos": st.booleans(), "logprobs": st.sampled_from([None, 0, 20]),
    "stop_token_ids": st.lists(st.sampled_from([0, 1, 2, 2**31 - 1]), max_size=3),
})


@pytest.fixture(scope="module")
def llm(tiny_dir: Path):  # noqa: F811 - the imported fixture
    from engine import LLM

    return LLM(str(tiny_dir), device="cpu", dtype="float32")


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=sampling)
def test_sampling_values_the_api_accepts_never_crash_the_engine(params: dict, llm) -> None:
    from engine import SamplingParams as EngineParams

    try:
        accepted = SamplingParams.model_validate({"max_tokens": 3, **params})
    except ValidationError:
        event("refused by the API")
        return
    event("run")
    engine_params = EngineParams.from_dict(accepted.engine_dict())  # the worker's own check
    # Two requests in one batch, text and token ids (a crash of the step would take both down).
    outs = llm.generate(["Once upon a time", [5, 6, 7, 5, 6, 7]], engine_params)
    vocab = llm.engine.info.vocab_size
    for out in outs:
        assert out.finish_reason in ("stop", "length"), out
        assert all(0 <= t < vocab for t in out.token_ids), out.token_ids
