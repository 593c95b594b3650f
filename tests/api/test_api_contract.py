"""Contracts that need no server: the API never imports torch or the engine, and its sampling
parameters agree with the engine's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from api.schemas.sampling import MAX_LOGPROBS, SamplingParams


def test_the_api_process_imports_neither_torch_nor_the_engine() -> None:
    code = ("import sys; from api import create_app, ApiConfig; import tokenmill.cli_api; "
            "create_app(ApiConfig(database_url='sqlite:///:memory:')).openapi(); "
            "bad = [m for m in ('torch', 'engine', 'transformers', 'triton', 'kernels') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sampling_fields_and_limits_match_the_engine() -> None:
    from engine.sampling_params import MAX_LOGPROBS as ENGINE_MAX_LOGPROBS
    from engine.sampling_params import SamplingParams as EngineParams

    assert set(SamplingParams.model_fields) == set(EngineParams.field_names())
    assert MAX_LOGPROBS == ENGINE_MAX_LOGPROBS
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
