"""Output text a few tokens at a time, and what ends a request: stop strings and stop tokens.

Decoding the whole output again at every step costs O(length) per token; instead each step decodes a
small window: a few already-emitted tokens (the context that decoders such as SentencePiece's need
to get a leading space right) plus the new ones, and emits what the new tokens added. A token that
ends in the middle of a multi-byte character decodes to U+FFFD; the text is held back until the
character is complete, so a stream never shows half a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Already-emitted tokens kept in the window as context (vLLM and TGI also start from 5).
CONTEXT_TOKENS = 5
# Past this many undecided tokens the window is cut at an earlier character boundary, so that a long
# run of tokens that each end mid-character cannot make every step decode more.
MAX_PENDING_TOKENS = 8
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output tokens into text, step by step, never emitting half a character.

    `tokenizer` is a Hugging Face tokenizer (anything with `decode(ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=...)` and `all_special_ids`). The last prompt tokens are the first
    context, so the first output token decodes as it would after the prompt. For byte-level BPE
    tokenizers `text` equals `decode(output_ids)`; in general it is `decode(prompt + output)` minus
    the decoded prompt.

    Each step decodes the window twice: its context (once per rebase) and the whole window.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped special tokens add no text; leaving them out of the window keeps it small when a
        # model emits many of them (e.g. EOS over and over under ignore_eos).
        self._skipped = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        context = [t for t in prompt_token_ids if t not in self._skipped][-CONTEXT_TOKENS:]
        self._window: list[int] = context
        self._context = len(context)  # window[:_context] only gives the decoder its context
        self._context_text: str | None = None  # decode(window[:_context]), once per rebase
        self._sent = 0  # characters past the context text already emitted
        self._chunks: list[str] = []
        self._text = ""
        self._text_stale = False

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._text_stale:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
            self._text_stale = False
        return self._text

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Adds the newly generated tokens and returns only the text they completed (maybe "")."""
        added = [t for t in new_token_ids if t not in self._skipped]
        if not added:
            return ""
        self._window.extend(added)
        return self._emit(force=False)

    def flush(self) -> str:
        """Emits whatever is held back (a trailing incomplete character decodes to U+FFFD).

        Call once when the request finishes so that `text` equals the full decode.
        """
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        if len(self._window) == self._context:
            return ""
        context_text = self._context_of_window()
        new = self._decode(self._window)[len(context_text) :]
        complete = force or not new.endswith(REPLACEMENT_CHAR)
        boundary = None
        if not complete and len(self._window) - self._context > MAX_PENDING_TOKENS:
            boundary = self._last_character_boundary(context_text)
            # Not one boundary in the window: invalid bytes, not a character being spelled out.
            complete = boundary is None
        # Bytes already decoded into whole characters never change; only the incomplete tail may.
        stable = new if complete else new.rstrip(REPLACEMENT_CHAR)
        out = stable[self._sent :]
        self._sent = max(self._sent, len(stable))
        if complete:
            # The tokens just decoded become the next step's context; older ones are dropped.
            self._rebase(len(self._window), len(new))
        elif boundary is not None:
            self._rebase(*boundary)
        if out:
            self._chunks.append(out)
            self._text_stale = True
        return out

    def _rebase(self, end: int, consumed: int) -> None:
        """Makes window[_context:end] the new context; `consumed` is its length in characters."""
        self._window = self._window[self._context :]
        self._context = end - self._context
        self._context_text = None
        self._sent = max(0, self._sent - consumed)

    def _last_character_boundary(self, context_text: str) -> tuple[int, int] | None:
        """The last pending token boundary that ends a whole character: (end, characters)."""
        for end in range(len(self._window) - 1, self._context, -1):
            text = self._decode(self._window[:end])
            if not text.endswith(REPLACEMENT_CHAR):
                return end, len(text) - len(context_text)
        return None

    def _context_of_window(self) -> str:
        if self._context_text is None:
            self._context_text = self._decode(self._window[: self._context])
        return self._context_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )


def find_stop(text: str, new_text_len: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Finds the earliest stop string that the last `new_text_len` characters of `text` completed.

    Returns (index, stop) where `text[:index]` is the output to keep (the stop string is not
    returned), or None. Only the tail that can hold a new match is searched: the new text plus, for
    each stop, its length minus one characters before it. Of two matches at the same index the one
    listed first wins.
    """
    if new_text_len <= 0 or not stops:
        return None
    best: tuple[int, str] | None = None
    end = len(text)
    for stop in stops:
        start = max(0, end - new_text_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` a stream must hold back: they may begin a stop string.

    That is the length of the longest suffix of `text` that is a proper prefix of some stop string;
    once more text comes, either it completes the stop (cut there) or the held characters are safe.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def check_stop_token(request: Any, token_id: int, eos_token_ids: Sequence[int]) -> str | None:
    """"stop" if `token_id`, just appended to the request's output, ends it; else None.

    EOS ends it unless `params.ignore_eos`; `params.stop_token_ids` always do; neither does while
    the output (this token included) is no longer than `params.min_tokens` (the sampler already
    masks them there, so this only guards outputs that did not come from it). When the token is one
    of `stop_token_ids` the caller records it as the request's `stop_reason` (vLLM reports EOS as
    None). The "length" limit (`max_tokens`) is the engine's to check, after this.
    """
    params = request.params
    if len(request.output_token_ids) <= params.min_tokens:
        return None
    if token_id in params.stop_token_ids:
        return "stop"
    if not params.ignore_eos and token_id in eos_token_ids:
        return "stop"
    return None
