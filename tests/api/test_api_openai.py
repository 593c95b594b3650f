"""The official `openai` client, unchanged, against the live server: models, completions, chat,
streaming (with usage), and its error classes for our 4xx answers."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from conftest import TINY, Server

from api.registry import ModelRegistry


@pytest.fixture
def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY]
    assert client.models.retrieve(TINY).id == TINY


def test_completion_with_usage(client: openai.OpenAI) -> None:
    out = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert out.object == "text_completion"
    assert len(out.choices) == 1 and isinstance(out.choices[0].text, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_greedy_completion_is_deterministic(client: openai.OpenAI) -> None:
    a = client.completions.create(model=TINY, prompt="The sky is", max_tokens=8, temperature=0)
    b = client.completions.create(model=TINY, prompt="The sky is", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=TINY, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=5, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage is not None and out.usage.prompt_tokens > 10  # the chat template adds tokens


def test_chat_prompt_tokens_match_the_workers_count(client: openai.OpenAI, tiny_dir: Path) -> None:
    # The API counts with tokenizers + Jinja, the worker with transformers: they must agree, or the
    # context checks would be off.
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Count me, exactly: 1 2 3."}]
    out = client.chat.completions.create(model=TINY, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    registry = ModelRegistry({TINY: str(tiny_dir)})
    assert out.usage is not None
    assert registry.get(TINY).count_messages(messages) == out.usage.prompt_tokens  # type: ignore[union-attr]
    text = client.completions.create(model=TINY, prompt="Count me too: 4 5 6.", max_tokens=1)
    assert registry.get(TINY).count_text("Count me too: 4 5 6.") == text.usage.prompt_tokens  # type: ignore[union-attr]


def test_streaming_completion_and_chat_with_usage(client: openai.OpenAI) -> None:
    full = client.completions.create(model=TINY, prompt="Stream", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=TINY, prompt="Stream", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")

    chat_chunks = list(client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].choices[0].finish_reason in ("stop", "length")
    content = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
    ref = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0)
    assert content == ref.choices[0].message.content


def test_logprobs_come_back_in_openai_shape(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == out.usage.completion_tokens
    assert len(lp.content[0].top_logprobs) == 2
    comp = client.completions.create(model=TINY, prompt="Hi", max_tokens=3, logprobs=1, temperature=0)
    assert comp.choices[0].logprobs is not None and len(comp.choices[0].logprobs.tokens) >= 1


def test_client_errors_map_to_openai_exceptions(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", n=17)
    assert e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x", max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "word " * 2000}])
    assert e.value.body["param"] == "messages"  # type: ignore[index]
    assert e.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="tm-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
