"""Rotary position embedding (rotate-half layout): one program per token rotates all its heads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, t, stride_st, stride_sh, stride_dt, stride_dh, n_heads, cos, sin,
                  HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    cols = tl.arange(0, HALF_PAD)
    ok = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    src = src_ptr + t * stride_st + heads[:, None] * stride_sh + cols[None, :]
    dst = dst_ptr + t * stride_dt + heads[:, None] * stride_dh + cols[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cs_ptr,
    n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    cs_ok = cols < HALF
    # The table is rounded to the activation dtype first, as the reference does, so that bf16
    # results differ from it only by the rounding of the final sums.
    cos = tl.load(cs_ptr + pos * stride_cs + cols, mask=cs_ok, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + cols, mask=cs_ok, other=0.0)
    cos = cos.to(q_out_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = sin.to(q_out_ptr.dtype.element_ty).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, n_q_heads, cos, sin,
                  HALF, QH_PAD, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, n_k_heads, cos, sin,
                  HALF, KH_PAD, HALF_PAD)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q ([T, Hq, D]) and k ([T, Hk, D]) by `positions` ([T]); new tensors, like the reference.

    `cos_sin` is the [max_position, D] float32 table from `rotary_cos_sin` (cos half, sin half);
    as in the reference the rotary dimension is the whole head.
    """
    num_tokens, n_q, head_dim = q.shape
    n_k = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} must agree "
            "as [T, Hq, D], [T, Hk, D] and [T]"
        )
    if cos_sin.shape[-1] != head_dim:
        raise ValueError(f"cos_sin has rotary dim {cos_sin.shape[-1]}, heads have {head_dim}; they must match")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin, n_q, n_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        QH_PAD=triton.next_power_of_2(n_q), KH_PAD=triton.next_power_of_2(n_k),
        num_warps=4,
    )
    return q_out, k_out
