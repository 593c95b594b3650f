"""The model runner: lays a scheduled step out as one flat batch and runs the model on it."""

from __future__ import annotations

import numpy as np
import torch

from engine.config import ModelInfo
from engine.request import Request
from kernels import AttnMetadata


class ModelRunner:
    """Owns the model and the KV cache tensors; turns a step's requests into logits."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.info = info
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, info.num_kv_heads, info.head_dim)
        # Zeros, not empty: the CPU reference reads whole blocks, and stale NaNs in unused slots
        # would poison the masked softmax.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(info.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(info: ModelInfo, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, keys and values."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * info.num_layers * block_size * info.num_kv_heads * info.head_dim * itemsize

    def prepare(self, requests: list[Request], num_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """Flat token ids, positions and attention metadata for the step."""
        bs = self.block_size
        starts = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=len(requests))
        counts = np.asarray(num_tokens, dtype=np.int64)
        ends = starts + counts
        total = int(counts.sum())
        ids = np.empty(total, dtype=np.int64)
        offset = 0
        for r, s, n in zip(requests, starts.tolist(), num_tokens):
            # Slicing the prompt and output lists separately avoids building all_token_ids.
            p = r.num_prompt_tokens
            if s + n <= p:
                ids[offset:offset + n] = r.prompt_token_ids[s:s + n]
            elif s >= p:
                ids[offset:offset + n] = r.output_token_ids[s - p:s - p + n]
            else:
                ids[offset:offset + n] = r.prompt_token_ids[s:] + r.output_token_ids[:s + n - p]
            offset += n
        query_start = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        # Position of every token: its sequence's start plus its index within the sequence's chunk.
        seq_of_token = np.repeat(np.arange(len(requests)), counts)
        positions = starts[seq_of_token] + (np.arange(total) - query_start[seq_of_token])
        max_blocks = max(len(r.block_ids) for r in requests)
        tables = np.zeros((len(requests), max_blocks), dtype=np.int64)
        for i, r in enumerate(requests):
            tables[i, :len(r.block_ids)] = r.block_ids
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        dev = self.device
        meta = AttnMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(dev),
            context_lens=torch.from_numpy(ends.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev),
            max_query_len=int(counts.max()),
            max_context_len=int(ends.max()),
        )
        return torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev), meta

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_tokens: list[int], sample_rows: list[int]) -> torch.Tensor:
        """Runs the step; returns float32 logits of the last token of each request in `sample_rows`."""
        input_ids, positions, meta = self.prepare(requests, num_tokens)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        last = meta.query_start_loc[1:].long() - 1
        rows = last[torch.tensor(sample_rows, dtype=torch.long, device=last.device)]
        return self.model.compute_logits(hidden[rows])
