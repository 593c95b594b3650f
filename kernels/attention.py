"""Attention over the paged KV cache, and the write of new keys and values into it.

Layout shared by every implementation:
- `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim], one pair per layer.
- A step's tokens are one flat batch: `q` is [num_tokens, num_heads, head_dim], the tokens of
  sequence i are rows `query_start_loc[i]:query_start_loc[i+1]`, and they are the *last* tokens of
  that sequence, whose total length after this step is `context_lens[i]`. A query token at
  position p attends to keys 0..p (causal), whether those keys were written this step or earlier
  (prefix-cache hits, earlier prefill chunks, earlier decode steps).
- `block_tables[i, j]` is the cache block that holds positions j*block_size .. (j+1)*block_size-1
  of sequence i; `slot_mapping[t]` = block * block_size + offset for token t, or -1 for a padding
  token whose key and value must not be written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton
from kernels.metadata import AttnMetadata


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: stores k, v ([num_tokens, num_kv_heads, head_dim]) at their slots, skipping -1."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of sequences' caches: [..., length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    table = block_table[..., :n_blocks]
    # index_select on a flat index is several times faster on CPU than advanced indexing.
    blocks = cache.index_select(0, table.reshape(-1).long())  # [(...) * n_blocks, block_size, Hkv, D]
    shape = table.shape[:-1] + (n_blocks * block_size,) + cache.shape[2:]
    return blocks.view(shape)[..., :length, :, :]


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, all sequences at once: q [B, Hq, D] -> [B, Hq, D].

    The sequences' blocks are gathered into one padded [B, Hkv, L, D] batch and handed to
    PyTorch's fused attention with a padding mask; query heads share their KV head (GQA) without
    copying the keys.
    """
    bsz, num_heads, head_dim = q.shape
    length = int(context_lens.max())
    valid = torch.arange(length, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    # Slots past a sequence's length are masked out; they must hold finite values (NaN times a
    # zero probability is still NaN), which is why the engine zero-fills the CPU pool.
    k = _gather(k_cache, block_tables, length).to(q.dtype).transpose(1, 2)
    v = _gather(v_cache, block_tables, length).to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(bsz, num_heads, 1, head_dim), k, v,
                                         attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=num_heads != k.shape[1])
    return out.view(bsz, num_heads, head_dim)


def _prefill_one(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
) -> torch.Tensor:
    """Many query tokens of one sequence, causal against its whole cached context."""
    q_len, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[2]
    k = _gather(k_cache, block_table, context_len).to(q.dtype)  # [L, Hkv, D]
    v = _gather(v_cache, block_table, context_len).to(q.dtype)
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if q_len == context_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=group > 1)
    else:
        q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        k_pos = torch.arange(context_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    return out[0].transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference paged attention for a mixed batch of prefill chunks and decodes.

    Decodes (one query token) run together as one batched matmul; each prefill chunk runs alone
    through PyTorch's scaled_dot_product_attention with a causal mask offset by its cached context.
    """
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    ctx = meta.context_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(ctx))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        if len(decode) == len(ctx):
            rows = torch.tensor(starts[:-1], device=q.device)
            seqs = slice(None)
        else:
            rows = torch.tensor([starts[i] for i in decode], device=q.device)
            seqs = torch.tensor(decode, device=q.device)
        out[rows] = _decode_batch(
            q[rows], k_cache, v_cache, meta.block_tables[seqs], meta.context_lens[seqs], scale
        )
    for i, n in enumerate(q_lens):
        if n > 1:
            s = starts[i]
            out[s : s + n] = _prefill_one(
                q[s : s + n], k_cache, v_cache, meta.block_tables[i], ctx[i], scale
            )
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores this step's keys and values into the paged cache at `slot_mapping` (-1 = skip)."""
    if use_triton(k):
        from kernels.triton.attention import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the batch's queries over the paged cache: returns [num_tokens, Hq, D]."""
    if use_triton(q):
        from kernels.triton.attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
