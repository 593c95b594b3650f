"""`LLM`: the offline face of the engine. Give it prompts, get completions back in order."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Sequence

from engine.config import EngineConfig
from engine.engine import Engine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching.

    `model` is a model directory or the name of a model in the cache (default
    `smollm2-135m-instruct`, put there once by `tokenmill fetch`).
    Other keyword arguments are fields of `EngineConfig`; batch limits left at None are sized from
    the device (`engine.config.default_batch_limits`). With `tensor_parallel_size=N` the model is
    split over N processes (`engine.parallel`); `close()` (or a `with` block) stops them.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", device: str = "cpu", dtype: str = "auto",
                 block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 load_format: str = "auto", **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(
            model=model, device=device, dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, load_format=load_format, **kwargs))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine's model processes (tensor parallelism); a no-op otherwise."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def tokenizer(self):
        """The model's tokenizer wrapper (None for dummy weights)."""
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: int | Sequence[int] = 0, progress: bool = False) -> list[RequestOutput]:
        """Completes each prompt (text or token ids); returns one output per prompt, in order.

        A prompt the engine cannot take (empty, longer than the context, ...) gets an output with
        finish reason "error" and the reason in `.error`; the others still run.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # one prompt, as text or as token ids
        items = [{"prompt": p} for p in prompts]
        return self._run(items, sampling_params, priority, progress)

    def chat(self, conversations: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             priority: int | Sequence[int] = 0, progress: bool = False) -> list[RequestOutput]:
        """Like `generate`, for chat conversations (lists of {"role", "content"} messages),
        formatted with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        items = [{"messages": c} for c in conversations]
        return self._run(items, sampling_params, priority, progress)

    def _run(self, items: list[dict[str, Any]], sampling_params: Any, priority: Any,
             progress: bool) -> list[RequestOutput]:
        n = len(items)
        params = _per_item(sampling_params or SamplingParams(), n, "sampling_params")
        priorities = _per_item(priority, n, "priority")
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for item, p, prio in zip(items, params, priorities):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            try:
                self.engine.add_request(rid, item.get("prompt"), p, messages=item.get("messages"),
                                        priority=prio, stream=False)
            except ValueError as e:
                results[rid] = _error_output(rid, item.get("prompt"), str(e))
        self._drain(results, n - len(results), progress)
        return [results[rid] for rid in order]

    def _drain(self, results: dict[str, RequestOutput], todo: int, progress: bool) -> None:
        on_step: Callable[[list[RequestOutput]], None] | None = None
        bar = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]:>9.1f} tok/s"), TimeRemainingColumn())
            task = bar.add_task("gen", total=todo, rate=0.0)
            start, tokens0 = time.perf_counter(), self.engine.stats().generated_tokens_total

            def on_step(outs: list[RequestOutput]) -> None:
                tokens = self.engine.stats().generated_tokens_total - tokens0
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=sum(o.finished for o in outs), rate=rate)

            bar.start()
        try:
            while self.engine.has_unfinished():
                outs = self.engine.step()
                for out in outs:
                    if out.finished:
                        results[out.request_id] = out
                if on_step is not None:
                    on_step(outs)
        finally:
            if bar is not None:
                bar.stop()


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; give one or one per prompt")
        return list(value)
    return [value] * n


def _error_output(rid: str, prompt: Any, message: str) -> RequestOutput:
    return RequestOutput(
        request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=list(prompt) if isinstance(prompt, list) else [],
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
        finished=True, prompt_tokens=0, error=message)
