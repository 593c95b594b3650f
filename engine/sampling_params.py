"""What a caller may ask of one generation: lengths, randomness, penalties, stops, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

MAX_LOGPROBS = 20
# Below this a seen token's logit divided by the penalty overflows float32 (the penalty itself
# rounds to zero or a subnormal there): the row becomes inf/NaN and sampling reads past the vocabulary.
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    """Sampling parameters of one request, validated on creation (ValueError naming the field).

    temperature 0 is greedy. top_k 0 and top_p 1 and min_p 0 disable those filters. `logprobs`:
    None for none, N >= 0 for the chosen token's logprob plus the top N alternatives.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        errors = list(self._problems())
        if errors:
            raise ValueError("invalid sampling parameters: " + "; ".join(errors))

    def _problems(self):
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("n", "max_tokens", "min_tokens", "top_k"):
            if not is_int(getattr(self, name)):
                yield f"{name} must be an integer, got {getattr(self, name)!r}"
                return
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not is_num(getattr(self, name)):
                yield f"{name} must be a number, got {getattr(self, name)!r}"
                return
        if self.n < 1:
            yield f"n must be >= 1, got {self.n}"
        if self.max_tokens < 1:
            yield f"max_tokens must be >= 1, got {self.max_tokens}"
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            yield f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}"
        if self.temperature < 0:
            yield f"temperature must be >= 0, got {self.temperature}"
        if self.top_k < 0:
            yield f"top_k must be >= 0 (0 disables it), got {self.top_k}"
        if not 0 < self.top_p <= 1:
            yield f"top_p must be in (0, 1], got {self.top_p}"
        if not 0 <= self.min_p <= 1:
            yield f"min_p must be in [0, 1], got {self.min_p}"
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                yield f"{name} must be in [-2, 2], got {getattr(self, name)}"
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            yield f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}, got {self.repetition_penalty}"
        if self.seed is not None and not is_int(self.seed):
            yield f"seed must be an integer, got {self.seed!r}"
        if not all(isinstance(s, str) and s for s in self.stop):
            yield "stop must be a string or a list of non-empty strings"
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            yield "stop_token_ids must be a list of non-negative integers"
        if self.logprobs is not None and (not is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            yield f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}"

    @property
    def greedy(self) -> bool:
        """Whether this request picks the most likely token every step."""
        return self.temperature == 0

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field a caller may set."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        """Builds from a plain mapping; an unknown key is a ValueError that names it."""
        allowed = set(cls.field_names())
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"unknown sampling field(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
