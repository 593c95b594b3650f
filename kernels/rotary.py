"""Rotary position embeddings (the rotate-half / GPT-NeoX layout used by the Llama family)."""

from __future__ import annotations

import math
from typing import Any

import torch

from kernels.dispatch import use_triton


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept, and
    the band between is interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(
    rotary_dim: int,
    max_position: int,
    base: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Precomputed [max_position, rotary_dim] float32 table: cos in the first half, sin in the second.

    `scaling` is a Hugging Face `rope_scaling` dict; types `default` (or None), `linear` and `llama3`
    are supported, anything else is a ValueError naming the type.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = None if scaling is None else (scaling.get("rope_type") or scaling.get("type"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: rotates q ([T, Hq, D]) and k ([T, Hk, D]) by their token positions ([T])."""
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rot(q), rot(k)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries and keys at `positions`, with the table from `rotary_cos_sin`."""
    if use_triton(q):
        from kernels.triton.rotary import apply_rotary_triton

        return apply_rotary_triton(q, k, positions, cos_sin)
    return apply_rotary_ref(q, k, positions, cos_sin)
