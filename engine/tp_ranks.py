"""The model processes of a tensor-parallel engine: rank 0 (the engine's own process) starts ranks
1..N-1, and drives them step by step.

Rank 0 runs everything that is not the model: the scheduler, the KV cache bookkeeping, the sampler.
The other ranks hold only their shard of the model and of the KV pool. Each step, rank 0 tells them
the step's shape over a pipe (the pipe is also where an idle rank waits, with no timeout, for as
long as the engine has no work), then broadcasts the step's flat batch (token ids, positions, slot
mapping, block tables, sampled rows) as one int64 tensor; every rank runs the same forward pass, the
collectives inside it join the shards, and rank 0 gets the logits.

A rank that dies closes its sockets, so the collective in flight fails at once and rank 0 raises
`TensorParallelError` naming the rank and its exit code; one that hangs is given up on after the
collective timeout. The ranks end with rank 0: they read the end of their pipe.

This module is the one place where the engine starts processes (`multiprocessing`, from a fork
server, else spawned): the model processes of one engine, as vLLM starts its workers; nothing else
of the engine does.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, ModelInfo
from engine.parallel import TensorParallelError, TPGroup, connect, rank_device
from kernels import AttnMetadata

# Starting a rank imports torch and joins the group: seconds, or a minute on a loaded machine.
STARTUP_TIMEOUT_S = 300.0
_POLL_S = 0.2


def _step_payload(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                  picked_idx: torch.Tensor | None) -> torch.Tensor:
    parts = [input_ids, positions, meta.slot_mapping, meta.query_start_loc.long(), meta.context_lens.long(),
             meta.block_tables.reshape(-1).long()]
    if picked_idx is not None:
        parts.append(picked_idx)
    return torch.cat(parts)


def _process_context() -> Any:
    """Where the ranks are started from: a fork server that imported the engine (and torch) once,
    so a rank starts in a fraction of a second instead of importing torch again; plain spawn
    where there is no fork server (Windows). Never a fork of this process: its threads and any
    CUDA state must not be copied."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class TPRanks:
    """Rank 0's handle on ranks 1..N-1: starts them, sends them commands and steps, stops them."""

    def __init__(self, config: EngineConfig, hf_config: Any, model_dir: Path | None) -> None:
        import torch.distributed as dist

        self.size = config.tensor_parallel_size
        self.device = torch.device(config.device)
        self.failed: str | None = None
        timeout = self._timeout_s = config.distributed_timeout_s
        # Port 0: the store picks a free port, and the ranks are told which.
        self._store = dist.TCPStore("127.0.0.1", 0, self.size, True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        ctx = _process_context()
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=rank_main, name=f"tokenmill-tp-rank{rank}", daemon=True,
                               args=(config, hf_config, model_dir, rank, self._store.port, theirs))
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        try:
            self._await_all("hello", STARTUP_TIMEOUT_S)
            self.group = connect(0, self.size, "127.0.0.1", self._store.port, rank_device(self.device, 0),
                                 timeout, store=self._store)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [p.pid for p in self._procs]

    # -- commands ----------------------------------------------------------------------------------
    def _send_all(self, message: tuple) -> None:
        for conn in self._conns:
            try:
                conn.send(message)
            except (OSError, EOFError) as e:
                raise self._failure(e) from e

    def _await_all(self, kind: str, timeout_s: float | None = None) -> list[Any]:
        """Each rank's answer to the last command, in rank order; a rank that dies or fails instead
        is a TensorParallelError naming it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        answers = []
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            while not conn.poll(_POLL_S):
                if not proc.is_alive():
                    raise self._failure(None)
                if deadline is not None and time.monotonic() > deadline:
                    raise self._fail(f"tensor-parallel rank {rank} did not answer {kind!r} within {timeout_s:.0f} s")
            try:
                got, value = conn.recv()
            except (OSError, EOFError) as e:
                raise self._failure(e) from e
            if got == "error":
                raise self._fail(f"tensor-parallel rank {rank} failed: {value}")
            answers.append(value)
        return answers

    def wait_loaded(self) -> list[int]:
        """Waits for every rank to load its shard of the weights; their weight bytes."""
        return self._await_all("loaded", STARTUP_TIMEOUT_S)

    def kv_budgets(self, max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> None:
        """Asks every rank to measure the KV memory it can give (CUDA: by running a full step, which
        rank 0 must run at the same time); `collect` reads the answers."""
        self._send_all(("kv_budget", max_num_batched_tokens, max_num_seqs, block_size))

    def collect(self) -> list[Any]:
        return self._await_all("answer")

    def allocate_kv(self, num_blocks: int) -> None:
        """Every rank allocates its share of the KV pool: `num_blocks` blocks of its KV heads."""
        self._send_all(("allocate_kv", num_blocks))
        self._await_all("allocate_kv", STARTUP_TIMEOUT_S)

    def memory(self) -> list[dict[str, int]]:
        """Each rank's (1..N-1) weight and KV cache bytes."""
        with self.guard():
            self._send_all(("memory",))
            return self._await_all("memory")

    # -- steps -------------------------------------------------------------------------------------
    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                  num_sampled: int, picked_idx: torch.Tensor | None) -> None:
        """Tells the ranks the step's shape, then broadcasts its flat batch; rank 0 then runs its
        own forward pass (inside `guard`)."""
        n, width = meta.block_tables.shape
        self._send_all(("step", int(input_ids.shape[0]), n, width, meta.max_query_len, meta.max_context_len,
                        num_sampled, picked_idx is not None))
        self.group.broadcast(_step_payload(input_ids, positions, meta, picked_idx))

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turns a failed collective (a rank died or timed out) into one TensorParallelError, and
        refuses every later step."""
        if self.failed is not None:
            raise TensorParallelError(self.failed)
        try:
            yield
        except TensorParallelError:
            raise
        except (RuntimeError, OSError, EOFError) as e:
            raise self._failure(e) from e

    def _fail(self, message: str) -> TensorParallelError:
        self.failed = message + "; the tensor-parallel engine has stopped"
        self.close()
        return TensorParallelError(self.failed)

    def _failure(self, cause: BaseException | None) -> TensorParallelError:
        """The error for a broken group: which rank ended and how, or what the collective said."""
        time.sleep(_POLL_S)  # a rank killed mid-step: let its exit be seen before it is named
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            reason = None
            with contextlib.suppress(OSError, EOFError, ValueError):
                if conn.poll(0):
                    got, value = conn.recv()
                    reason = value if got == "error" else None
            if reason is not None:
                return self._fail(f"tensor-parallel rank {rank} failed: {reason}")
            if not proc.is_alive():
                return self._fail(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
        if "timed out" in str(cause).lower():
            return self._fail(f"a tensor-parallel collective timed out after {self._timeout_s:g} s "
                              f"(distributed_timeout_s): a rank hung ({cause})")
        return self._fail(f"a tensor-parallel collective failed: {cause}")

    def close(self) -> None:
        """Stops the ranks: asks them to exit, then ends any that have not within a few seconds."""
        for conn in self._conns:
            with contextlib.suppress(OSError, EOFError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_cache_bytes(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of a KV pool."""
    return sum(t.numel() * t.element_size() for pair in kv_caches for t in pair)


def rank_main(config: EngineConfig, hf_config: Any, model_dir: Path | None, rank: int, port: int,
              conn: Any) -> None:
    """A model process of rank `rank` >= 1: joins the group, loads its shard of the model that
    `hf_config` describes (weights from `model_dir`; None: dummy weights), then runs what rank 0
    sends until it is told to stop or rank 0 is gone."""
    try:
        _serve(config, hf_config, model_dir, rank, port, conn)
    except (EOFError, KeyboardInterrupt):
        pass  # rank 0 has gone: nothing left to do
    except BaseException:
        with contextlib.suppress(OSError, EOFError, ValueError):
            conn.send(("error", traceback.format_exc(limit=-3).strip().splitlines()[-1]))
        raise
    # Nothing is left to flush, and tearing the process group down at interpreter exit waits for
    # peers that are gone: seconds per rank for nothing.
    os._exit(0)


def _serve(config: EngineConfig, hf_config: Any, model_dir: Path | None, rank: int, port: int, conn: Any) -> None:
    from engine.kv_sizing import kv_budget_bytes
    from engine.loader import load_model
    from engine.runner import allocate_kv_caches

    device = rank_device(torch.device(config.device), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # The ranks share the host's cores with rank 0: each takes its share, not all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    torch.manual_seed(config.seed)
    conn.send(("hello", os.getpid()))
    group = connect(rank, config.tensor_parallel_size, "127.0.0.1", port, device, config.distributed_timeout_s)
    model, info = load_model(hf_config, device=device, dtype=config.dtype, load_format=config.load_format,
                             seed=config.seed, tp=group, weights_dir=model_dir)
    local: ModelInfo = group.local_info(info)
    dtype = next(model.parameters()).dtype
    conn.send(("loaded", weight_bytes(model)))
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "step":
            _run_step(model, group, kv_caches, device, *message[1:])
        elif kind == "kv_budget":
            tokens, seqs, block_size = message[1:]
            conn.send(("answer", kv_budget_bytes(config, model, local, device, tokens, seqs, block_size)))
        elif kind == "allocate_kv":
            kv_caches = allocate_kv_caches(local, message[1], config.block_size, device, dtype)
            conn.send(("allocate_kv", None))
        elif kind == "memory":
            conn.send(("memory", {"weights": weight_bytes(model), "kv_cache": kv_cache_bytes(kv_caches)}))


@torch.inference_mode()
def _run_step(model: Any, group: TPGroup, kv_caches: list, device: torch.device, total: int, n: int,
              width: int, max_q: int, max_ctx: int, num_sampled: int, has_idx: bool) -> None:
    sizes = [total, total, total, n + 1, n, n * width] + ([num_sampled] if has_idx else [])
    payload = group.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=device))
    parts = payload.split(sizes)
    ids, positions, slots, query_start, context_lens, tables = parts[:6]
    meta = AttnMetadata(slot_mapping=slots, query_start_loc=query_start.int(), context_lens=context_lens.int(),
                        block_tables=tables.int().view(n, width), max_query_len=max_q, max_context_len=max_ctx)
    hidden = model(ids, positions, kv_caches, meta)
    if num_sampled:
        model.compute_logits(hidden if not has_idx else hidden.index_select(0, parts[6]))
