"""Input the engine cannot run gets a clear error naming the problem, and the rest of the batch
still runs to the same result it would have alone."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


GOOD = [[5, 6, 7, 8, 9], [40, 41, 42]]


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_bad_prompts_fail_alone_and_the_others_are_unchanged(llm):
    alone = [o.token_ids for o in llm.generate(GOOD, greedy())]
    too_long = list(range(3, 3 + 600))  # the tiny model's context is 512
    outs = llm.generate([GOOD[0], "", too_long, [10**7], GOOD[1]], greedy())
    assert [outs[0].token_ids, outs[4].token_ids] == alone
    assert outs[1].finish_reason == "error" and "empty" in outs[1].error
    assert outs[2].finish_reason == "error" and "600 tokens" in outs[2].error and "512" in outs[2].error
    assert outs[3].finish_reason == "error" and "vocabulary" in outs[3].error


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("logprobs", 99, "logprobs must be an integer in 0..20"),
    ("n", 0, "n must be an integer in 1..16"),
    ("n", 17, "n must be an integer in 1..16"),
])
def test_invalid_sampling_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingParams(**{field: value})


def test_unknown_sampling_field_is_named():
    with pytest.raises(ValueError, match="unknown sampling field.*'temprature'"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_request_larger_than_the_whole_kv_pool_fails_alone(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=4, block_size=4)
    outs = llm.generate([[5, 6, 7], list(range(3, 30))], greedy(8))
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 8
    assert outs[1].finish_reason == "error" and "KV cache blocks" in outs[1].error


def test_generate_cli_reports_bad_lines_and_processes_the_rest(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tokenmill.cli import app

    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "id": "a"}).encode(),
        b'{"prompt": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        json.dumps({"prompt": [5, 6], "max_tokens": 0}).encode(),
        json.dumps({"prompt": [5, 6], "temprature": 1}).encode(),
        b"not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
        json.dumps({"prompt": ""}).encode(),
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    dst = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(dst), "--model",
                                      str(tiny_model_dir("llama")), "--no-progress"])
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 8))
    assert rows[0]["id"] == "a" and rows[0]["completion_tokens"] == 4 and "error" not in rows[0]
    assert "line 2: invalid UTF-8" in rows[1]["error"]
    assert "line 3" in rows[2]["error"] and "max_tokens" in rows[2]["error"]
    assert "temprature" in rows[3]["error"]
    assert "invalid JSON" in rows[4]["error"]
    assert rows[5]["completion_tokens"] >= 1 and "error" not in rows[5]
    assert "empty" in rows[6]["error"]
    assert result.exit_code == 1  # some lines failed
    assert "2 of 7 lines done, 5 errors" in result.output
