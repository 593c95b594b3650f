"""Converting a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model directory.

The engine loads only safetensors directories; this turns a GGUF into one: the weights dequantized
to float32, tensor names mapped to Hugging Face's, llama.cpp's q/k row order undone, and the
config, generation config and tokenizer files written from the GGUF's metadata. It only reads the
given file and writes the given directory: fetching a model is the caller's
(`tokenmill.builtin_model` for the built-in one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# GGUF (llama.cpp) tensor names -> Hugging Face Llama names; `{}` is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows as interleaved (even, odd) pairs for its rotary kernel, where
    Hugging Face keeps the two rotary halves in separate blocks; this puts the halves back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_llama_config(reader) -> dict:
    """A Hugging Face LlamaConfig dict from a llama-architecture GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama")
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": hidden // heads,
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        # GGUF stores float32; round so the config reads 1e-05, not 9.999999747378752e-06
        "rms_norm_eps": float(f"{_field(reader, p + 'attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": None if pad is None else int(pad),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def iter_gguf_weights(reader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized float32 tensors of a llama GGUF file, with Hugging Face names and layout."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # a copy: unquantized tensors come back as read-only views of the memory-mapped file
        w = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # ggml lists dimensions innermost first; numpy's shape is the row-major one torch wants
        w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.ascontiguousarray(w))


def convert_gguf(gguf_path: Path, out_dir: Path, torch_dtype: str = "bfloat16") -> None:
    """Writes a Hugging Face model directory (config, generation config, tokenizer, safetensors
    weights in float32) for the llama-architecture GGUF file `gguf_path` into `out_dir`.

    `torch_dtype` is recorded in config.json as the dtype to run in on a GPU; the weights are stored
    in float32 so that no precision of the dequantized values is lost.
    """
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))
    config = gguf_llama_config(reader)
    config["torch_dtype"] = torch_dtype
    weights = dict(iter_gguf_weights(reader, config))
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # transformers rebuilds the tokenizer (vocab, merges, special tokens, chat template) from the
    # GGUF metadata; saving it gives the ordinary tokenizer.json + tokenizer_config.json files.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
