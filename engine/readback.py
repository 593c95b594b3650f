"""Reading a step's sampled tokens back from the device: at once, or a step later.

Overlapped steps (see `Engine.step`) launch step N+1 before the host reads step N's tokens: the
copy of N's tokens (and of the logprobs its requests asked for) into pinned host memory is queued
behind N's sampling, and the host reads it after N+1 is on its way, so the GPU never waits for the
host's bookkeeping between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import Request, TokenLogprob
from engine.sampler import LogprobTensors, assemble


@dataclass(eq=False)
class SampledStep:
    """One step's sampled tokens: row i of `tokens` (on the device) belongs to `requests[i]`."""

    requests: list[Request]
    tokens: torch.Tensor
    picks: list[TokenLogprob] | None = None  # set when read at once (with logprobs if asked)
    _host: torch.Tensor | None = field(default=None, repr=False)
    _logprobs: LogprobTensors | None = field(default=None, repr=False)  # host copies, in flight
    _ready: torch.cuda.Event | None = field(default=None, repr=False)

    def read(self) -> list[TokenLogprob]:
        """The chosen tokens (and logprobs), waiting for the device copy if it is still on its way."""
        if self.picks is None:
            if self._ready is not None:
                self._ready.synchronize()
            ids = (self._host if self._host is not None else self.tokens).tolist()
            self.picks = assemble(ids, self._logprobs)
        return self.picks


class Readback:
    """Starts the asynchronous copies of sampled tokens into two pinned buffers used in turn (a
    buffer is refilled two steps after its copy, long after its tokens were read)."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if device.type == "cuda":
            self._buffers = [(torch.empty(max_rows, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                             for _ in range(2)]
        self._turn = 0

    def start(self, requests: list[Request], tokens: torch.Tensor,
              logprobs: LogprobTensors | None = None) -> SampledStep:
        """Queues the copy of `tokens` (and `logprobs`) to the host; `SampledStep.read` waits for it."""
        if not self._buffers or tokens.device.type != "cuda":
            # Already on the host.
            return SampledStep(requests, tokens, _logprobs=None if logprobs is None
                               else logprobs.to_host(non_blocking=False))
        host, ready = self._buffers[self._turn]
        self._turn ^= 1
        host = host[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        lp = None if logprobs is None else logprobs.to_host(non_blocking=True)
        ready.record()
        return SampledStep(requests, tokens, _host=host, _logprobs=lp, _ready=ready)
