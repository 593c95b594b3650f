"""Plain configuration objects of the engine: what the caller chose and what the model is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EngineConfig:
    """How the engine runs: the caller's choices, validated once, passed down as a plain object."""

    model: str = "smollm2-135m-instruct"  # a model directory or the name of a model in the cache
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory (see Engine)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    cache_dir: Path | None = None  # where models are found by name; None: ~/.cache/tokenmill/models
    kv_cache_memory_bytes: int | None = None  # CPU: KV pool size in bytes when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # CUDA: never capture graphs
    # Launch step N+1 before reading step N's tokens, so the host's work hides behind the GPU's.
    # None: on for CUDA, off elsewhere (a CPU computes while it launches: nothing to hide).
    overlap_steps: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            problems.append(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            problems.append(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            problems.append(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "float64"):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class ModelInfo:
    """The shape facts of a loaded model that the cache, scheduler and runner need."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int] = field(default_factory=list)
