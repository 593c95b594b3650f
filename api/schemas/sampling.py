"""Sampling parameters as the API accepts them. Every bound, default and cross-field check is
`contract.sampling`'s, the engine's own rules: this module only says them in pydantic's terms, so
a bad value is a 400 naming its field before a job is stored."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from contract.sampling import (
    BOUNDS,
    DEFAULT_MAX_TOKENS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_LENGTH,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    SamplingFields,
    min_tokens_problem,
    stop_count_problem,
)

Number = StrictFloat | StrictInt
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]
DEFAULTS = SamplingFields()  # the engine's defaults, for the fields the API shows them on

# Guided decoding (contract.guided checks what they hold, once the request is parsed; a bad
# schema, regex or grammar is a 400 naming its field): OpenAI's response_format and vLLM's names.
ResponseFormatField = Annotated[dict[str, Any] | None, Field(
    description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                '"json_schema": {"name", "schema", "strict"}}: the output is a JSON object matching it')]
GuidedJsonField = Annotated[dict[str, Any] | str | None, Field(
    description="vLLM: a JSON schema (object or JSON text) the output matches")]
GuidedRegexField = Annotated[str | None, Field(description="vLLM: a regular expression the whole output matches")]
GuidedChoiceField = Annotated[list[str] | None, Field(description="vLLM: the output is exactly one of these")]
GuidedGrammarField = Annotated[str | None, Field(
    description="vLLM: a grammar (Lark, or GBNF/EBNF) the output matches")]


def bounds(name: str) -> dict[str, Any]:
    """pydantic's constraints (``ge``/``gt``, ``le``) for a numeric sampling field."""
    rule = BOUNDS[name]
    out: dict[str, Any] = {}
    if rule.low is not None:
        out["gt" if rule.low_open else "ge"] = rule.low
    if rule.upper is not None:
        out["le"] = rule.upper
    return out


def check_stop_count(value: object) -> object:
    """The `stop` validator shared by every request schema: at most MAX_STOP strings."""
    problem = stop_count_problem(value) if isinstance(value, list) else None
    if problem:
        raise ValueError(problem)
    return value


def check_min_tokens(value: int, info: ValidationInfo) -> int:
    """The `min_tokens` validator: at most the request's max_tokens when both are given."""
    top = info.data.get("max_tokens")
    problem = min_tokens_problem(value, top) if top is not None and value is not None else None
    if problem:
        raise ValueError(problem)
    return value


class SamplingParams(BaseModel):
    """How to sample the output. Every field is optional; omitted ones take the engine's default.

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off.
    """

    model_config = ConfigDict(extra="forbid")

    n: StrictInt = Field(DEFAULTS.n, **bounds("n"),
                         description=f"completions of the prompt (1..{MAX_N}), each with its own finish reason")
    max_tokens: StrictInt | None = Field(None, **bounds("max_tokens"),
                                         description=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS})")
    min_tokens: StrictInt = Field(DEFAULTS.min_tokens, **bounds("min_tokens"),
                                  description="tokens to generate at least (0..max_tokens)")
    temperature: Number = Field(DEFAULTS.temperature, **bounds("temperature"))
    top_k: StrictInt = Field(DEFAULTS.top_k, **bounds("top_k"))
    top_p: Number = Field(DEFAULTS.top_p, **bounds("top_p"))
    min_p: Number = Field(DEFAULTS.min_p, **bounds("min_p"))
    presence_penalty: Number = Field(DEFAULTS.presence_penalty, **bounds("presence_penalty"))
    frequency_penalty: Number = Field(DEFAULTS.frequency_penalty, **bounds("frequency_penalty"))
    repetition_penalty: Number = Field(DEFAULTS.repetition_penalty, **bounds("repetition_penalty"))
    seed: StrictInt | None = Field(DEFAULTS.seed, **bounds("seed"))
    stop: StopString | list[StopString] | None = Field(None, description=f"a string or up to {MAX_STOP} strings")
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: StrictBool = DEFAULTS.ignore_eos
    logprobs: StrictInt | None = Field(DEFAULTS.logprobs, **bounds("logprobs"),
                                       description="None: none; N: the chosen token's logprob and the top N")
    skip_special_tokens: StrictBool = DEFAULTS.skip_special_tokens
    response_format: ResponseFormatField = None
    guided_json: GuidedJsonField = None
    guided_regex: GuidedRegexField = None
    guided_choice: GuidedChoiceField = None
    guided_grammar: GuidedGrammarField = None

    _min_below_max = field_validator("min_tokens")(check_min_tokens)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: object) -> object:
        return check_stop_count(value)

    def engine_dict(self) -> dict[str, object]:
        """The fields that differ from the engine's defaults (what the job stores as ``params``)."""
        out = self.model_dump(exclude_unset=True, exclude_none=True)
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out
