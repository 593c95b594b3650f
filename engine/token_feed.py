"""Input tokens of a step that are still on the device (overlapped steps, see engine.engine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenFeed:
    """Input tokens that are still on the device: row `rows[i]` of the step takes
    `tokens[src[i]]`, a token the previous step sampled."""

    tokens: torch.Tensor
    rows: list[int]
    src: list[int]
