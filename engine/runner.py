"""The model runner: lays a scheduled step out as one flat batch and runs the model on it.

The batch is built on the host with numpy, in preallocated buffers (pinned on CUDA, so the copies
to the device are asynchronous and the host never waits for the GPU here); the only wait of a step
is the caller fetching the sampled token ids. Per-request work is a few list lookups: each live
request's block ids are kept in a persistent table and only newly added blocks are copied in.

On CUDA, decode-only steps replay a captured CUDA graph (engine.cuda_graphs) unless
`enforce_eager`; every other step (prefill, chunked prefill, mixed) runs eagerly.

With overlapped steps (see engine.engine) a decode row's input token may still be on the device,
sampled by the step before: the host writes a placeholder and a `TokenFeed` names where the real
token is, so the device copies it in before the forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.block_tables import BlockTables
from engine.config import ModelInfo
from engine.cuda_graphs import DecodeGraphs
from engine.request import Request
from engine.token_feed import TokenFeed
from kernels import AttnMetadata

if TYPE_CHECKING:
    from engine.tp_ranks import TPRanks


def allocate_kv_caches(info: ModelInfo, num_blocks: int, block_size: int, device: torch.device,
                       dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A (keys, values) pool of `num_blocks` blocks per layer, [blocks, block_size, kv heads, head dim]."""
    shape = (num_blocks, block_size, info.num_kv_heads, info.head_dim)
    is_cuda = device.type == "cuda"
    # The Triton kernels never read a slot before it is written, so CUDA skips the fill (a full
    # pass over tens of GB). The CPU reference reads whole blocks and needs finite values in
    # unwritten slots; the explicit fill also touches every page now, so generation does not
    # pay the page faults of a fresh gigabyte later.
    def alloc() -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        return t if is_cuda else t.fill_(0)

    return [(alloc(), alloc()) for _ in range(info.num_layers)]


class _StepBuffers:
    """Host staging for one step's flat batch; numpy views over (pinned) torch tensors."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self.ids_t = buf(max_tokens, torch.int64)
        self.positions_t = buf(max_tokens, torch.int64)
        self.slots_t = buf(max_tokens, torch.int64)
        self.query_start_t = buf(max_seqs + 1, torch.int32)
        self.context_lens_t = buf(max_seqs, torch.int32)
        self.sample_idx_t = buf(max_seqs, torch.int64)
        self.feed_dst_t = buf(max_seqs, torch.int64)
        self.feed_src_t = buf(max_seqs, torch.int64)
        # Flat, viewed as [seqs, width] with the step's own width, so a step copies only the
        # columns it uses.
        self.tables_t = buf(max_seqs * max_blocks, torch.int32)
        self.ids, self.positions, self.slots = self.ids_t.numpy(), self.positions_t.numpy(), self.slots_t.numpy()
        self.query_start, self.context_lens = self.query_start_t.numpy(), self.context_lens_t.numpy()
        self.sample_idx, self.tables = self.sample_idx_t.numpy(), self.tables_t.numpy()
        self.feed_dst, self.feed_src = self.feed_dst_t.numpy(), self.feed_src_t.numpy()
        # Recorded after the copies that read these buffers; waited on before they are refilled.
        self.copied: torch.cuda.Event | None = None


class ModelRunner:
    """Owns the model and the KV cache tensors; turns a step's requests into logits.

    `max_num_seqs` and `max_num_batched_tokens` size the host buffers (a step never exceeds
    them: the scheduler's caps), `max_model_len` the block tables. On CUDA, decode graphs are
    captured at construction unless `enforce_eager`.

    With tensor parallelism (`tp`, rank 0's handle on the other ranks) `model` and `info` are rank
    0's shard, and every step's flat batch is broadcast to the other ranks before the forward pass.
    """

    def __init__(self, model: torch.nn.Module, info: ModelInfo, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enforce_eager: bool = False, tp: TPRanks | None = None) -> None:
        self.model = model
        self.info = info
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        self.tp = tp
        is_cuda = device.type == "cuda"
        self.kv_caches = allocate_kv_caches(info, num_blocks, block_size, device, dtype)
        self.max_model_len = max_model_len or info.max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-self.max_model_len // block_size) + 1
        max_tokens = max(max_num_batched_tokens, max_num_seqs)
        # Two sets, used in turn: a set is refilled only once the copies out of it are done, and
        # that is normally long past when its turn comes again.
        self._buffers = [_StepBuffers(max_tokens, max_num_seqs, self.max_blocks_per_seq, is_cuda)
                         for _ in range(2 if is_cuda else 1)]
        self._turn = 0
        self._tables = BlockTables(max_num_seqs, self.max_blocks_per_seq)
        self.graphs: DecodeGraphs | None = None
        if is_cuda and not enforce_eager and tp is None:
            self.graphs = DecodeGraphs(self._forward_logits, max_num_seqs, self.max_blocks_per_seq,
                                       self.max_model_len, device, logits_dtype=dtype)
            self.graphs.capture()
        self.last_step: tuple[np.ndarray, np.ndarray] | None = None  # (query lens, context lens)

    # -- the step ----------------------------------------------------------------------------
    def _next_buffers(self) -> _StepBuffers:
        buf = self._buffers[self._turn]
        self._turn = (self._turn + 1) % len(self._buffers)
        if buf.copied is not None:
            buf.copied.synchronize()
        return buf

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden, out=out)

    def _fill(self, buf: _StepBuffers, requests: list[Request], num_tokens: list[int],
              pad_to: int = 0) -> tuple[int, int, int, int]:
        """Writes the step into `buf`: (tokens, max query len, max context len, table width).

        With `pad_to` (decode steps only), rows len(requests)..pad_to-1 become padding rows.
        """
        n = len(requests)
        bs = self.block_size
        starts = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=n)
        counts = np.asarray(num_tokens, dtype=np.int64)
        total = int(counts.sum())
        max_q = int(counts.max())
        ends = starts + counts
        ids = buf.ids[:total]
        if max_q == 1:
            # The token at position num_computed_tokens of each sequence.
            # A pending token (still on the device) gets a placeholder; a TokenFeed fills it in.
            ids[:] = [r.prompt_token_ids[s] if s < len(r.prompt_token_ids)
                      else r.output_token_ids[s - len(r.prompt_token_ids)] if not r.num_pending
                      or s < r.num_known_tokens else 0
                      for r, s in zip(requests, starts.tolist())]
            positions = starts
            seq_of_token = None
        else:
            offset = 0
            for r, s, c in zip(requests, starts.tolist(), num_tokens):
                # Slices of the prompt and output lists, not a concatenation of the whole sequence.
                p = r.num_prompt_tokens
                if r.num_pending and s >= r.num_known_tokens:
                    ids[offset:offset + c] = 0  # a pending token: a TokenFeed fills it in
                elif s + c <= p:
                    ids[offset:offset + c] = r.prompt_token_ids[s:s + c]
                elif s >= p:
                    ids[offset:offset + c] = r.output_token_ids[s - p:s - p + c]
                else:
                    ids[offset:offset + c] = r.prompt_token_ids[s:] + r.output_token_ids[:s + c - p]
                offset += c
            seq_of_token = np.repeat(np.arange(n), counts)
        qs = buf.query_start[:n + 1]
        qs[0] = 0
        np.cumsum(counts, out=qs[1:])
        if seq_of_token is not None:
            positions = starts[seq_of_token] + (np.arange(total) - qs[seq_of_token])
        buf.positions[:total] = positions
        buf.context_lens[:n] = ends
        rows, width = self._tables.rows(requests)
        tables = buf.tables[:n * width].reshape(n, width)
        np.take(self._tables.table[:, :width], rows, axis=0, out=tables, mode="clip")
        tok_rows = np.arange(n) if seq_of_token is None else seq_of_token
        buf.slots[:total] = tables[tok_rows, positions // bs] * bs + positions % bs
        if pad_to > n:
            buf.ids[n:pad_to] = 0
            buf.positions[n:pad_to] = 0
            buf.slots[n:pad_to] = -1
            buf.context_lens[n:pad_to] = 0
        self.last_step = (counts, ends)
        return total, max_q, int(ends.max()), width

    def prepare(self, requests: list[Request], num_tokens: list[int],
                feed: TokenFeed | None = None) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """Flat token ids, positions and attention metadata for the step, on the device."""
        buf = self._next_buffers()
        total, max_q, max_ctx, width = self._fill(buf, requests, num_tokens)
        n = len(requests)
        dev = self.device

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev, non_blocking=True)

        meta = AttnMetadata(
            slot_mapping=put(buf.slots_t[:total]),
            query_start_loc=put(buf.query_start_t[:n + 1]),
            context_lens=put(buf.context_lens_t[:n]),
            block_tables=put(buf.tables_t[:n * width].view(n, width)),
            max_query_len=max_q,
            max_context_len=max_ctx,
        )
        input_ids = put(buf.ids_t[:total])
        if feed is not None and feed.rows:
            # Each fed row is a decode: its one token is the last of its query.
            self._apply_feed(buf, feed, input_ids, buf.query_start[1:n + 1][feed.rows] - 1)
        out = input_ids, put(buf.positions_t[:total]), meta
        self._mark_copied(buf)
        return out

    def _apply_feed(self, buf: _StepBuffers, feed: TokenFeed, input_ids: torch.Tensor, dst: np.ndarray) -> None:
        """Copies the fed tokens, on the device, into `input_ids` at flat positions `dst`."""
        k = len(feed.rows)
        buf.feed_dst[:k] = dst
        buf.feed_src[:k] = feed.src
        dst_t = buf.feed_dst_t[:k].to(self.device, non_blocking=True)
        src_t = buf.feed_src_t[:k].to(self.device, non_blocking=True)
        input_ids.index_copy_(0, dst_t, feed.tokens.index_select(0, src_t))

    def _mark_copied(self, buf: _StepBuffers) -> None:
        if self.device.type == "cuda":
            if buf.copied is None:
                buf.copied = torch.cuda.Event()
            buf.copied.record()

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_tokens: list[int], sample_rows: list[int],
                feed: TokenFeed | None = None) -> torch.Tensor:
        """Runs the step; returns logits of the last token of each request in `sample_rows` (float32
        on the CPU, the model's dtype on CUDA; a decode graph's are valid until the next step runs).

        `feed` names the rows whose input token is still on the device (overlapped steps)."""
        n = len(requests)
        graphs = self.graphs
        if graphs is not None and n <= graphs.max_batch and max(num_tokens) == 1:
            size = graphs.padded_size(n)
            buf = self._next_buffers()
            _, _, _, width = self._fill(buf, requests, num_tokens, pad_to=size)

            def fill_in(input_ids: torch.Tensor) -> None:
                self._apply_feed(buf, feed, input_ids, np.asarray(feed.rows))

            logits = graphs.run(n, size, buf.ids_t[:size], buf.positions_t[:size], buf.slots_t[:size],
                                buf.context_lens_t[:size], buf.tables_t[:n * width].view(n, width),
                                fill_in if feed is not None and feed.rows else None)
            self._mark_copied(buf)
            if len(sample_rows) != n:
                logits = logits[torch.as_tensor(sample_rows, device=logits.device)]
            return logits
        input_ids, positions, meta = self.prepare(requests, num_tokens, feed)
        buf = self._buffers[(self._turn - 1) % len(self._buffers)]  # the set prepare just filled
        picked_idx = None
        if sample_rows and len(sample_rows) != input_ids.shape[0]:
            k = len(sample_rows)
            buf.sample_idx[:k] = buf.query_start[1:n + 1][sample_rows] - 1
            picked_idx = buf.sample_idx_t[:k].to(self.device, non_blocking=True)
            self._mark_copied(buf)
        if self.tp is not None:
            with self.tp.guard():
                self.tp.send_step(input_ids, positions, meta, len(sample_rows), picked_idx)
                return self._forward(input_ids, positions, meta, sample_rows, picked_idx)
        return self._forward(input_ids, positions, meta, sample_rows, picked_idx)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                 sample_rows: list[int], picked_idx: torch.Tensor | None) -> torch.Tensor:
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sample_rows:  # only middle chunks of prompts: the cache writes were the work
            return torch.empty((0, self.info.vocab_size), dtype=torch.float32, device=self.device)
        # every token is a sampled last token (decodes), or the last token of each sampled row
        picked = hidden if picked_idx is None else hidden.index_select(0, picked_idx)
        # On CUDA the sampler reads 16-bit logits as they are (no float32 copy of [rows, vocab]).
        return self.model.compute_logits(picked, float32=self.device.type != "cuda")
