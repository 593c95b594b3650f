"""The GPUs this host shows, found without importing torch: the parent of GPU-pinned workers
(`tokenmill worker --gpus all`, `tokenmill up`) must not initialise CUDA before its children exist."""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpu_ids() -> list[str]:
    """The CUDA ids of the visible GPUs, one worker each: those `CUDA_VISIBLE_DEVICES` names when it
    is set (empty: none), else 0..n-1 for the n GPUs `nvidia-smi -L` lists (none without it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i in range(sum(1 for line in out.splitlines() if line.startswith("GPU ")))]


def gpu_groups(ids: list[str], size: int) -> list[list[str]]:
    """The GPUs in groups of `size`, one tensor-parallel worker each, in order; GPUs left over
    after the last whole group get no worker. ValueError when there are fewer than `size`."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {size}")
    if len(ids) < size:
        raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs per worker, but "
                         f"{len(ids)} {'is' if len(ids) == 1 else 'are'} visible ({','.join(ids) or 'none'})")
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]
