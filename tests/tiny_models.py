"""Tiny random-weight Hugging Face model directories, one per supported architecture variant.

Each is written with transformers' own `save_pretrained` (config.json, generation_config.json,
model.safetensors), plus the SmolLM2 tokenizer, so that the engine and transformers can be compared
on exactly the same files. Sizes are tiny (hidden 64, 2 layers) but every feature of the family is
switched on somewhere: GQA and MQA, llama3 rope scaling, q/k/v bias, q/k norm with a head_dim that
is not hidden/heads, tied and untied embeddings.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

# Common to all: small, and an initializer_range large enough that greedy logits are not near-ties.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.15,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

TINY_ARCHS: dict[str, dict[str, Any]] = {
    # untied embeddings, GQA 4:2
    "llama": {"model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": False},
    # Llama-3.1 frequency scaling with a short original context, so that every band (kept,
    # interpolated, divided) of the scaling is exercised by a 16-dim head; tied, MQA
    "llama3": {
        "model_type": "llama",
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    # a sliding window longer than the context: full attention is then exact
    "mistral": {"model_type": "mistral", "num_key_value_heads": 1, "tie_word_embeddings": False, "sliding_window": 4096},
    # q/k/v bias, tied
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True},
    # q/k norm and head_dim 32 != 64 / 4, untied
    "qwen3": {"model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": False},
}

_TOKENIZER_SKIP = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Copies the tokenizer files (not config or weights) of a model directory into `out_dir`."""
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in _TOKENIZER_SKIP and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out_dir / f.name)


def tiny_config(arch: str, vocab_size: int) -> Any:
    """The transformers config of tiny variant `arch` (a key of TINY_ARCHS)."""
    from transformers import AutoConfig

    fields = {**_BASE, **TINY_ARCHS[arch], "vocab_size": vocab_size}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def make_tiny_model(
    arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, max_shard_size: str | None = None
) -> Path:
    """Writes tiny random model `arch` with the tokenizer of `tokenizer_dir` into `out_dir`.

    Biases and norm weights are randomised too (transformers initialises them to 0 and 1), so a
    model that ignored them would not pass for equal. `max_shard_size` splits the weights into
    several safetensors files with an index.
    """
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    # the vocabulary covers every id the tokenizer can produce (a fast read of tokenizer.json)
    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    config = tiny_config(arch, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir
