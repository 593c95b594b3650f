"""What the engine hands back: per request, its completions so far and whether it has finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import TokenLogprob


@dataclass
class CompletionOutput:
    """One of a request's n completions."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # text added since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A request's state after a step, or its final result.

    The first completion's fields are also reachable directly (`out.text`, `out.token_ids`,
    `out.finish_reason`, `out.logprobs`), which is all most callers need with n = 1.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_tokens: int
    cached_tokens: int = 0
    error: str | None = None
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else "error"

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs if self.outputs else None

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over all n completions."""
        return sum(len(o.token_ids) for o in self.outputs)
