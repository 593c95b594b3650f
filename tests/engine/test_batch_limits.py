"""Batch limits sized from the device when the caller gives none."""

from __future__ import annotations

from engine import LLM
from engine.config import LARGE_CARD_BYTES, default_batch_limits


def test_large_cards_get_the_large_limits_and_the_rest_keep_theirs():
    assert default_batch_limits("cuda", 141 * 10**9) == (1024, 16384)  # H200
    assert default_batch_limits("cuda", 80 * 10**9) == (1024, 16384)  # H100 80GB
    assert default_batch_limits("cuda", LARGE_CARD_BYTES - 1) == (256, 8192)
    assert default_batch_limits("cuda", 24 * 2**30) == (256, 8192)
    assert default_batch_limits("cpu", None) == (256, 2048)


def test_an_engine_fills_in_only_the_limits_left_open(tiny_model_dir):
    d = str(tiny_model_dir("llama"))
    sized = LLM(d, dtype="float32", num_kv_blocks=64).engine
    assert (sized.config.max_num_seqs, sized.config.max_num_batched_tokens) == (256, 2048)
    assert (sized.scheduler.max_num_seqs, sized.scheduler.max_num_batched_tokens) == (256, 2048)
    chosen = LLM(d, dtype="float32", num_kv_blocks=64, max_num_seqs=7).engine
    assert (chosen.config.max_num_seqs, chosen.config.max_num_batched_tokens) == (7, 2048)
