"""One generation request as the engine tracks it, from arrival to finish."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in the engine."""

    WAITING = "waiting"  # not yet scheduled, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The chosen token's logprob and, if asked, the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """A single sequence being generated (a prompt with n > 1 becomes n requests).

    `num_computed_tokens` counts the tokens whose keys and values are in the cache; a request has
    finished its prompt once it reaches `len(prompt_token_ids)`. Preemption drops the blocks and
    resets it to 0, and the tokens are recomputed (output tokens too) when it runs again.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Who the request is for, and that party's weight: inside a priority step, the scheduler
    # shares the engine between parties in proportion to their weights (None: no sharing, FIFO).
    tenant: str | None = None
    weight: float = 1.0
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    seq_index: int = 0  # which of the prompt's n completions this is
    # The group's first completion, for the others (n > 1): they wait until it has computed the
    # prompt, then find its blocks in the prefix cache instead of computing the prompt again.
    leader: Request | None = field(default=None, repr=False)
    # Overlapped steps: tokens sampled on the device whose ids the host has not read yet (at most
    # one per step in flight), where the latest one sits in its step's sampled-token tensor, and
    # whether the pending tokens already end the request by length (then it is not scheduled again).
    num_pending: int = 0
    pending_index: int = -1
    final_pending: bool = False
    # What the sampler draws this request's tokens with (its per-row values and draw seed), set by
    # the sampler on the first draw and kept for the request's life.
    sampling_row: tuple | None = None

    @property
    def waits_for_leader(self) -> bool:
        """Whether this completion waits for its group's first one to compute the shared prompt."""
        leader = self.leader
        return (leader is not None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far, pending ones (sampled, not yet read back) included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus output tokens whose ids the host holds (`all_token_ids`)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens that still need a forward pass before the next token can be sampled."""
        if self.final_pending:
            return 0
        return self.num_tokens - self.num_computed_tokens
