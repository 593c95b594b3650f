"""Plain configuration objects of the engine: what the caller chose and what the model is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Cards with at least this much memory get the large batch limits below (vLLM draws the same line
# for its offline defaults: the H100 and H200 class).
LARGE_CARD_BYTES = 70 * 2**30


def default_batch_limits(device_type: str, device_memory_bytes: int | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when the caller gives none, from the device.

    A large card holds the KV cache of many more sequences than 256 and computes a 16k-token
    prefill step about as efficiently per token as an 8k one, so it gets 1,024 sequences and
    16,384 tokens; a smaller card 256 and 8,192; a CPU 256 and 2,048 (a step there is compute
    bound already at a few hundred tokens, and a long one only delays every sequence's next token).
    """
    if device_type == "cuda":
        if device_memory_bytes is not None and device_memory_bytes >= LARGE_CARD_BYTES:
            return 1024, 16384
        return 256, 8192
    return 256, 2048


def default_priority_yield(device_type: str) -> float | None:
    """`EngineConfig.priority_yield` when the caller gives none, from the device."""
    return None if device_type == "cuda" else 0.5


@dataclass
class EngineConfig:
    """How the engine runs: the caller's choices, validated once, passed down as a plain object."""

    model: str = "smollm2-135m-instruct"  # a model directory or the name of a model in the cache
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory (see Engine)
    max_num_seqs: int | None = None  # None: `default_batch_limits` of the device
    max_num_batched_tokens: int | None = None  # None: `default_batch_limits` of the device
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
    # In a step that carries requests of a better priority step (interactive), the worse steps
    # (bulk) get at most this many tokens per token of the best step's, so a step with interactive
    # work in it is at most (1 + this) times as long as the interactive work alone. None: 0.5 on a
    # CPU (a step's time grows with its tokens: interactive latency stays within 1.5x of an idle
    # worker's, bulk keeps a third of the steps' tokens meanwhile), no limit on CUDA (a decode
    # step of many sequences costs about what one of few does: holding bulk back would cost
    # throughput, not save time).
    priority_yield: float | None = None
    # Model processes, one per device, each holding 1/N of the weights and of the KV heads
    # (engine.parallel); on CUDA rank r uses the device after the engine's by r.
    tensor_parallel_size: int = 1
    # A collective between tensor-parallel ranks that takes longer gives up and stops the engine:
    # a rank that hangs cannot hang the others for ever (one that dies is noticed at once). Long
    # enough for a first step's kernel compilations on a loaded host.
    distributed_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            problems.append(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            problems.append(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            problems.append(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "float64"):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            problems.append(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.priority_yield is not None and not self.priority_yield > 0:
            problems.append(f"priority_yield must be > 0, got {self.priority_yield}")
        if self.distributed_timeout_s <= 0:
            problems.append(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
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
