"""One generated sequence: a scheduled request plus the text decoded for it so far."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request


@dataclass(eq=False)
class Sequence:
    """A request plus its text state: the text decoded so far, and how much of its text and of its
    tokens the caller has already been given (the rest is the next output's delta)."""

    request: Request
    detok: IncrementalDetokenizer | None  # None for a model without a tokenizer (token ids only)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
