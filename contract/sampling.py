"""The sampling fields of one request: their defaults and the values each may take.

This is the one home of these rules. The engine's `SamplingParams` is `SamplingFields` (validated
on creation, a ValueError naming every field that is wrong); the API's request models take their
bounds, defaults and cross-field checks from here (`api/schemas/sampling.py`), so that what the
API accepts the engine runs, and what the engine refuses the API refuses first, with a 400.

Plain Python: no torch, no pydantic (the engine imports this module and stays a library).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

from contract.guided import GUIDED_FIELDS, grammar_of, guided_problems

DEFAULT_MAX_TOKENS = 16
MAX_N = 16  # completions of one prompt: they share its KV blocks, and share the engine's batch
MAX_LOGPROBS = 20  # alternatives per token, beyond the chosen one
# Below this a seen token's logit divided by the penalty overflows float32 (the penalty itself
# rounds to zero or a subnormal there): the row becomes inf/NaN and sampling reads past the vocabulary.
MIN_REPETITION_PENALTY = 0.01
MAX_STOP = 16  # stop strings per request: each is searched for in the new text at every step
MAX_STOP_LENGTH = 1000  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_TOKEN_ID = 2**31 - 1  # token ids are 32-bit integers everywhere they are stored
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch's manual_seed takes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Bounds:
    """The values one numeric field may take.

    ``low``/``high`` are part of what the value means (top_p is a probability: (0, 1]); ``cap`` is
    only the most one request may ask of a shared service (temperature at most 100). Both bound
    the field; they differ in how an error says it.
    """

    integer: bool
    low: int | float | None = None
    low_open: bool = False  # `low` itself is outside
    high: int | float | None = None
    cap: int | float | None = None
    hint: str = ""  # what a special value does, told with the range

    @property
    def upper(self) -> int | float | None:
        """The largest value allowed (the meaning's or the cap's), or None."""
        return self.high if self.high is not None else self.cap

    def describe(self) -> str:
        """The allowed values in words: ``>= 1``, ``in (0, 1]``, ``an integer in 0..20``."""
        if self.low is not None and self.high is not None:
            if self.integer:
                text = f"an integer in {self.low}..{self.high}"
            else:
                text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            text = "an integer" if self.integer else "a number"
        return f"{text} ({self.hint})" if self.hint else text

    def problem(self, name: str, value: Any) -> str | None:
        """What is wrong with ``value`` for field ``name``, or None when it is allowed."""
        if not (_is_int(value) if self.integer else _is_number(value)):
            kind = self.describe() if self.integer and self.high is not None else (
                "an integer" if self.integer else "a number")
            return f"{name} must be {kind}, got {value!r}"
        # Written as what is allowed, so that NaN (false in every comparison) is refused.
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        if not (above_low and (self.high is None or value <= self.high)):
            return f"{name} must be {self.describe()}, got {value}"
        if not (self.cap is None or value <= self.cap):
            return f"{name} must be at most {self.cap}, got {value}"
        return None


BOUNDS: dict[str, Bounds] = {
    "n": Bounds(integer=True, low=1, high=MAX_N),
    "max_tokens": Bounds(integer=True, low=1),  # the model's context is the other limit
    "min_tokens": Bounds(integer=True, low=0),  # and at most max_tokens: min_tokens_problem
    "temperature": Bounds(integer=False, low=0, cap=100),
    "top_k": Bounds(integer=True, low=0, cap=1_000_000, hint="0 disables it"),
    "top_p": Bounds(integer=False, low=0, low_open=True, high=1),
    "min_p": Bounds(integer=False, low=0, high=1),
    "presence_penalty": Bounds(integer=False, low=-2, high=2),
    "frequency_penalty": Bounds(integer=False, low=-2, high=2),
    "repetition_penalty": Bounds(integer=False, low=MIN_REPETITION_PENALTY, cap=100),
    "seed": Bounds(integer=True, low=SEED_MIN, high=SEED_MAX),
    "logprobs": Bounds(integer=True, low=0, high=MAX_LOGPROBS),
}
OPTIONAL = frozenset({"seed", "logprobs"})  # None means: none given
FLAGS = ("ignore_eos", "skip_special_tokens")


def min_tokens_problem(min_tokens: int, max_tokens: int) -> str | None:
    """The one check across fields: a request cannot need more tokens than it may make."""
    if min_tokens > max_tokens:
        return f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"
    return None


def guided_conflict_problem(guided: bool, min_tokens: int, ignore_eos: bool) -> str | None:
    """A guided request ends where its grammar does: nothing may hold it open past that."""
    if guided and min_tokens:
        return "min_tokens cannot be used with guided decoding: the schema or grammar decides where the output ends"
    if guided and ignore_eos:
        return "ignore_eos cannot be used with guided decoding: the schema or grammar decides where the output ends"
    return None


def stop_count_problem(stop: list[Any]) -> str | None:
    """Too many stop strings, or None."""
    if len(stop) > MAX_STOP:
        return f"stop takes at most {MAX_STOP} strings, got {len(stop)}"
    return None


def _stop_problems(stop: list[Any]) -> list[str]:
    if not all(isinstance(s, str) and s for s in stop):
        return ["stop must be a string or a list of non-empty strings"]
    longest = max((len(s) for s in stop), default=0)
    problems = [f"a stop string may have at most {MAX_STOP_LENGTH} characters, got one of {longest}"
                ] if longest > MAX_STOP_LENGTH else []
    count = stop_count_problem(stop)
    return problems + ([count] if count else [])


def _stop_token_problems(ids: list[Any]) -> list[str]:
    if not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids):
        return [f"stop_token_ids must be a list of integers in 0..{MAX_TOKEN_ID}"]
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return [f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"]
    return []


@dataclass
class SamplingFields:
    """Every sampling field a request may set, with its default, validated on creation (a
    ValueError naming each field that is wrong and what it allows).

    temperature 0 is greedy. top_k 0 and top_p 1 and min_p 0 disable those filters. `logprobs`:
    None for none, N >= 0 for the chosen token's logprob plus the top N alternatives. `stop` may be
    given as one string. `n` completions of the prompt. At most one of `response_format`,
    `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` makes the output match a
    JSON schema, regex, choice or grammar (`contract.guided`).
    """

    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
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
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        errors = self.problems()
        if errors:
            raise ValueError("invalid sampling parameters: " + "; ".join(errors))

    def problems(self) -> list[str]:
        """Everything wrong with these values, one sentence each (empty when they are valid)."""
        out: list[str] = []
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            problem = bounds.problem(name, value)
            if problem:
                out.append(problem)
        if _is_int(self.min_tokens) and _is_int(self.max_tokens):
            problem = min_tokens_problem(self.min_tokens, self.max_tokens)
            if problem:
                out.append(problem)
        out += _stop_problems(self.stop) + _stop_token_problems(self.stop_token_ids)
        out += [f"{name} must be true or false, got {getattr(self, name)!r}"
                for name in FLAGS if not isinstance(getattr(self, name), bool)]
        guided = guided_problems(self.guided_fields())
        out += guided
        if not guided and _is_int(self.min_tokens):
            conflict = guided_conflict_problem(self.grammar() is not None, self.min_tokens, self.ignore_eos is True)
            if conflict:
                out.append(conflict)
        return out

    def guided_fields(self) -> dict[str, Any]:
        """The guided-decoding fields (None where not given)."""
        return {name: getattr(self, name) for name in GUIDED_FIELDS}

    def grammar(self) -> str | None:
        """The llguidance grammar the output must match (None: free text)."""
        found = grammar_of(self.guided_fields())
        return None if found is None else found[1]

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field a caller may set."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
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
