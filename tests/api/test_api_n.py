"""n > 1 through every door that takes a job: the jobs API, completions, chat and batch lines, with
the official `openai` client where OpenAI has the endpoint. Each answer holds n choices with their
own finish reasons and logprobs; usage counts the prompt once and every completion token."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
from conftest import TINY, Server, wait_job


@pytest.fixture
def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_chat_with_n_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], n=4,
                                         max_tokens=5, temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    tokens = 0
    for c in out.choices:
        assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
        assert c.logprobs is not None and c.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        tokens += len(c.logprobs.content)
    assert out.usage is not None and out.usage.completion_tokens == tokens
    single = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # type: ignore[union-attr]  # counted once
    assert len({c.message.content for c in out.choices}) > 1
    again = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], n=4,
                                           max_tokens=5, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_completions_with_n_choices_and_the_limits(client: openai.OpenAI) -> None:
    out = client.completions.create(model=TINY, prompt="Once upon a time", n=16, max_tokens=3, temperature=1.0,
                                    logprobs=1)
    assert sorted(c.index for c in out.choices) == list(range(16))
    assert out.usage is not None
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", n=17)
    assert e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", n=2, stream=True)
    assert e.value.body["param"] == "n"  # type: ignore[index]


def test_jobs_api_with_n(api: httpx.Client) -> None:
    r = api.post("/v1/jobs", json={"model": TINY, "prompt": "Tell me", "params": {"n": 3, "max_tokens": 4,
                                                                                 "logprobs": 0}})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["status"] == "succeeded"
    choices = job["result"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert job["result"]["output_text"] == choices[0]["text"]
    assert job["usage"]["completion_tokens"] == sum(len(c["logprobs"]) for c in choices)
    assert api.post("/v1/jobs", json={"model": TINY, "prompt": "x", "params": {"n": 0}}).json()["error"]["param"] \
        == "params.n"


def test_batch_lines_with_n(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"n{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY, "messages": [{"role": "user", "content": f"Go {i}"}], "max_tokens": 3,
                       "n": 2 + i}} for i in range(3)]
    f = client.files.create(file=("n.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (b := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert b.status == "completed"
    out = {o["custom_id"]: o for o in map(json.loads, client.files.content(b.output_file_id).text.splitlines())}
    for i in range(3):
        body = out[f"n{i}"]["response"]["body"]
        assert [c["index"] for c in body["choices"]] == list(range(2 + i))
