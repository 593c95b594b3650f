"""Paged attention and the KV-cache write, in Triton.

Layout and semantics are those of `kernels.attention` (see its module docstring): caches are
[num_blocks, block_size, num_kv_heads, head_dim]; a step is one flat batch whose sequence i owns
query rows query_start_loc[i]:query_start_loc[i+1], the last tokens of a sequence of length
context_lens[i]; a query at position p sees keys 0..p.

One kernel serves every kind of sequence. A program owns one KV head and a tile of BLOCK_M query
rows, where a row is (query token, query head of that KV head's group): the GQA group is packed into
the rows, so each key and value tile is loaded once for all the heads that share it, and a decode
(one token, G heads) still fills a matrix-unit tile. The program walks the sequence's keys in
BLOCK_N tiles, gathering each key's cache block from the block table, with an online softmax.

Two launch shapes of that kernel:
- a batch of decodes only (max_query_len == 1): one program per (sequence, KV head, split). Long
  contexts are split into `num_splits` ranges that run in parallel (flash-decoding); each writes a
  partial output and its log-sum-exp, and a small reduce kernel combines them. The grid depends
  only on host-known sizes, so it can be captured in a CUDA graph.
- any other batch (prefill, chunked prefill, prefix hits, decodes mixed in): programs over query
  tiles of every sequence. The tile -> sequence map is a binary search over query_start_loc inside
  the kernel, so the launch needs no host copy of the batch layout.

Addresses into the caches are computed in int64: a large pool (more than 2**31 elements in one
cache) is normal on an 80 GB card.
"""

from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

from kernels.metadata import AttnMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, HEAD_D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    heads = tl.arange(0, H_PAD)[:, None]
    cols = tl.arange(0, D_PAD)[None, :]
    ok = (heads < n_heads) & (cols < HEAD_D)
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + cols, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + cols, mask=ok)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + heads * stride_kch + cols,
             k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + heads * stride_vch + cols,
             v.to(vc_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores k, v ([num_tokens, num_kv_heads, head_dim]) into the paged caches at `slot_mapping`.

    Slots of -1 are skipped (padding tokens). Same semantics as `write_kv_ref`.
    """
    num_tokens, n_heads, head_dim = k.shape
    if v.shape != k.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
            "must be [T, Hkv, D], [T, Hkv, D] and [T]"
        )
    if k_cache.shape[2:] != (n_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold {n_heads} heads of size {head_dim}")
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, n_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEAD_D=head_dim,
        H_PAD=triton.next_power_of_2(n_heads), D_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


@triton.jit
def _attn_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qsl_ptr, ctx_ptr, bt_ptr,
    num_seqs, num_splits, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt, num_q_heads,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DECODE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE:
        seq = tile
        local_tile = 0
    else:
        # Sequence s owns tiles qsl[s] // BLOCK_Q + s onwards (at most one wasted tile per
        # sequence); find the last sequence whose first tile is <= this one.
        # Loop-carried values start as int32 tensors: num_seqs == 1 arrives as a constexpr.
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            if first <= tile:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        local_tile = tile - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)

    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    q_start = local_tile * BLOCK_Q
    if q_start >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_start + offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok  # absolute position of each row's token
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_D
    rows = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile can see end at the position of its last token.
    kv_end = ctx - q_len + tl.minimum(q_start + BLOCK_Q, q_len)
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * per_split
        kv_hi = tl.minimum(kv_lo + per_split, kv_end)
    else:
        kv_lo = 0
        kv_hi = kv_end

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_head = kc_ptr + kvh.to(tl.int64) * stride_kch
    v_head = vc_ptr + kvh.to(tl.int64) * stride_vch
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = start + offs_n
        k_ok = k_pos < kv_hi
        # Per-key block lookup: a key tile may span several cache blocks, in any order.
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = (k_pos % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_head + blk[None, :] * stride_kcb + slot[None, :] * stride_kcs + offs_d[:, None],
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * scale_log2
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so no NaN appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + blk[:, None] * stride_vcb + slot[:, None] * stride_vcs + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if SPLIT:
        # Partials are [tokens, q_heads, splits, D] and [tokens, q_heads, splits], float32.
        ph = (rows * num_q_heads + head) * num_splits + split
        tl.store(part_out_ptr + ph[:, None] * HEAD_D + offs_d[None, :], o,
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + ph, lse, mask=row_ok)
    else:
        tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _reduce_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, qsl_ptr, stride_ot, stride_oh, num_q_heads, num_splits,
    S_PAD: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_begin:
        return
    row = q_begin.to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    base = (row * num_q_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_D + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_D)


@functools.lru_cache(maxsize=None)
def _num_sms_of(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 1


def _num_sms(device: torch.device) -> int:
    # Cached: the decode launch asks on every step, and the answer never changes.
    return _num_sms_of(device.type, device.index)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many context ranges each decode (sequence, KV head) is split into.

    Splitting only pays when the (sequence, KV head) programs alone leave the GPU underfilled: aim
    for about two waves of programs, and never give a split fewer than 256 keys, below which the
    partial-output traffic and the reduce outweigh the extra parallelism.
    """
    base = max(1, num_seqs * num_kv_heads)
    want = -(-2 * num_sms // base)
    by_len = max(1, max_context_len // 256)
    return int(max(1, min(want, by_len, 32)))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal paged attention for a mixed batch; same inputs, output and semantics as
    `paged_attention_ref`: returns [num_tokens, num_heads, head_dim] in q's dtype.

    The keyword-only arguments override the launch heuristics (for tests and benchmarks); leave
    them unset in normal use. `num_splits` applies to decode-only batches.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match query head size {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have unit stride along head_dim")
    group = num_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = meta.context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    qsl, ctx, bt = meta.query_start_loc, meta.context_lens, meta.block_tables
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    d_pad = triton.next_power_of_2(head_dim)
    decode = meta.max_query_len <= 1

    if decode:
        # One token per sequence: BLOCK_Q = 1 and the rows are just the group's heads, padded to
        # the 16 rows a matrix instruction needs.
        bm = block_m or max(16, triton.next_power_of_2(group))
        bq = 1
        bn = block_n or 64
        splits = num_splits or decode_num_splits(num_seqs, num_kv_heads, meta.max_context_len, _num_sms(q.device))
        warps = num_warps or 4
        # Two stages measured as fast as three or four (H100, docs/kernels.md) with less shared memory.
        stages = num_stages or 2
        grid = (num_seqs, num_kv_heads, splits)
    else:
        rows_wanted = meta.max_query_len * group
        bm = block_m or max(16, min(128, triton.next_power_of_2(rows_wanted)), triton.next_power_of_2(group))
        bq = max(1, bm // group)
        bn = block_n or 64
        splits = 1
        warps = num_warps or (8 if bm >= 128 else 4)
        stages = num_stages or 2
        grid = (num_tokens // bq + num_seqs, num_kv_heads, 1)
    if bm < group:
        raise ValueError(f"block_m={bm} is smaller than the GQA group {group}")

    if splits > 1:
        part_out = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel
    _attn_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_lse,
        qsl, ctx, bt,
        num_seqs, splits, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), num_heads,
        BLOCK_SIZE=block_size, GROUP=group, HEAD_D=head_dim, D_PAD=d_pad,
        BLOCK_M=bm, BLOCK_Q=bq, BLOCK_N=bn,
        SPLIT=splits > 1, DECODE=decode, PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, qsl, out.stride(0), out.stride(1), num_heads, splits,
            S_PAD=triton.next_power_of_2(splits), HEAD_D=head_dim, D_PAD=d_pad,
            num_warps=4,
        )
    return out


__all__ = ["decode_num_splits", "paged_attention_triton", "write_kv_triton"]
