"""How many KV cache blocks the engine gets: given, measured from free GPU memory, or a fixed
CPU budget, and never more than every sequence at full length could use."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import EngineConfig, ModelInfo
from kernels import AttnMetadata

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on CPU when neither blocks nor bytes are given


def kv_bytes_per_block(info: ModelInfo, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * info.num_layers * block_size * info.num_kv_heads * info.head_dim * itemsize


@torch.inference_mode()
def profile_kv_cache_bytes(model: torch.nn.Module, info: ModelInfo, device: torch.device,
                           max_num_batched_tokens: int, max_num_seqs: int, block_size: int,
                           gpu_memory_utilization: float) -> int:
    """Bytes of GPU memory the KV cache may take: `gpu_memory_utilization` of the card, less
    what is in use (weights, CUDA context, other processes) and less the peak a step of
    `max_num_batched_tokens` tokens needs on top of that (measured by running one, as vLLM does).
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t = max_num_batched_tokens
    # One block shared by every layer: slots of -1 write nothing, and every key is read from
    # block 0, so the warm-up needs no real pool.
    dtype = next(model.parameters()).dtype
    cache = torch.zeros((1, block_size, info.num_kv_heads, info.head_dim), dtype=dtype, device=device)
    caches = [(cache, cache)] * info.num_layers
    ids = torch.randint(0, info.vocab_size, (t,), device=device)
    positions = torch.arange(t, device=device) % info.max_model_len
    meta = AttnMetadata(
        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
        context_lens=torch.tensor([t], dtype=torch.int32, device=device),
        block_tables=torch.zeros((1, -(-t // block_size)), dtype=torch.int32, device=device),
        max_query_len=t, max_context_len=t)
    hidden = model(ids, positions, caches, meta)
    logits = model.compute_logits(hidden[:min(max_num_seqs, t)])
    # The sampler's temporaries on a full batch of logits: about two more copies of them.
    # (Under tensor parallelism only rank 0 gets logits, and only rank 0 samples.)
    work = torch.softmax(logits, dim=-1).cumsum(dim=-1) if logits is not None else None
    del hidden, logits, work, caches, cache, ids, positions, meta
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * gpu_memory_utilization) - (total - free) - peak
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB card, "
            f"{(total - free) / 2**30:.1f} GiB in use, a {t}-token step needs {peak / 2**30:.1f} GiB "
            f"more, gpu_memory_utilization={gpu_memory_utilization}; raise gpu_memory_utilization "
            "or lower max_num_batched_tokens")
    return budget


def kv_budget_bytes(config: EngineConfig, model: torch.nn.Module, info: ModelInfo, device: torch.device,
                    max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> int:
    """Bytes this process may give its KV pool: what is left on the card after a measured full step
    (CUDA), or `kv_cache_memory_bytes` (default 1 GiB) on a CPU."""
    if device.type == "cuda":
        # What a full step needs is measured by running one, so the pool takes the rest.
        return profile_kv_cache_bytes(model, info, device, max_num_batched_tokens, max_num_seqs,
                                      block_size, config.gpu_memory_utilization)
    return config.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES


def num_kv_blocks(config: EngineConfig, model: torch.nn.Module, info: ModelInfo, device: torch.device,
                  dtype: torch.dtype, max_model_len: int, other_budgets: Callable[[], list[int]] | None = None) -> int:
    """The KV pool's size in blocks: `config.num_kv_blocks` if given; else what fits in the memory
    left after a measured full step (CUDA) or in `kv_cache_memory_bytes` (default 1 GiB, CPU).

    `info` is this process's share of the model (its KV heads, under tensor parallelism), and
    `other_budgets` the other ranks' budgets, read after this one is measured: every rank's pool
    has the same number of blocks, so the smallest budget decides."""
    c = config
    if c.num_kv_blocks is not None:
        return c.num_kv_blocks
    per_block = kv_bytes_per_block(info, c.block_size, dtype)
    budget = kv_budget_bytes(c, model, info, device, c.max_num_batched_tokens, c.max_num_seqs, c.block_size)
    if other_budgets is not None:
        budget = min([budget, *other_budgets()])
    # More blocks than every sequence at full length could use is memory for nothing.
    useful = c.max_num_seqs * -(-max_model_len // c.block_size)
    return max(1, min(budget // per_block, useful))
