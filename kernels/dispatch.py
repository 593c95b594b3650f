"""Choosing between the Triton kernel and the PyTorch reference for a tensor."""

from __future__ import annotations

import importlib.util

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` lives on a CUDA device and Triton is importable.

    The Triton kernels are only taken on CUDA; the CPU (and any other device) always runs the
    PyTorch reference, so the whole engine works without a GPU.
    """
    return _HAS_TRITON and t.is_cuda


def triton_available() -> bool:
    """Whether the `triton` package can be imported at all (for tests and diagnostics)."""
    return _HAS_TRITON
