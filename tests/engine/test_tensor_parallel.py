"""Tensor parallelism on the CPU (gloo): an engine split over 2 and 4 processes generates exactly what
one process does, greedy in float32, token for token, for Llama (4 query heads per KV head, so its
one KV head is replicated), Qwen2 (q/k/v bias) and Qwen3 (q/k norm, 2 KV heads for 4 ranks), also
with chunked prefill and preemption forced; each rank holds 1/N of the weights and of the KV heads;
a rank that dies ends the engine with an error naming it, at once, and one that hangs after the
collective timeout, instead of a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import LLM, SamplingParams
from engine.parallel import TensorParallelError
from test_engine_parity import make_prompts

ARCHS = ["llama3", "qwen2", "qwen3"]
MODES = {
    "default": {},
    # chunks of 7 tokens, and a pool of 18 blocks of 4 tokens that cannot hold the whole batch
    "chunked-preemption": dict(max_num_batched_tokens=7, num_kv_blocks=18, block_size=4),
}
MAX_TOKENS = [6, 10, 4, 8, 5, 7]


def _params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """Per architecture: (prompts, TP=1 token ids, TP=1 memory, replicated bytes of one rank)."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            prompts = make_prompts(ARCHS.index(arch), 1000)
            with LLM(str(tiny_model_dir(arch)), dtype="float32") as llm:
                tokens = [o.token_ids for o in llm.generate(prompts, _params())]
                memory = llm.engine.memory_by_rank()[0]
                # Held whole by every rank: the norms (and no biases: none of these has o/down bias).
                replicated = sum(p.numel() * p.element_size() for n, p in llm.engine.model.named_parameters()
                                 if n.endswith("norm") or n.endswith("_proj.bias") and ("o_proj" in n or "down" in n))
                kv_heads = llm.engine.info.num_kv_heads
                cache[arch] = (prompts, tokens, memory, replicated, kv_heads, llm.engine.num_blocks)
        return cache[arch]

    return get


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_greedy_equals_one_process(arch, tp, mode, tiny_model_dir, single):
    prompts, expected, memory, replicated, kv_heads, blocks = single(arch)
    with LLM(str(tiny_model_dir(arch)), dtype="float32", tensor_parallel_size=tp, **MODES[mode]) as llm:
        outs = llm.generate(prompts, _params())
        assert [o.token_ids for o in outs] == expected
        engine = llm.engine
        assert engine.kv.num_free_blocks == engine.num_blocks  # nothing leaked
        if mode == "chunked-preemption":
            assert engine.stats().preemptions > 0, "the pool was meant to be too small for the whole batch"
            return
        ranks = engine.memory_by_rank()
    assert len(ranks) == tp
    assert engine.num_blocks == blocks
    # Each rank: 1/N of the weights (within 5%: the vocabulary rows padded to a multiple of N) plus
    # what every rank holds whole; its share of the KV heads, or one replicated head.
    local_kv_heads = kv_heads // tp if kv_heads >= tp else 1
    for r in ranks:
        assert memory["weights"] / tp <= r["weights"] <= memory["weights"] / tp * 1.05 + replicated
        assert r["kv_cache"] == memory["kv_cache"] * local_kv_heads // kv_heads


def test_a_model_that_does_not_split_is_refused_before_any_process_starts(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not fit the model: num_attention_heads 4"):
        LLM(str(tiny_model_dir("qwen3")), dtype="float32", tensor_parallel_size=3)


def test_a_dead_rank_ends_the_engine_with_an_error_naming_it(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("qwen3")), dtype="float32", tensor_parallel_size=2)
    try:
        prompts = make_prompts(0, 1000)[:2]
        assert llm.generate(prompts, _params()[:2])[0].token_ids
        os.kill(llm.engine.tp.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate(prompts, _params()[:2])
        # gloo sees the closed sockets at once; nothing waits for the collective timeout
        assert time.monotonic() - start < 30
        # The engine stays down: a later call fails at once with the same error.
        llm.engine.add_request("again", prompts[0], _params()[0])
        with pytest.raises(TensorParallelError, match="rank 1"):
            llm.engine.step()
    finally:
        llm.close()


def test_a_hung_rank_ends_the_engine_after_the_collective_timeout(tiny_model_dir):
    # A stopped (not dead) rank keeps its sockets open, so only the collective timeout can end the
    # wait. Its default (300 s, room for a first step's kernel compilations on a GPU) is too long
    # to sit through in a test; what is checked is that the timeout, whatever it is, ends it.
    llm = LLM(str(tiny_model_dir("qwen3")), dtype="float32", tensor_parallel_size=2, distributed_timeout_s=5)
    try:
        prompts = make_prompts(0, 1000)[:1]
        os.kill(llm.engine.tp.pids[0], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"collective timed out after 5 s \(distributed_timeout_s\)"):
            llm.generate(prompts, _params()[:1])
        assert time.monotonic() - start < 5 + 30
    finally:
        llm.close()
