"""The models this API serves: their context length and vocabulary (`contract.model_card`, as the
engine reads them) and prompt token counts with the model's own tokenizer (tokenizer.json through
the `tokenizers` library, and the chat template rendered with Jinja as Hugging Face does), all
without torch."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.model_card import context_length, read_chat_template, read_config, vocab_size

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """The prompt or messages cannot be rendered for this model; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ServedModel:
    """One served model. ``context_length`` and ``vocab_size`` are None when its directory is unknown
    (the worker then does the checks)."""

    name: str
    path: Path | None
    context_length: int | None = None
    vocab_size: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _tokenizer: Any = None
    _template: Any = None
    _special: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    counts_tokens: bool = False  # prompts are counted here (the model directory has a tokenizer.json)

    def __post_init__(self) -> None:
        # Checked once: a stat per request costs more than the tokenization itself on some disks.
        self.counts_tokens = self.path is not None and (self.path / "tokenizer.json").is_file()

    def _load(self) -> None:
        # Loaded on first use, once: a tokenizer takes ~100 ms and the process may never need it.
        with self._lock:
            if self._tokenizer is not None or self.path is None:
                return
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            self._template, self._special = _compile_chat_template(self.path)

    def count_text(self, text: str) -> int:
        """Tokens of a plain prompt, with the special tokens the tokenizer adds by default."""
        self._load()
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def count_texts(self, texts: list[str]) -> list[int]:
        """Token counts of many prompts at once (the tokenizer runs them in parallel)."""
        self._load()
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        """Tokens of a conversation rendered with the chat template, ready for the reply."""
        self._load()
        if self._template is None:
            raise PromptError(f"model {self.name!r} has no chat template; send a prompt to /v1/completions instead",
                              "messages")
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except Exception as exc:
            raise PromptError(f"the model's chat template refused these messages: {exc}", "messages") from None
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def token_text(self, token_id: int) -> str:
        """The text of one token id (for logprobs)."""
        self._load()
        if self._tokenizer is None:
            return f"<{token_id}>"
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def _compile_chat_template(model_dir: Path) -> tuple[Any, dict[str, str]]:
    """The compiled chat template of a model directory (or None) and its special-token variables."""
    source, special = read_chat_template(model_dir)
    if source is None:
        return None, special
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The same environment options as transformers' chat templating, so the text (and the count)
    # matches what the worker's tokenizer renders.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(source), special


class ModelRegistry:
    """The served models by name."""

    def __init__(self, models: dict[str, str | None]) -> None:
        self._models: dict[str, ServedModel] = {}
        for name, where in models.items():
            path = Path(where).expanduser() if where else None
            model = ServedModel(name=name, path=path if path and path.is_dir() else None)
            if where and model.path is None:
                log.warning("model %s: directory %s not found; prompts are not counted here", name, where)
            if model.path is not None:
                config = read_config(model.path)
                model.context_length = context_length(config)
                model.vocab_size = vocab_size(config)
            self._models[name] = model

    def get(self, name: str) -> ServedModel | None:
        """The served model of that name, or None."""
        return self._models.get(name)

    def names(self) -> list[str]:
        """Served model names, sorted."""
        return sorted(self._models)

    def all(self) -> list[ServedModel]:
        """Every served model."""
        return [self._models[n] for n in self.names()]
