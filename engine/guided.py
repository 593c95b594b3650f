"""Guided decoding in the engine: each guided request's grammar state, and the mask of the tokens
its grammar allows next, applied to its logits row before the sampler.

The grammar comes from the request's sampling fields (`SamplingParams.grammar()`, checked by
`contract.guided` where the request was made); llguidance (docs/structured-output.md) compiles it
against the model's tokenizer and computes, each step, a bitmask of the allowed tokens. The masked
tokens' logits become -inf, so the sampler (greedy, top-k/top-p/min-p, seeded draws, logprobs)
runs unchanged on what is left; the grammar's end allows only EOS.

Cost: requests without a grammar pay nothing, and a step with no guided request skips all of it.
Compiled grammars are kept by grammar text (a bulk batch usually repeats one schema), each request
getting a copy of the compiled matcher. The masks of step N are computed on the host after step
N's forward pass was launched, so on a GPU they overlap its work; they need step N-1's tokens,
which is why a step with guided requests is not overlapped with the next one (engine.engine).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.request import Request
from engine.tokenizer import Tokenizer

COMPILED_CACHE = 256  # compiled grammars kept, least recently used dropped first


class GuidedDecoder:
    """Grammar state per guided request, and the per-step masks.

    `tokenizer` is the model's (None: the model has no tokenizer, and guided requests are
    refused); `vocab_size` the model's logit columns; `eos_token_ids` what ends a sequence (the
    grammar's end allows these).
    """

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll_tokenizer: Any = None  # built on the first guided request (about a second)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._matchers: dict[int, Any] = {}  # id(request) -> its matcher
        self._words = (vocab_size + 31) // 32
        self.compiled_hits = 0
        self.compiled_misses = 0

    @property
    def active(self) -> int:
        """How many live requests are guided."""
        return len(self._matchers)

    def is_guided(self, request: Request) -> bool:
        """Whether the request has a grammar."""
        return id(request) in self._matchers

    # -- requests ----------------------------------------------------------------------------
    def add(self, requests: Sequence[Request], grammar: str) -> None:
        """Gives each of `requests` (the n completions of one prompt) its own state of `grammar`.
        Raises ValueError if it cannot be used with this model."""
        template = self._compile(grammar)
        for request in requests:
            self._matchers[id(request)] = template.deep_copy()

    def remove(self, request: Request) -> None:
        """Forgets a finished request's state."""
        self._matchers.pop(id(request), None)

    def _compile(self, grammar: str) -> Any:
        from llguidance import LLMatcher

        template = self._compiled.get(grammar)
        if template is not None:
            self._compiled.move_to_end(grammar)
            self.compiled_hits += 1
            return template
        self.compiled_misses += 1
        template = LLMatcher(self._tokenizer_for_grammars(), grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"the grammar cannot be used with this model: {template.get_error()}")
        self._compiled[grammar] = template
        if len(self._compiled) > COMPILED_CACHE:
            self._compiled.popitem(last=False)
        return template

    def _tokenizer_for_grammars(self) -> Any:
        if self._ll_tokenizer is None:
            if self._tokenizer is None:
                raise ValueError("guided decoding needs the model's tokenizer; this model has none (dummy weights)")
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer.hf, n_vocab=self._vocab_size,
                                                              eos_token=self._eos)
        return self._ll_tokenizer

    # -- the step ----------------------------------------------------------------------------
    def mask(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Sets to -inf, in the rows of guided requests (row i is `requests[i]`), the logits of
        every token their grammar does not allow next. Returns `logits` (changed in place)."""
        rows = [i for i, r in enumerate(requests) if id(r) in self._matchers]
        if not rows:
            return logits
        import llguidance.numpy as llnp

        bits = np.full((len(rows), self._words), -1, dtype=np.int32)
        for j, i in enumerate(rows):
            llnp.fill_next_token_bitmask(self._matchers[id(requests[i])], bits, j)
        allowed = _unpack(torch.from_numpy(bits).to(logits.device, non_blocking=True), logits.shape[1])
        index = torch.tensor(rows, device=logits.device)
        with torch.inference_mode():  # the runner's logits are an inference tensor
            logits[index] = logits[index].masked_fill(~allowed, -math.inf)
        return logits

    def accept(self, request: Request, token: int) -> str | None:
        """Advances the request's grammar by its sampled `token`. Returns "stop" once the grammar
        has ended (nothing but its end may follow), "error" if the token broke it, else None."""
        matcher = self._matchers.get(id(request))
        if matcher is None:
            return None
        if not matcher.consume_token(token):
            request.error = f"the sampled token {token} does not fit the grammar: {matcher.get_error()}"
            return "error"
        return "stop" if matcher.is_stopped() else None


def _unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[r, words] int32 bitmasks (bit b of word w: token 32 w + b) -> [r, vocab] bool."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    flat = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if flat.shape[1] < vocab:  # logit columns past the tokenizer's vocabulary: never allowed
        flat = torch.nn.functional.pad(flat, (0, vocab - flat.shape[1]), value=False)
    return flat[:, :vocab]
