"""Building an engine's parts from its config: load the model and tokenizer, size the KV pool, and
set up the cache manager, scheduler, runner and sampler for them. `Engine` takes the result and
only runs steps."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.config import EngineConfig, ModelInfo, default_batch_limits, default_priority_yield
from engine.kv_cache import KVCacheManager
from engine.kv_sizing import num_kv_blocks
from engine.loader import load_model, read_model_config, resolve_model
from engine.parallel import check_tp_shape
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.tp_ranks import TPRanks


@dataclass
class EngineParts:
    """What an engine is made of: the loaded model with its facts, and the components sized for it."""

    config: EngineConfig
    device: torch.device
    model: torch.nn.Module
    info: ModelInfo
    dtype: torch.dtype
    tokenizer: Tokenizer | None  # None for dummy weights: prompts are token ids
    eos_token_ids: list[int]
    max_model_len: int
    num_blocks: int
    kv: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    overlap_steps: bool
    tp: "TPRanks | None" = None  # ranks 1..N-1 of a tensor-parallel engine


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Loads `config.model` on `config.device` and builds every part the engine runs with (batch
    limits the config leaves open are sized from the device first)."""
    config = with_batch_limits(config)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    if config.load_format == "dummy" and not _is_model_dir(config.model):
        model_src: Any = config.model
    else:
        model_src = resolve_model(config.model, config.cache_dir)
    tp = _start_ranks(config, model_src) if config.tensor_parallel_size > 1 else None
    try:
        model, info = load_model(model_src, device=device, dtype=config.dtype, load_format=config.load_format,
                                 cache_dir=config.cache_dir, seed=config.seed,
                                 tp=tp.group if tp is not None else None)
        if tp is not None:
            tp.wait_loaded()
        dtype = next(model.parameters()).dtype
        tokenizer = Tokenizer(model_src) if _has_tokenizer(model_src) else None
        eos = list(info.eos_token_ids)
        if tokenizer is not None:
            eos = sorted(set(eos) | set(tokenizer.eos_token_ids))
        max_model_len = min(config.max_model_len or info.max_model_len, info.max_model_len)
        local = tp.group.local_info(info) if tp is not None else info  # this rank's KV heads
        if tp is not None and config.num_kv_blocks is None:
            tp.kv_budgets(config.max_num_batched_tokens, config.max_num_seqs, config.block_size)
        num_blocks = num_kv_blocks(config, model, local, device, dtype, max_model_len,
                                   other_budgets=tp.collect if tp is not None and config.num_kv_blocks is None else None)
        if tp is not None:
            tp.allocate_kv(num_blocks)
        kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        runner = ModelRunner(model, local, num_blocks, config.block_size, device, dtype,
                             max_num_seqs=config.max_num_seqs,
                             max_num_batched_tokens=config.max_num_batched_tokens,
                             max_model_len=max_model_len, enforce_eager=config.enforce_eager, tp=tp)
    except BaseException:
        if tp is not None:
            tp.close()
        raise
    return EngineParts(
        config=config, device=device, model=model, info=info, dtype=dtype, tokenizer=tokenizer,
        eos_token_ids=eos, max_model_len=max_model_len, num_blocks=num_blocks, kv=kv,
        scheduler=Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens,
                            priority_yield=(default_priority_yield(device.type) if config.priority_yield is None
                                            else config.priority_yield)),
        runner=runner, sampler=Sampler(info.vocab_size, eos, seed=config.seed),
        overlap_steps=device.type == "cuda" if config.overlap_steps is None else config.overlap_steps, tp=tp)


def _start_ranks(config: EngineConfig, model_src: Any) -> "TPRanks":
    """Checks that the model splits `tensor_parallel_size` ways, then starts ranks 1..N-1."""
    from engine.tp_ranks import TPRanks

    hf_config, model_dir, _ = read_model_config(model_src, config.load_format, config.cache_dir)
    heads = hf_config.num_attention_heads
    check_tp_shape(heads, getattr(hf_config, "num_key_value_heads", None) or heads,
                   hf_config.intermediate_size, config.tensor_parallel_size)
    # The ranks get the config as plain fields: they need not import transformers (seconds each).
    return TPRanks(config, SimpleNamespace(**hf_config.to_dict()), model_dir)


def with_batch_limits(config: EngineConfig) -> EngineConfig:
    """The config with the batch limits it leaves open filled in from the device."""
    if config.max_num_seqs is not None and config.max_num_batched_tokens is not None:
        return config
    device = torch.device(config.device)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    seqs, tokens = default_batch_limits(device.type, memory)
    return dataclasses.replace(config, max_num_seqs=config.max_num_seqs or seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens or tokens)


def _is_model_dir(model: Any) -> bool:
    return isinstance(model, (str, Path)) and Path(model).is_dir()


def _has_tokenizer(model_src: Any) -> bool:
    if not isinstance(model_src, (str, Path)):
        return False
    d = Path(model_src)
    return d.is_dir() and any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
