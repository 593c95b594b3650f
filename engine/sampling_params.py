"""What a caller may ask of one generation: lengths, randomness, penalties, stops, logprobs.

The fields, their defaults and limits are `contract.sampling`'s, shared with the API, so that a
job the API accepted is one the engine runs."""

from __future__ import annotations

from contract.sampling import SamplingFields


class SamplingParams(SamplingFields):
    """Sampling parameters of one request, validated on creation (ValueError naming the field).

    temperature 0 is greedy. top_k 0 and top_p 1 and min_p 0 disable those filters. `logprobs`:
    None for none, N >= 0 for the chosen token's logprob plus the top N alternatives. Every field,
    default and limit is `contract.sampling.SamplingFields`'s.
    """

    @property
    def greedy(self) -> bool:
        """Whether this request picks the most likely token every step."""
        return self.temperature == 0
