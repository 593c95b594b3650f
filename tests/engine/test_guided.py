"""Guided decoding on the built-in SmolLM2: the output of every guided request matches what it
asked for. 200 random JSON schemas run as one batch through one engine, each output parsed and
validated against its schema (jsonschema, an independent validator); guided_choice returns one of
the choices; guided_regex output fully matches; a grammar that can only end when max_tokens runs
out ends by length; compiled grammars are reused."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams

N_SCHEMAS = 200
KEYS = ["id", "name", "city", "ok", "tags", "score", "kind", "year"]
WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no"]


def leaves() -> st.SearchStrategy[dict[str, Any]]:
    """Small scalar schemas: each has short valid instances, so a request can complete."""
    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.integers(-50, 50).flatmap(lambda lo: st.integers(lo, lo + 1000).map(
            lambda hi: {"type": "integer", "minimum": lo, "maximum": hi})),
        st.integers(1, 8).map(lambda k: {"type": "string", "maxLength": k}),
        st.integers(1, 4).map(lambda k: {"type": "string", "pattern": f"^[a-z]{{1,{k}}}$"}),
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
        st.sampled_from(WORDS + [1, 2, True]).map(lambda c: {"const": c}),
    )


def schemas() -> st.SearchStrategy[dict[str, Any]]:
    """Objects (all properties required, nothing else allowed) and short arrays, two levels deep."""
    def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False})

    def arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])})

    level1 = st.one_of(leaves(), objects(leaves()), arrays(leaves()))
    return st.one_of(objects(level1), arrays(objects(leaves())))


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), max_num_seqs=256)


def ask(llm: LLM, prompts: list[str], params: list[SamplingParams]):
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], params)


@pytest.mark.slow
@settings(max_examples=1, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(schemas(), min_size=N_SCHEMAS, max_size=N_SCHEMAS))
def test_every_output_of_200_random_schemas_validates(llm: LLM, batch: list[dict[str, Any]]) -> None:
    for schema in batch:
        jsonschema.Draft202012Validator.check_schema(schema)
    params = [SamplingParams(max_tokens=96, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        for i, schema in enumerate(batch)]
    prompts = [f"Reply with JSON matching this schema: {json.dumps(s)}" for s in batch]
    outs = ask(llm, prompts, params)
    for schema, out in zip(batch, outs):
        assert out.finish_reason == "stop", (schema, out.text, out.finish_reason)
        jsonschema.validate(json.loads(out.text), schema)


def test_guided_choice_returns_one_of_the_choices(llm: LLM) -> None:
    choices = ["positive", "negative", "neutral", "mixed feelings"]
    prompts = ["I loved the film.", "Terrible service.", "It was a Tuesday.", "Good food, slow waiter."] * 3
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=i, guided_choice=choices) for i in range(12)]
    outs = ask(llm, [f"Sentiment of: {p}" for p in prompts], params)
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs), [o.text for o in outs]


def test_guided_regex_output_fully_matches(llm: LLM) -> None:
    patterns = [r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}", r"(yes|no), because [a-z ]{5,20}\.",
                r"0x[0-9a-f]{6}", r"[a-z]+@[a-z]+\.(com|org)"]
    rng = random.Random(0)
    params = [SamplingParams(max_tokens=40, temperature=0.7, seed=rng.randrange(1000), guided_regex=p)
              for p in patterns]
    outs = ask(llm, ["A date", "A person's name", "Is water wet?", "A colour in hex", "An email address"], params)
    for pattern, out in zip(patterns, outs):
        assert out.finish_reason == "stop", (pattern, out.text)
        assert re.fullmatch(pattern, out.text, flags=re.ASCII), (pattern, out.text)


def test_a_grammar_that_can_only_end_at_max_tokens_ends_by_length(llm: LLM) -> None:
    out = ask(llm, ["Digits"], [SamplingParams(max_tokens=4, temperature=0, guided_regex=r"[0-9]{40}")])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and out.text.isdigit()


def test_n_completions_each_follow_the_grammar_and_grammars_are_compiled_once(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog", "owl"]},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["animal", "legs"], "additionalProperties": False}
    before = (llm.engine.guided.compiled_misses, llm.engine.guided.compiled_hits)
    params = SamplingParams(n=4, max_tokens=40, temperature=1.0, seed=3, guided_json=schema)
    outs = ask(llm, ["An animal as JSON", "Another animal as JSON"], [params, params])
    for out in outs:
        for choice in out.outputs:
            assert choice.finish_reason == "stop", choice.text
            jsonschema.validate(json.loads(choice.text), schema)
    assert llm.engine.guided.compiled_misses - before[0] <= 1  # one schema: compiled once at most
    assert llm.engine.guided.compiled_hits - before[1] >= 1
    assert llm.engine.guided.active == 0  # finished requests keep no grammar state


def test_an_invalid_grammar_is_refused_before_it_runs() -> None:
    with pytest.raises(ValueError, match="guided_regex"):
        SamplingParams(guided_regex="(unclosed")
    with pytest.raises(ValueError, match=r"response_format\.json_schema\.schema.*uniqueItems"):
        SamplingParams(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(guided_choice=["a"], min_tokens=2)
