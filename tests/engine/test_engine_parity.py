"""Greedy generation through the whole engine equals transformers' `generate`, token for token,
for every supported architecture, with prefix caching on and off, chunked prefill forced, and
preemption forced by a KV pool too small for the batch; each with steps run one at a time and
overlapped (a step launched before the previous step's tokens are read)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
MODES = {
    "plain": dict(enable_prefix_caching=False),
    "prefix-cache": dict(enable_prefix_caching=True),
    "chunked-prefill": dict(enable_prefix_caching=True, max_num_batched_tokens=7),
    "preemption": dict(enable_prefix_caching=True, num_kv_blocks=18, block_size=4),
}
MAX_TOKENS = [12, 20, 7, 16, 9, 14]


def make_prompts(seed: int, vocab: int) -> list[list[int]]:
    """Mixed lengths; three prompts share a 21-token prefix (more than a block, not block-aligned)."""
    rng = random.Random(seed)
    def rand(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]
    shared = rand(21)
    return [shared + rand(5), rand(40), shared + rand(1), rand(3), shared + rand(17), rand(11)]


def hf_greedy(model_dir, prompts, max_tokens, dtype=torch.float32) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run to max_tokens, as ignore_eos does
    outs = []
    with torch.inference_mode():
        for p, n in zip(prompts, max_tokens):
            ids = torch.tensor([p])
            full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(full[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    cache: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def get(arch: str):
        if arch not in cache:
            d = tiny_model_dir(arch)
            prompts = make_prompts(ARCHS.index(arch), 1000)
            cache[arch] = (prompts, hf_greedy(d, prompts, MAX_TOKENS))
        return cache[arch]

    return get


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, mode, overlap, tiny_model_dir, references):
    prompts, expected = references(arch)
    llm = LLM(str(tiny_model_dir(arch)), dtype="float32", overlap_steps=overlap, **MODES[mode])
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    stats = llm.engine.stats()
    if mode == "preemption":
        assert stats.preemptions > 0, "the pool was meant to be too small for the whole batch"
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks  # nothing leaked
    if mode == "prefix-cache":
        # The same prompts again: their full blocks now come from the cache, same tokens out.
        again = llm.generate(prompts, params)
        assert [o.token_ids for o in again] == expected
        assert all(o.cached_tokens >= 16 * ((len(p) - 1) // 16) for o, p in zip(again, prompts))
        assert llm.engine.stats().prefix_cache_hit_tokens > stats.prefix_cache_hit_tokens


@pytest.fixture(scope="module")
def smol_reference(smollm2_dir):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    convs = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Name three colors.", "Write one sentence about the sea.")]
    prompts = [tok.apply_chat_template(c) for c in convs]
    prompts.append(prompts[0][:-3] + tok.encode(" Tell me about Paris."))
    max_tokens = [24, 16, 20, 12]
    return prompts, max_tokens, hf_greedy(smollm2_dir, prompts, max_tokens)


@pytest.mark.parametrize("mode", ["prefix-cache", "preemption"])
def test_smollm2_greedy_matches_transformers(mode, smollm2_dir, smol_reference):
    prompts, max_tokens, expected = smol_reference
    kwargs = dict(MODES[mode])
    if mode == "preemption":
        kwargs.update(num_kv_blocks=20, block_size=4, max_num_batched_tokens=32)
    llm = LLM(str(smollm2_dir), dtype="float32", **kwargs)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    if mode == "preemption":
        assert llm.engine.stats().preemptions > 0
