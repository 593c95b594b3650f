"""CUDA graphs of the decode step: one graph per captured batch size, replayed padded.

A decode step (one query token per sequence) launches several hundred small kernels; on a GPU the
launches, not the arithmetic, set the pace for all but the largest batches. Capturing the whole
forward (and the logits) once per batch size and replaying it turns those launches into one.

A graph reads and writes fixed addresses, so its inputs live in static device buffers that each
step copies into. A batch of n sequences replays the graph of the smallest captured size P >= n;
rows n..P-1 are padding: slot -1 (the KV write skips them) and context length 0 (the attention
kernel reads no key for them and writes zeros), so they cannot touch any real sequence's cache.

Every graph writes its logits into one shared buffer (rows 0..P-1), in the model's dtype: a replay's
logits are read by the sampler queued right behind it, before the next replay overwrites them, so
no graph needs logits of its own and capturing up to a thousand sequences costs no more memory than
the largest batch's logits once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import AttnMetadata

# Past this many sequences a decode step is far longer than its launches; the cap only bounds the
# capture time of very large settings.
MAX_CAPTURE_SIZE = 2048


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, every multiple of 16 up to 256, then every multiple
    of 32, up to `max_batch`.

    The steps keep the padding under 16 rows up to 256 and under 32 above (a few percent of a
    large batch's work at most) while capturing a few dozen graphs.
    """
    top = max(1, min(max_batch, MAX_CAPTURE_SIZE))
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, min(top, 257), 16)) + list(range(288, top, 32))
    return sorted({s for s in sizes if s < top} | {top})


class DecodeGraphs:
    """Captured decode forwards of a model over its KV cache, one per batch size.

    `forward(input_ids, positions, meta, out)` runs the model and returns logits [rows, vocab] for
    every row, written into `out` when it is given (a slice of the shared logits buffer, made from
    the first run's output); it is called with slices of the static buffers. With
    `use_graphs=False` the same static buffers and padding are used but the forward runs eagerly:
    that exercises the padding on any device (tests on the CPU).
    """

    def __init__(self, forward: Callable[..., torch.Tensor],
                 max_batch: int, max_blocks_per_seq: int, max_context_len: int, device: torch.device,
                 sizes: list[int] | None = None, use_graphs: bool = True,
                 logits_dtype: torch.dtype | None = None) -> None:
        self.forward = forward
        self.sizes = sorted(sizes or graph_batch_sizes(max_batch))
        self.max_batch = self.sizes[-1]
        self.max_context_len = max_context_len
        self.device = device
        self.use_graphs = use_graphs
        self.logits_dtype = logits_dtype  # None: the dtype of the first forward's logits
        p = self.max_batch
        self.input_ids = torch.zeros(p, dtype=torch.int64, device=device)
        self.positions = torch.zeros(p, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((p,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(p, dtype=torch.int32, device=device)
        # One token per sequence: the query layout is the same for every decode step.
        self.query_start_loc = torch.arange(p + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((p, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # [max_batch, vocab], shared by every size
        self.replays = 0  # decode steps served, for tests and stats

    def _meta(self, size: int) -> AttnMetadata:
        # max_context_len only steers the kernel's split count, fixed at capture: the kernel
        # derives each sequence's key ranges from its real length, so any split count is exact.
        return AttnMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            context_lens=self.context_lens[:size], block_tables=self.block_tables[:size],
            max_query_len=1, max_context_len=self.max_context_len)

    def _run(self, size: int) -> torch.Tensor:
        out = None if self.logits is None else self.logits[:size]
        logits = self.forward(self.input_ids[:size], self.positions[:size], self._meta(size), out)
        if self.logits is None:
            self.logits = torch.empty((self.max_batch, logits.shape[1]), dtype=self.logits_dtype or logits.dtype,
                                      device=logits.device)
            self.logits[:size].copy_(logits)
            logits = self.logits[:size]
        return logits

    def capture(self) -> None:
        """Captures every size, largest first, all in one memory pool (a smaller graph reuses the
        larger ones' intermediates); all write the one logits buffer."""
        if not self.use_graphs:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = None
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                # Eager runs first, on the capture stream: Triton compiles its kernels and cuBLAS
                # picks its algorithms outside the capture, where neither may happen.
                for _ in range(2):
                    self._run(size)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._run(size)
                if pool is None:
                    pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def padded_size(self, n: int) -> int | None:
        """The captured size a batch of n sequences replays, or None if n is too large."""
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(self, n: int, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
            slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
            fill_in: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replays the graph of `size` (from `padded_size(n)`) and returns the logits of rows 0..n-1.

        The 1-D inputs hold `size` entries, padding included (slot -1, context length 0); they and
        `block_tables` ([n, width]) are host tensors (pinned on CUDA) copied in asynchronously.
        The returned logits are a view of the graph's output, valid until the next replay.
        `fill_in`, if given, then writes the tokens still on the device into the static input ids.
        """
        self.input_ids[:size].copy_(input_ids, non_blocking=True)
        if fill_in is not None:
            fill_in(self.input_ids)
        self.positions[:size].copy_(positions, non_blocking=True)
        self.slot_mapping[:size].copy_(slot_mapping, non_blocking=True)
        self.context_lens[:size].copy_(context_lens, non_blocking=True)
        # Only the columns in use: rows are read no further than each sequence's length, so stale
        # entries past them are harmless.
        self.block_tables[:n, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.replays += 1
        if self.use_graphs:
            self.graphs[size].replay()
            return self.logits[:n]
        return self._run(size)[:n]
