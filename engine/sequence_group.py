"""The sequences of one submitted prompt: what the caller sees as one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@dataclass(eq=False)
class SequenceGroup:
    """The n sequences of one submitted prompt (`SamplingParams.n`), reported as one output."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # an output every step it changes, not only the final one
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether every sequence of the group has finished."""
        return all(s.request.is_finished for s in self.seqs)
