"""Tensor parallelism's arithmetic and collectives: which slice of each weight a rank holds, and the
three collectives the sharded model runs (all-reduce, gather to rank 0, broadcast).

The split is Megatron's, as vLLM does it: q/k/v and gate/up by column (each rank computes its own
heads and its own part of the MLP), o and down by row (each rank's partial product is summed by an
all-reduce), the embedding and the LM head by vocabulary. Every rank holds `num_kv_heads / N` KV
heads; when there are fewer KV heads than ranks, each KV head is replicated on `N / num_kv_heads`
ranks, so every rank still holds exactly one.

The process group is built directly on a TCP store, not through `init_process_group`: the engine
leaves no global state behind, so a process can run one tensor-parallel engine after another.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ModelInfo


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed or died; the engine cannot run any more steps."""


def check_tp_shape(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Raises ValueError, naming the number that does not divide, if a model cannot be split `size` ways."""
    problems = []
    if num_heads % size:
        problems.append(f"num_attention_heads {num_heads} is not divisible by it")
    if num_kv_heads >= size and num_kv_heads % size:
        problems.append(f"num_key_value_heads {num_kv_heads} is not divisible by it")
    if num_kv_heads < size and size % num_kv_heads:
        problems.append(f"it is not a multiple of num_key_value_heads {num_kv_heads} (KV heads are replicated)")
    if intermediate_size % size:
        problems.append(f"intermediate_size {intermediate_size} is not divisible by it")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not fit the model: " + "; ".join(problems))


@dataclass
class TPGroup:
    """One rank's place in a tensor-parallel group and its collectives; `size == 1` is no parallelism
    (every collective is then a no-op)."""

    rank: int = 0
    size: int = 1
    pg: Any = None  # the torch ProcessGroup (gloo on CPU, NCCL on CUDA); None when size == 1

    # -- the shard of each dimension --------------------------------------------------------------
    def split(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` (which the caller checked divides)."""
        n = total // self.size
        return self.rank * n, n

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this rank holds: its share, or one replicated head."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads)
        return self.rank // (self.size // num_kv_heads), 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """(first token id, padded row count) of this rank's vocabulary rows; the last rank's share
        may run past the vocabulary, its extra rows are zeros."""
        n = -(-vocab_size // self.size)
        return self.rank * n, n

    def local_info(self, info: ModelInfo) -> ModelInfo:
        """The shape facts as this rank sees them: its query heads and KV heads."""
        return dataclasses.replace(info, num_heads=info.num_heads // self.size,
                                   num_kv_heads=self.kv_heads(info.num_kv_heads)[1])

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums `t` over the ranks, in place."""
        if self.size > 1:
            self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t`, in place."""
        if self.size > 1:
            self.pg.broadcast(t, 0).wait()
        return t

    def gather_columns(self, t: torch.Tensor, width: int) -> torch.Tensor | None:
        """Every rank's [rows, k] block side by side on rank 0, cut to `width` columns (None elsewhere)."""
        if self.size == 1:
            return t[:, :width] if t.shape[1] != width else t
        opts = torch.distributed.GatherOptions()
        opts.rootRank = 0
        t = t.contiguous()
        if self.rank == 0:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            self.pg.gather([parts], [t], opts).wait()
            return torch.cat(parts, dim=-1)[:, :width]
        self.pg.gather([], [t], opts).wait()
        return None


def connect(rank: int, size: int, host: str, port: int, device: torch.device, timeout_s: float,
            store: Any = None) -> TPGroup:
    """Joins the group whose TCP store rank 0 serves at host:port (rank 0 passes its own `store`).

    Every collective gives up after `timeout_s`, so a rank that hangs brings the others down
    instead of stalling them forever (a rank that dies is noticed at once: its sockets close)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, size, False, timeout=timeout)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, timeout)
    return TPGroup(rank, size, pg)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of `rank`: the next CUDA index after the engine's for each rank; the CPU for all."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)
