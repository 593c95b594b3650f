"""SiLU-and-multiply, the gate of the Llama MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference: `x` is [..., 2*I] (gate then up); returns silu(gate) * up, [..., I]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `x` = [gate | up] along the last dimension."""
    if use_triton(x):
        from kernels.triton.activation import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
