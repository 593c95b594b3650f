"""RMSNorm, alone and fused with the residual add: one program per row, the row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        # The sum is rounded to the storage dtype first, as `x + residual` in PyTorch is, so the
        # residual stream carried to the next layer is the same tensor the reference produces.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # Round the normalised value to the input dtype before the weight multiply (the Hugging Face
    # Llama order) so that low-precision outputs match the reference, then multiply in float32
    # and round once, which is what a bf16 * bf16 product in PyTorch does.
    normed = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as [rows, hidden] with unit stride along hidden (a copy only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_config(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    # Enough warps that each thread holds at most a few 16-byte vectors of the row.
    warps = max(1, min(16, block // 512))
    return block, warps


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of `x` ([..., H]) with `weight` ([H]); same result and dtype as `rms_norm_ref`."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    block, warps = _launch_config(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, x2, weight, out, out, hidden, eps,
        x2.stride(0), x2.stride(0), out.stride(0), out.stride(0),
        BLOCK=block, HAS_RESIDUAL=False, num_warps=warps,
    )
    return out.view(x.shape)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass, like `fused_add_rms_norm_ref`.

    The inputs are left untouched; both outputs are new tensors.
    """
    hidden = x.shape[-1]
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    x2, r2 = _rows(x), _rows(residual)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    if x2.shape[0] > 0:
        block, warps = _launch_config(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, summed, hidden, eps,
            x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
            BLOCK=block, HAS_RESIDUAL=True, num_warps=warps,
        )
    return out.view(x.shape), summed.view(x.shape)
