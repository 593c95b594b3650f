"""Structured output through the API with the official `openai` client (vLLM's fields as
extra_body, as vLLM's users send them): the output follows the guide even on the tiny random
model, and an invalid schema, regex or grammar is a 400 naming the field that is never stored."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import TINY, Server, wait_job


@pytest.fixture
def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_chat_guided_choice(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Pick"}], n=3,
                                         max_tokens=8, temperature=1.0, extra_body={"guided_choice": ["alpha", "beta"]})
    assert all(c.message.content in ("alpha", "beta") and c.finish_reason == "stop" for c in out.choices)


def test_completion_guided_regex(client: openai.OpenAI) -> None:
    out = client.completions.create(model=TINY, prompt="A code:", max_tokens=12, temperature=0.8,
                                    extra_body={"guided_regex": r"[A-F]{3}-[0-9]{2}"})
    assert out.choices[0].finish_reason == "stop" and re.fullmatch(r"[A-F]{3}-[0-9]{2}", out.choices[0].text)


def test_jobs_api_guided_grammar(api: httpx.Client) -> None:
    grammar = 'root ::= "up" | "down" | "left" | "right"'  # GBNF, as llama.cpp and vLLM users write it
    r = api.post("/v1/jobs", json={"model": TINY, "prompt": "Where?", "params": {"guided_grammar": grammar,
                                                                                "max_tokens": 6}})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["result"]["output_text"] in ("up", "down", "left", "right"), job


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                                          "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": 'root ::= ( "a" '}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a+", "min_tokens": 3}, "min_tokens"),
])
def test_an_invalid_guide_is_a_400_naming_the_field(client: openai.OpenAI, api: httpx.Client, body: dict,
                                                    param: str) -> None:
    before = api.get("/v1/jobs", params={"limit": 1}).json()["data"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body=body)
    assert e.value.body["param"] == param, e.value.body  # type: ignore[index]
    r = api.post("/v1/jobs", json={"model": TINY, "prompt": "x", "params": body})
    assert r.status_code == 400 and r.json()["error"]["param"] == f"params.{param}", r.text
    assert api.get("/v1/jobs", params={"limit": 1}).json()["data"] == before  # nothing stored


def test_checking_a_guide_imports_no_torch() -> None:
    code = ("import sys; from contract.guided import guided_problems; "
            "assert guided_problems({'guided_json': {'type': 'object'}}) == []; "
            "assert guided_problems({'guided_regex': '('}); "
            "bad = [m for m in ('torch', 'engine', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
