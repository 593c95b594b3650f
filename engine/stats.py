"""The engine's live figures, as one plain object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Live figures of the engine, for metrics and monitoring."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int  # prompt tokens of the requests added (a prompt once per completion)
    prefill_tokens_total: int  # prompt tokens the model computed (cache hits are not computed)
    generated_tokens_total: int
    prefix_cache_hit_tokens: int
    preemptions: int
    steps: int
    last_batch_size: int  # requests that ran in the latest step
    peak_batch_size: int  # most requests that ran together in one step so far
