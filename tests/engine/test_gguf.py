"""The built-in SmolLM2 model as the GGUF converter (engine.gguf) wrote it, and the engine finding
it by name in the cache without fetching anything."""

from __future__ import annotations

import json

import pytest

from engine import Engine
from engine.loader import resolve_model
from engine.tokenizer import Tokenizer

NAME = "smollm2-135m-instruct"


def test_a_name_in_the_cache_resolves_to_its_directory_untouched(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (smollm2_dir / "config.json").stat().st_mtime_ns)
    again = resolve_model(NAME, smollm2_dir.parent)
    assert again == smollm2_dir
    assert (weights.stat().st_mtime_ns, (smollm2_dir / "config.json").stat().st_mtime_ns) == before
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_a_name_missing_from_the_cache_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(ValueError, match=f"`tokenmill fetch {NAME}`") as err:
        Engine(model=NAME, cache_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the engine downloads and converts nothing


def test_converted_config_has_the_real_smollm2_shape(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (3, 1536, 49152)
    assert config["tie_word_embeddings"] is True
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


def test_tokenizer_has_the_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token_ids == [2] and tok.vocab_size == 49152
    assert tok.encode("Hello world") == [19556, 905]  # SmolLM2 adds no BOS
    assert tok.decode(tok.encode("Hello world") + [2]) == "Hello world"


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hi", "list"),
        ([], "non-empty"),
        (["hi"], r"messages\[0\]"),
        ([{"role": "user"}], "'content'"),
        ([{"role": "user", "content": 3}], "string"),
    ],
)
def test_malformed_messages_are_a_clear_error(smollm2_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        smollm2_tokenizer.apply_chat_template(messages)


def test_transformers_greedy_chat_answer_mentions_paris(smollm2_dir, smollm2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):].tolist())
