"""The model's own tokenizer (transformers / tokenizers), with its chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from contract.model_card import read_generation_config
from engine.loader import load_hf_config, model_info


def _validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} objects, "
            f"got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(f"messages[{i}] lacks {' and '.join(repr(k) for k in missing)}")
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{i}][{key!r}] must be a string, got {type(m[key]).__name__}")
    return messages


class Tokenizer:
    """Text <-> token ids for one model directory, as the model's Hugging Face tokenizer does it.

    `eos_token_ids` gathers every id that ends a sequence: generation_config.json's, the config's
    and the tokenizer's own EOS token.
    """

    def __init__(self, model_dir: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        extra = list(extra_eos_token_ids)
        if self.hf.eos_token_id is not None:
            extra.append(int(self.hf.eos_token_id))
        try:
            config = load_hf_config(model_dir)
            self.eos_token_ids: list[int] = model_info(config, read_generation_config(model_dir), extra).eos_token_ids
        except (ValueError, OSError):
            # a tokenizer-only directory: the tokenizer's own EOS is all there is
            self.eos_token_ids = list(dict.fromkeys(extra))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens (e.g. BOS) the tokenizer adds by default."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return list(self.hf.encode(text))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the
        assistant's reply (add_generation_prompt). Malformed messages are a ValueError."""
        _validate_messages(messages)
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass a plain prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template already writes any BOS it wants; encoding must not add a second one
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
