"""The model card: what a Hugging Face model directory says about the model, read without torch.

The API checks prompts against a model's context and vocabulary and counts chat prompts with its
template; the engine sizes sequences by the same context length and stops on the ids of its
generation config. Both read those facts here, so that they agree on what a model can take.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what chat templates refer to


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory as a dict ({} when it has none)."""
    return _json(Path(model_dir) / "config.json")


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """generation_config.json of a model directory as a dict ({} when it has none)."""
    return _json(Path(model_dir) / "generation_config.json")


def context_length(config: Mapping[str, Any] | Any) -> int | None:
    """The longest sequence the model runs exactly, from its config (config.json as a dict, or a
    transformers config object); None when the config gives no max_position_embeddings.

    A sliding-window model (Mistral v0.1, Qwen with use_sliding_window) is capped at its window:
    the engine's paged attention is full attention, which agrees with sliding-window attention only
    while the sequence fits in the window.
    """
    def get(name: str, default: Any = None) -> Any:
        return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)

    limit = get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    window = get("sliding_window")
    if window and get("use_sliding_window", True):  # Qwen configs switch it off
        limit = min(limit, int(window))
    return limit


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """The vocabulary size of config.json (as a dict), or None when it gives none."""
    vocab = config.get("vocab_size")
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def read_chat_template(model_dir: str | Path) -> tuple[str | None, dict[str, str]]:
    """The chat template source of a model directory (None when it has none) and the special tokens
    it may refer to (``bos_token``...), where Hugging Face keeps them: tokenizer_config.json's
    ``chat_template`` (one string, or named templates of which ``default`` is used), else the file
    chat_template.jinja."""
    model_dir = Path(model_dir)
    config = _json(model_dir / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    jinja_file = model_dir / "chat_template.jinja"
    if not source and jinja_file.is_file():
        source = jinja_file.read_text()
    special: dict[str, str] = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return (source or None), special
