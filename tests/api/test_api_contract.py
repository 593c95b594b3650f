"""Contracts that need no server: the API never imports torch or the engine, and its sampling
parameters agree with the engine's (both take them from `contract.sampling`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.registry import ModelRegistry
from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from api.schemas.sampling import SamplingParams
from contract.sampling import BOUNDS


def test_the_api_process_imports_neither_torch_nor_the_engine() -> None:
    code = ("import sys; from api import create_app, ApiConfig; import tokenmill.cli_api; "
            "create_app(ApiConfig(database_url='sqlite:///:memory:')).openapi(); "
            "bad = [m for m in ('torch', 'engine', 'transformers', 'triton', 'kernels') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sampling_fields_and_limits_match_the_engine() -> None:
    from engine.sampling_params import SamplingParams as EngineParams

    assert set(SamplingParams.model_fields) == set(EngineParams.field_names())
    defaults = EngineParams().to_dict()
    ours = SamplingParams().model_dump()
    for name, value in defaults.items():
        if name in ("max_tokens", "stop", "stop_token_ids"):
            continue  # the API leaves them unset (None) and lets the engine's default apply
        assert ours[name] == value, name


@pytest.mark.parametrize("params", [
    {"n": 1, "max_tokens": 5, "min_tokens": 2, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "min_p": 0.1,
     "presence_penalty": 1, "frequency_penalty": -1, "repetition_penalty": 1.1, "seed": 7, "stop": ["x"],
     "stop_token_ids": [2], "ignore_eos": True, "logprobs": 2, "skip_special_tokens": False},
    {"stop": "end"},
])
def test_what_the_api_accepts_the_engine_accepts(params: dict) -> None:
    from engine.sampling_params import SamplingParams as EngineParams

    EngineParams.from_dict(SamplingParams.model_validate(params).engine_dict())


@pytest.mark.parametrize("params", [
    {"max_tokens": 0}, {"min_tokens": 5, "max_tokens": 2}, {"temperature": -0.1}, {"top_k": -1},
    {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"presence_penalty": 3}, {"repetition_penalty": 0},
    {"seed": 1.5}, {"stop": [""]}, {"stop_token_ids": [-1]}, {"logprobs": 21}, {"max_tokens": True},
    {"temperature": "hot"},
])
def test_what_the_engine_refuses_the_api_refuses(params: dict) -> None:
    # (n > 1 the engine runs, but the API refuses it: a job stores one output.)
    from engine.sampling_params import SamplingParams as EngineParams

    with pytest.raises(ValidationError):
        SamplingParams.model_validate(params)
    with pytest.raises((ValueError, TypeError)):
        EngineParams.from_dict({"max_tokens": 16, **params})


def _edges(name: str) -> tuple[list[object], list[object]]:
    """Values just inside and just outside a field's bounds (and a wrong type)."""
    rule = BOUNDS[name]
    step = 1 if rule.integer else 0.001
    inside: list[object] = []
    outside: list[object] = [rule.low + 0.5 if rule.integer else "1"]
    if rule.low is not None:
        inside.append(rule.low + step if rule.low_open else rule.low)
        outside.append(rule.low if rule.low_open else rule.low - step)
    if rule.upper is not None:
        inside.append(rule.upper)
        outside.append(rule.upper + step)
    return inside, outside


def _api_bodies(name: str, value: object) -> list[tuple[type, dict]]:
    """Bodies of every API request model that carry ``value`` in the field named ``name``."""
    chat: dict = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    bodies: list[tuple[type, dict]] = [(SamplingParams, {name: value})]
    if name == "logprobs":
        return bodies + [(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": value}),
                         (ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": value})]
    bodies += [(CompletionRequest, {"model": "m", "prompt": "x", name: value}), (ChatCompletionRequest, {**chat, name: value})]
    if name == "max_tokens":
        bodies.append((ChatCompletionRequest, {**chat, "max_completion_tokens": value}))
    return bodies


@pytest.mark.parametrize("name", sorted(set(BOUNDS) - {"n"}))  # n: the API takes only 1 (one output per job)
def test_the_api_and_the_engine_draw_each_sampling_bound_where_the_contract_does(name: str) -> None:
    from engine.sampling_params import SamplingParams as EngineParams

    inside, outside = _edges(name)
    for value in inside:
        EngineParams.from_dict({name: value})
        for model, body in _api_bodies(name, value):
            model.model_validate(body)
    for value in outside:
        with pytest.raises(ValueError, match=name):
            EngineParams.from_dict({name: value})
        for model, body in _api_bodies(name, value):
            with pytest.raises(ValidationError):
                model.model_validate(body)


_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 1000}


@pytest.mark.parametrize(("config", "expected"), [
    ({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}, 2048),
    ({"architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768, "sliding_window": 4096}, 4096),
    ({"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "sliding_window": 4096,
      "use_sliding_window": False}, 32768),
])
def test_the_api_and_the_engine_read_the_same_context_length(tmp_path: Path, config: dict, expected: int) -> None:
    from engine.loader import load_hf_config, model_info

    (tmp_path / "config.json").write_text(json.dumps({**_SHAPE, **config}))
    served = ModelRegistry({"m": str(tmp_path)}).get("m")
    assert served is not None
    assert served.context_length == model_info(load_hf_config(tmp_path)).max_model_len == expected
    assert served.vocab_size == 1000
