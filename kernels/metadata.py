"""The description of a step's flat batch that every attention implementation reads.

It sits below both `kernels.attention` (the dispatch and the PyTorch reference) and
`kernels.triton.attention` (the Triton kernels), so neither has to import the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnMetadata:
    """Where each sequence of a flat batch sits, in the paged cache and in the batch."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    context_lens: torch.Tensor  # [num_seqs] int32, sequence length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_context_len: int
