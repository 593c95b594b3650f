"""Overlapped steps (a step launched before the previous step's tokens are read back) give exactly
what steps run one at a time give: same tokens, texts, finish reasons and counts, when requests end
early (EOS, stop strings), are aborted mid-flight, reach the context limit, need min_tokens, or
count their latest token still on the device (penalties) or ask for logprobs, all of which keep the
overlap. The references are the engine run one step at a time (itself checked against transformers in
test_engine_parity) and transformers directly for the ends that only overlap can get wrong."""

from __future__ import annotations

import random

import pytest

from engine import LLM, Engine, SamplingParams

from test_engine_parity import hf_greedy


def _run_both(model_dir, prompts, params, **engine_kw):
    outs = {}
    for overlap in (False, True):
        llm = LLM(str(model_dir), dtype="float32", overlap_steps=overlap, **engine_kw)
        outs[overlap] = llm.generate(prompts, params)
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
        assert llm.engine.stats().generated_tokens_total == sum(len(o.token_ids) for o in outs[overlap])
    return outs[False], outs[True]


def _summary(outs):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in (o.outputs[0] for o in outs)]


def test_requests_ending_early_on_eos_and_stop_strings_match_step_by_step(smollm2_dir):
    questions = ["What is the capital of France?", "Name three colors.", "Count from one to five.",
                 "Say hello.", "Write one word.", "What is 2+2?"]
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    # Natural EOS for some, stop strings (one with regex metacharacters) for others, a cap for all.
    params = [SamplingParams(max_tokens=40, temperature=0),
              SamplingParams(max_tokens=40, temperature=0, stop=[","]),
              SamplingParams(max_tokens=40, temperature=0, stop=["three", "3"]),
              SamplingParams(max_tokens=40, temperature=0, stop=["."]),
              SamplingParams(max_tokens=6, temperature=0),
              SamplingParams(max_tokens=40, temperature=0, stop=["(.*)"])]
    sync, overlap = _run_both(smollm2_dir, prompts, params)
    assert _summary(overlap) == _summary(sync)
    reasons = {o.finish_reason for o in sync}
    assert reasons >= {"stop", "length"}, reasons  # both ends were exercised
    assert any(o.finish_reason == "stop" and o.outputs[0].stop_reason is None for o in sync), "no request hit EOS"


def test_overlapped_tokens_match_transformers_at_the_context_limit(tiny_model_dir):
    d = tiny_model_dir("llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (10, 30, 45)]
    # max_model_len 48: the requests stop at the context limit, not at max_tokens.
    llm = LLM(str(d), dtype="float32", overlap_steps=True, max_model_len=48)
    outs = llm.generate(prompts, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    expected = hf_greedy(d, prompts, [48 - len(p) for p in prompts])
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_min_tokens_holds_with_pending_tokens(smollm2_dir):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in ("Say yes.", "Say no.")]
    params = SamplingParams(max_tokens=30, min_tokens=12, temperature=0)
    sync, overlap = _run_both(smollm2_dir, prompts, [params, params])
    assert _summary(overlap) == _summary(sync)
    assert all(len(o.token_ids) >= 12 for o in overlap)


def test_requests_with_penalties_or_logprobs_keep_the_overlap_and_still_match(tiny_model_dir):
    d = tiny_model_dir("qwen3")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(4, 30))] for _ in range(6)]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=18, temperature=0, ignore_eos=True, presence_penalty=0.5,
                             frequency_penalty=0.4),
              SamplingParams(max_tokens=25, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, seed=11, ignore_eos=True)]
    sync, overlap = _run_both(d, prompts, params, max_num_batched_tokens=16)
    assert [o.token_ids for o in overlap] == [o.token_ids for o in sync]
    assert [len(o.logprobs) for o in overlap if o.logprobs is not None] == [12]
    assert [t.top for t in overlap[2].logprobs] == [t.top for t in sync[2].logprobs]
    assert [t.logprob for t in overlap[2].logprobs] == [t.logprob for t in sync[2].logprobs]

    # Still overlapped: a step returns the previous step's tokens, so the first returns nothing.
    engine = Engine(model=str(d), dtype="float32", overlap_steps=True)
    engine.add_request("p", prompts[0], params[1])
    engine.add_request("l", prompts[1], params[2])
    assert engine.step() == []
    assert {o.request_id for o in engine.step()} == {"p", "l"}


def test_abort_while_a_step_is_in_flight_frees_everything_and_spares_the_rest(tiny_model_dir):
    d = tiny_model_dir("mistral")
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 1000) for _ in range(12)] for _ in range(4)]
    engine = Engine(model=str(d), dtype="float32", overlap_steps=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    # Overlapped, a step returns the previous step's tokens: the first has nothing to give yet.
    assert engine.step() == []
    finished = {}
    for _ in range(5):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    aborted = engine.abort("r1")
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    assert 0 < len(aborted.outputs[0].token_ids) < 20
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r2", "r3"]
    expected = hf_greedy(d, [prompts[0], prompts[2], prompts[3]], [20, 20, 20])
    assert [finished[r].outputs[0].token_ids for r in ("r0", "r2", "r3")] == expected
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_streamed_deltas_add_up_to_the_final_text(smollm2_dir):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    engine = Engine(model=str(smollm2_dir), dtype="float32", overlap_steps=True)
    for i, q in enumerate(["Tell me a story.", "List four fruits."]):
        engine.add_request(f"q{i}", tok.apply_chat_template([{"role": "user", "content": q}]),
                           SamplingParams(max_tokens=30, temperature=0, stop=["banana"]))
    text: dict[str, str] = {}
    ids: dict[str, list[int]] = {}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            c = out.outputs[0]
            text[out.request_id] = text.get(out.request_id, "") + c.delta_text
            ids[out.request_id] = ids.get(out.request_id, []) + list(c.delta_token_ids)
            if out.finished:
                final[out.request_id] = c
    for rid, c in final.items():
        assert text[rid] == c.text
        assert ids[rid] == list(c.token_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_overlap_under_preemption_and_chunked_prefill_with_arrivals_mid_run(arch, tiny_model_dir):
    """Requests join while steps are in flight, the pool is too small (preemptions with a token
    pending), and prompts come in chunks: every output still equals transformers'."""
    d = tiny_model_dir(arch)
    rng = random.Random(21)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 40))] for _ in range(8)]
    max_tokens = [rng.randint(5, 24) for _ in prompts]
    engine = Engine(model=str(d), dtype="float32", overlap_steps=True, num_kv_blocks=20, block_size=4,
                    max_num_batched_tokens=11)
    done = {}
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished():
        if pending and engine.stats().steps % 3 == 0:
            i = pending.pop(0)
            engine.add_request(f"p{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0,
                                                                    ignore_eos=True))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.stats().preemptions > 0
    assert [done[f"p{i}"] for i in range(len(prompts))] == hf_greedy(d, prompts, max_tokens)
    assert engine.kv.num_free_blocks == engine.num_blocks
