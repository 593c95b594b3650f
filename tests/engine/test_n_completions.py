"""n > 1: one prompt, n completions. The n copies share the prompt's KV blocks (the prompt is
computed once, not n times), each completion has its own finish reason and logprobs, usage counts
the prompt once, and choice i of a seeded request is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in "
          "Mainz put together movable metal type, an oil-based ink and a press adapted from those "
          "used for wine. Tell me in one sentence what changed")


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), max_num_seqs=32)


def test_the_n_copies_compute_the_prompt_once(llm: LLM) -> None:
    llm.engine.kv.reset_prefix_cache()
    before = llm.engine.stats()
    long_prompt = " ".join([PROMPT] * 3)
    out = llm.generate(long_prompt, SamplingParams(n=8, max_tokens=6, temperature=1.0, seed=3))[0]
    after = llm.engine.stats()
    prompt = len(out.prompt_token_ids)
    block = llm.engine.block_size
    shared = (prompt - 1) // block * block  # the full blocks the 7 others find in the cache
    computed = after.prefill_tokens_total - before.prefill_tokens_total
    assert prompt > 8 * block
    # Once in full, then only each copy's last, partial block (at most a block): not 8 prompts.
    assert computed == prompt + 7 * (prompt - shared) and prompt - shared <= block
    assert computed < 2 * prompt
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 7 * shared
    assert len(out.outputs) == 8 and [o.index for o in out.outputs] == list(range(8))
    assert out.prompt_tokens == prompt  # usage: the prompt once
    assert out.completion_tokens == sum(len(o.token_ids) for o in out.outputs)


def test_each_completion_has_its_own_finish_reason_and_logprobs(llm: LLM) -> None:
    params = SamplingParams(n=6, max_tokens=5, temperature=1.5, seed=11, logprobs=2,
                            stop_token_ids=[11, 28, 30])  # common tokens: some copies stop early
    out = llm.generate(PROMPT, params)[0]
    reasons = [o.finish_reason for o in out.outputs]
    assert set(reasons) <= {"stop", "length"}
    for o in out.outputs:
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
        assert [lp.token_id for lp in o.logprobs] == o.token_ids
        assert all(len(lp.top) == 2 for lp in o.logprobs)
        assert (o.finish_reason == "length") == (len(o.token_ids) == 5 and o.token_ids[-1] not in (11, 28, 30))
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # sampled: the copies differ


def test_choice_i_of_a_seeded_request_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1234)
    first = llm.generate(PROMPT, params)[0]
    # Again, now in a batch with other requests: each choice draws the same tokens.
    again = llm.generate([PROMPT, "Hello there"], [params, SamplingParams(n=3, max_tokens=8, seed=5)])[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
