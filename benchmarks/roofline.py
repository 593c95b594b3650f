"""The two ceilings of a GPU (copy bandwidth, bf16 matmul rate) and the roofline of an engine run.

The roofline of a step is max(bytes it must move / copy bandwidth, FLOPs / matmul rate): no
implementation runs that step faster. Bytes are the weights (read once per step), the KV cache the
step's queries attend to (read once) and the KV it adds (written once), plus the embedding rows it
gathers; activations are left out (they are small next to the weights in a decode, and a prefill is
compute-bound). FLOPs are the matmuls (2 per weight per token; the vocabulary projection only for
the rows that are sampled) and attention (4 per head dimension per query-key pair, causal pairs
only). Summed over the steps of a run it gives the run's floor; floor / measured time is the share
of the roofline reached.

    python benchmarks/roofline.py          # prints the card's copy bandwidth and bf16 matmul rate
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def measure_copy_bandwidth(device: str | torch.device = "cuda", nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


def measure_matmul_rate(device: str | torch.device = "cuda", n: int = 8192) -> float:
    """bf16 matrix product rate in FLOP/s (n x n x n, random operands, through torch/cuBLAS)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = _median_ms(lambda: a @ b)
    return 2 * n**3 / (ms / 1e3)


@dataclass
class ModelCost:
    """Per-step bytes and FLOPs of a Llama-family model, from its parameters and shape."""

    layer_bytes: int  # decoder layers' parameters plus the final norm, read every step
    layer_matmul_params: int  # weights of the layers' linear maps (2 FLOPs each per token)
    vocab: int
    hidden: int
    itemsize: int
    kv_bytes_per_token: int
    attn_flops_per_pair: int  # per (query token, key) pair, all layers and heads

    @classmethod
    def of(cls, model: torch.nn.Module, info) -> ModelCost:
        """Measured off an engine model (engine.models.llama.LlamaForCausalLM) and its ModelInfo."""
        itemsize = next(model.parameters()).element_size()
        layer_bytes = sum(p.numel() for p in model.layers.parameters()) * itemsize + model.norm.numel() * itemsize
        matmul = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
        return cls(
            layer_bytes=layer_bytes, layer_matmul_params=matmul, vocab=info.vocab_size,
            hidden=info.hidden_size, itemsize=itemsize,
            kv_bytes_per_token=2 * info.num_layers * info.num_kv_heads * info.head_dim * itemsize,
            attn_flops_per_pair=4 * info.num_layers * info.num_heads * info.head_dim)

    def step(self, query_lens: np.ndarray, context_lens: np.ndarray, num_sampled: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one step: sequences with `query_lens` new tokens each, reaching
        `context_lens`, of which `num_sampled` rows go through the vocabulary projection."""
        q = query_lens.astype(np.float64)
        ctx = context_lens.astype(np.float64)
        tokens = q.sum()
        cached = (ctx - q).sum()
        head = self.vocab * self.hidden * self.itemsize if num_sampled else 0
        nbytes = (self.layer_bytes + head + tokens * self.hidden * self.itemsize
                  + self.kv_bytes_per_token * (cached + tokens))
        pairs = (q * (ctx - q) + q * (q + 1) / 2).sum()
        flops = (2 * self.layer_matmul_params * tokens + 2 * self.vocab * self.hidden * num_sampled
                 + self.attn_flops_per_pair * pairs)
        return nbytes, flops


@dataclass
class Roofline:
    """Accumulates the floor of every step of a run."""

    cost: ModelCost
    bandwidth: float  # bytes/s
    matmul_rate: float  # FLOP/s
    seconds: float = 0.0
    bytes: float = 0.0
    flops: float = 0.0
    memory_bound_steps: int = 0
    steps: int = 0
    decode_steps: int = 0
    _pending: list = field(default_factory=list)

    def record(self, query_lens: np.ndarray, context_lens: np.ndarray, num_sampled: int) -> None:
        """Keeps a step for `finish` (cheap: the run is being timed meanwhile)."""
        self._pending.append((query_lens, context_lens, num_sampled))

    def finish(self) -> Roofline:
        """Adds up the recorded steps."""
        for q, ctx, k in self._pending:
            b, f = self.cost.step(q, ctx, k)
            tb, tf = b / self.bandwidth, f / self.matmul_rate
            self.seconds += float(max(tb, tf))
            self.bytes += float(b)
            self.flops += float(f)
            self.memory_bound_steps += int(tb >= tf)
            self.steps += 1
            self.decode_steps += int(q.max()) == 1
        self._pending.clear()
        return self


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    bw = measure_copy_bandwidth()
    mm = measure_matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s (read + write), "
          f"bf16 matmul {mm / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
