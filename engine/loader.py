"""Finding, configuring and loading a model: a directory or a cached model's name in, (model, ModelInfo) out.

Weights come from a Hugging Face directory of one or more *.safetensors files, streamed tensor by
tensor into the already allocated model (so loading never holds two copies), or, with
`load_format="dummy"`, are drawn at random from the config alone, for benchmarks without downloads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from contract.model_card import context_length, read_generation_config
from engine.config import ModelInfo
from engine.models.llama import LlamaForCausalLM
from engine.parallel import TPGroup

# Architectures (config.json "architectures") and the model_type each one has.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

ModelSource = str | Path | dict | Any  # a directory, a cached model's or preset name, a config dict or object

# Where models are looked up by name when the caller gives no cache directory: one directory per
# model, named for it (`tokenmill fetch NAME` puts the built-in model there).
DEFAULT_CACHE_DIR = Path("~/.cache/tokenmill/models")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the engine implements."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported model architecture {what}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def architecture_of(hf_config: Any) -> str:
    """The supported architecture name of a config, or UnsupportedModelError naming what it is."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if archs:
        raise _unsupported(", ".join(repr(a) for a in archs))
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise _unsupported(f"of model_type {model_type!r}")


def resolve_model(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """The model directory for a directory path or the name of a model in the cache.

    A name is looked up as `<cache_dir>/<name>` (default cache `~/.cache/tokenmill/models`); the
    engine never downloads or converts anything. A name that is not there is a ValueError naming
    the command that fetches it (`tokenmill fetch NAME` for the built-in model).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return path
    name = str(name_or_path)
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    if name and Path(name).name == name:  # a bare name, not a path
        cached = root / name
        if (cached / "config.json").is_file():
            return cached
        raise ValueError(
            f"model {name!r} is neither a model directory nor in the model cache {str(root)!r}; "
            f"fetch it into the cache with `tokenmill fetch {name}` (built-in models), or give a "
            "Hugging Face model directory")
    raise ValueError(f"no model directory at {str(path)!r}; give a Hugging Face model directory or the "
                     "name of a model in the cache")


def _config_from_dict(data: dict) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    # checked before transformers sees it: AutoConfig fails obscurely on model types it lacks
    arch = architecture_of(SimpleNamespace(architectures=data.get("architectures"), model_type=data.get("model_type")))
    model_type = data.pop("model_type", None) or SUPPORTED_ARCHITECTURES[arch]
    data.setdefault("architectures", [arch])
    return AutoConfig.for_model(model_type, **data)


def load_hf_config(model_dir: str | Path) -> Any:
    """The transformers config of a model directory, checked to be a supported architecture.

    The architecture is checked on the raw config.json first, so that an unsupported model fails
    with UnsupportedModelError naming it, even one transformers itself does not know.
    """
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(model_dir)!r} is not a model directory: no config.json") from None
    return _config_from_dict(data)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def max_model_len_of(hf_config: Any) -> int:
    """The longest sequence the model runs exactly: the model card's context length
    (`contract.model_card.context_length`, capped at a sliding window), which the API checks too."""
    limit = context_length(hf_config)
    if limit is None:
        raise ValueError("the model config gives no max_position_embeddings (an integer)")
    return limit


def model_info(
    hf_config: Any,
    generation_config: dict | None = None,
    extra_eos_token_ids: Iterable[int] = (),
) -> ModelInfo:
    """The shape facts of a model the engine needs, from its config.

    End-of-sequence ids are those of generation_config.json (`eos_token_id`, an int or a list),
    then the config's own, then `extra_eos_token_ids` (e.g. the tokenizer's), without duplicates.
    """
    heads = hf_config.num_attention_heads
    eos: list[int] = []
    for value in ((generation_config or {}).get("eos_token_id"), getattr(hf_config, "eos_token_id", None), list(extra_eos_token_ids)):
        for i in _ids(value):
            if i not in eos:
                eos.append(i)
    return ModelInfo(
        architecture=architecture_of(hf_config),
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        hidden_size=hf_config.hidden_size,
        vocab_size=hf_config.vocab_size,
        max_model_len=max_model_len_of(hf_config),
        eos_token_ids=eos,
    )


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device | str) -> torch.dtype:
    """The torch dtype for `dtype`: "auto" is the config's dtype on CUDA and float32 elsewhere
    (half precision matmuls on a CPU are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype, None)
        return config_dtype if isinstance(config_dtype, torch.dtype) and config_dtype.is_floating_point else torch.bfloat16
    try:
        result = getattr(torch, dtype)
    except AttributeError:
        result = None
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return result


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """Every tensor of the directory's *.safetensors files (sharded or not), one at a time, as a lazy
    slice (`safe_open(...).get_slice`): the reader indexes it for the part it needs, and only that
    part is read from the file. A slice is valid until the next one is asked for."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / f for f in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise ValueError(f"no *.safetensors files in {str(model_dir)!r}")
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights: norms at 1, everything else normal(0, std), reproducible from `seed`."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm") or name.endswith("layernorm"):
            param.fill_(1.0)
            continue
        # a generator per tensor, seeded from its index: the same weights whatever the device order
        gen = torch.Generator(device=param.device).manual_seed(seed * 100003 + i)
        param.normal_(0.0, std, generator=gen)


def dummy_config(shape_name: str, **overrides: Any) -> Any:
    """A transformers config with the real architecture shape of a well-known model, no files needed.

    Presets: "llama-3.1-8b", "qwen3-0.6b", "smollm2-135m". `overrides` replace fields (e.g.
    `num_hidden_layers=2` for a quick test).
    """
    if shape_name not in DUMMY_SHAPES:
        raise ValueError(f"unknown dummy shape {shape_name!r}; known: {', '.join(DUMMY_SHAPES)}")
    return _config_from_dict({**DUMMY_SHAPES[shape_name], **overrides})


DUMMY_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
}


def load_model(
    model: ModelSource,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    load_format: str = "auto",
    cache_dir: Path | None = None,
    seed: int = 0,
    tp: TPGroup | None = None,
    weights_dir: Path | None = None,
) -> tuple[LlamaForCausalLM, ModelInfo]:
    """Builds the model and its ModelInfo.

    `model` is a model directory, the name of a model in the cache, a transformers config object or a config
    dict; with `load_format="dummy"` it may also be a `dummy_config` preset name, and weights are
    random (seeded by `seed`) so no weight files are read. "auto" and "safetensors" read the
    directory's *.safetensors files, which needs a directory. With `tp`, the model is this rank's
    shard (`engine.parallel`), and the ModelInfo is still the whole model's. `weights_dir` is where
    the weights of a `model` given as a config object are.
    """
    hf_config, model_dir, generation = read_model_config(model, load_format, cache_dir)
    model_dir = model_dir or weights_dir
    info = model_info(hf_config, generation)  # also rejects unsupported architectures
    if load_format != "dummy" and model_dir is None:
        raise ValueError(f"load_format={load_format!r} needs a model directory; use load_format='dummy' for a config")

    torch_dtype = resolve_dtype(dtype, hf_config, device)
    net = LlamaForCausalLM(hf_config, torch_dtype, device, tp)
    if load_format == "dummy":
        init_dummy_weights(net, seed)
    else:
        net.load_weights(iter_safetensors(model_dir))
    net.eval()
    return net, info


def read_model_config(model: ModelSource, load_format: str = "auto",
                      cache_dir: Path | None = None) -> tuple[Any, Path | None, dict]:
    """(transformers config, model directory or None, generation config) of a model source."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be auto, safetensors or dummy, got {load_format!r}")
    if isinstance(model, dict):
        return _config_from_dict(model), None, {}
    if isinstance(model, (str, Path)):
        if load_format == "dummy" and str(model) in DUMMY_SHAPES and not Path(model).is_dir():
            return dummy_config(str(model)), None, {}
        model_dir = resolve_model(model, cache_dir)
        return load_hf_config(model_dir), model_dir, read_generation_config(model_dir)
    return model, None, {}
