"""Sampling parameters as the API accepts them: the rules of `engine.SamplingParams`, replicated
here because the API never imports the engine (a test keeps the two in agreement)."""

from __future__ import annotations

from typing import Annotated

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

MAX_LOGPROBS = 20  # engine.sampling_params.MAX_LOGPROBS
MIN_REPETITION_PENALTY = 0.01  # engine.sampling_params.MIN_REPETITION_PENALTY
MAX_STOP = 16


def check_stop_count(value: object) -> object:
    """The `stop` validator shared by every request schema: at most MAX_STOP strings."""
    if isinstance(value, list) and len(value) > MAX_STOP:
        raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(value)}")
    return value
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch's manual_seed takes

Number = StrictFloat | StrictInt
StopString = Annotated[str, StringConstraints(min_length=1, max_length=1000)]


class SamplingParams(BaseModel):
    """How to sample the output. Every field is optional; omitted ones take the engine's default.

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off.
    """

    model_config = ConfigDict(extra="forbid")

    n: StrictInt = Field(1, description="outputs per job; only 1 is supported")
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens to generate at most (default 16)")
    min_tokens: StrictInt = Field(0, ge=0, description="tokens to generate at least (0..max_tokens)")
    temperature: Number = Field(1.0, ge=0, le=100)
    top_k: StrictInt = Field(0, ge=0, le=1_000_000)
    top_p: Number = Field(1.0, gt=0, le=1)
    min_p: Number = Field(0.0, ge=0, le=1)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    repetition_penalty: Number = Field(1.0, ge=MIN_REPETITION_PENALTY, le=100)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopString | list[StopString] | None = Field(None, description="a string or up to 16 strings")
    stop_token_ids: list[Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]] | None = Field(None, max_length=64)
    ignore_eos: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                       description="None: none; N: the chosen token's logprob and the top N")
    skip_special_tokens: StrictBool = True

    @field_validator("n")
    @classmethod
    def _one_output(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n must be 1, got {n}: a job stores one output (send separate jobs instead)")
        return n

    @field_validator("min_tokens")
    @classmethod
    def _min_below_max(cls, value: int, info: ValidationInfo) -> int:
        top = info.data.get("max_tokens")
        if top is not None and value > top:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({top})")
        return value

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
