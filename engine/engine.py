"""The engine: requests in, one continuous batch per step, outputs out.

`Engine.step()` reads top to bottom: the scheduler picks the step's work, the runner computes
logits, the sampler picks tokens, and each sequence's new token is checked against its stop
conditions; finished requests leave at once and free their blocks.

Overlapped steps (on by default on CUDA): a step is launched before the previous step's tokens are
read back, so the host's bookkeeping runs while the GPU computes. A decode then takes its input
token straight from the previous step's sampled tokens on the device; a request that the previous
token ended (EOS, a stop string) has run one step too many, whose token is dropped. Requests whose
sampling needs their latest token on the host (penalties, logprobs) turn the overlap off while
they live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, check_stop_token, find_stop, stop_holdback
from engine.kv_cache import KVCacheManager
from engine.loader import load_model, resolve_model
from engine.outputs import CompletionOutput, RequestOutput
from engine.readback import Readback, SampledStep
from engine.request import Request, RequestStatus
from engine.runner import ModelRunner, TokenFeed
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.tokenizer import Tokenizer

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on CPU when neither blocks nor bytes are given


@dataclass(eq=False)
class _Sequence:
    """A request plus its text state."""

    request: Request
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0


@dataclass(eq=False)
class _Group:
    """The n sequences of one submitted prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # an output every step it changes, not only the final one
    seqs: list[_Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    """Live figures of the engine, for metrics and monitoring."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefix_cache_hit_tokens: int
    preemptions: int
    steps: int
    last_batch_size: int  # requests that ran in the latest step
    peak_batch_size: int  # most requests that ran together in one step so far


class Engine:
    """Continuous-batching generation engine over a paged KV cache.

    Drive it with `add_request`, then `step` while `has_unfinished()`; `abort` cancels.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        config = config or EngineConfig(**kwargs)
        self.config = config
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        if config.load_format == "dummy" and not _is_model_dir(config.model):
            model_src: Any = config.model
        else:
            model_src = resolve_model(config.model, config.cache_dir)
        self.model, self.info = load_model(model_src, device=self.device, dtype=config.dtype,
                                           load_format=config.load_format)
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = Tokenizer(model_src) if _has_tokenizer(model_src) else None
        eos = list(self.info.eos_token_ids)
        if self.tokenizer is not None:
            eos = sorted(set(eos) | set(self.tokenizer.eos_token_ids))
        self.eos_token_ids = eos
        self.max_model_len = min(config.max_model_len or self.info.max_model_len, self.info.max_model_len)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        self.kv = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.info, self.num_blocks, config.block_size,
                                  self.device, self.dtype, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, enforce_eager=config.enforce_eager)
        self.sampler = Sampler(self.info.vocab_size, self.eos_token_ids)
        self.overlap_steps = (self.device.type == "cuda" if config.overlap_steps is None
                              else config.overlap_steps)
        self._readback = Readback(self.device, config.max_num_seqs)
        self._in_flight: SampledStep | None = None  # launched, tokens not read yet
        self._num_no_defer = 0  # live requests whose tokens must be read at once
        self._groups: dict[str, _Group] = {}
        self._seq_of: dict[int, tuple[_Group, _Sequence]] = {}
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._steps = 0
        self._last_batch = 0
        self._peak_batch = 0

    # -- sizing ------------------------------------------------------------------------------
    def _num_kv_blocks(self) -> int:
        c = self.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(self.info, c.block_size, self.dtype)
        if self.device.type == "cuda":
            # What a full step needs is measured by running one, so the pool takes the rest.
            budget = ModelRunner.profile_kv_cache_bytes(
                self.model, self.info, self.device, c.max_num_batched_tokens, c.max_num_seqs,
                c.block_size, c.gpu_memory_utilization)
        else:
            budget = c.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        # More blocks than every sequence at full length could use is memory for nothing.
        useful = c.max_num_seqs * -(-self.max_model_len // c.block_size)
        return max(1, min(budget // per_block, useful))

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int] | None = None,
                 messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a text prompt, a token-id prompt, or chat messages (via the chat template)."""
        if messages is not None:
            if prompt is not None:
                raise ValueError("give either prompt or messages, not both")
            return self._require_tokenizer().apply_chat_template(messages)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self._require_tokenizer().encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a token-id prompt must be a list of integers")
            return list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (dummy weights): give prompts as token ids")
        return self.tokenizer

    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *, messages: list[dict[str, Any]] | None = None,
                    priority: int = 0, arrival_time: float | None = None, stream: bool = True) -> None:
        """Queues a request. Raises ValueError, naming what is wrong, for input it cannot run.

        With `stream=False`, `step` returns the request's output only once it has finished (the
        offline path, where building an output per request per step is host time for nothing)."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt, messages)
        self._validate_prompt(ids, params)
        group = _Group(request_id, prompt if isinstance(prompt, str) else None, ids, params, stream)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for i in range(params.n):
            req = Request(request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                          prompt_token_ids=ids, params=params, priority=priority,
                          arrival_time=arrival, seq_index=i)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer.hf, ids, params.skip_special_tokens)
            seq = _Sequence(req, detok)
            group.seqs.append(seq)
            self._seq_of[id(req)] = (group, seq)
            self.scheduler.add(req)
        self._groups[request_id] = group
        if not Sampler.can_defer(params):
            self._num_no_defer += 1
        self._prompt_tokens += len(ids) * params.n

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                f"tokens (prompt plus at least one generated token); shorten the prompt")
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = self.kv.blocks_needed(longest)
        if need > self.num_blocks:
            raise ValueError(
                f"request needs {need} KV cache blocks ({longest} tokens) but the cache has only "
                f"{self.num_blocks}; lower max_tokens or give the engine more KV memory")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request now (finish reason "abort") and frees its blocks; None if unknown."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.request.is_finished:
                self._finish(seq, "abort")
        return self._output(group, final=True)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._groups)

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one batch step; returns an output for every request that changed.

        Overlapped, the outputs are those of the previous step, read while this one runs."""
        overlap = self.overlap_steps and self._num_no_defer == 0
        outputs: list[RequestOutput] = []
        if not overlap and self._in_flight is not None:
            outputs = self._process(self._in_flight)
            self._in_flight = None
        batch = self.scheduler.schedule()
        launched = self._launch(batch, defer=overlap) if batch.requests else None
        if self._in_flight is not None:
            outputs += self._process(self._in_flight)
            self._in_flight = None
        if launched is not None:
            if overlap:
                self._in_flight = launched
            else:
                outputs += self._process(launched)
        return outputs

    def _launch(self, batch: ScheduledBatch, defer: bool) -> SampledStep | None:
        """Runs the model and the sampler on the step (asynchronously on a GPU); with `defer` the
        tokens are left on the device and counted as pending."""
        # Requests whose chunk reaches the end of their tokens get a new token this step.
        sample_rows = [i for i, (r, n) in enumerate(zip(batch.requests, batch.num_tokens))
                       if r.num_computed_tokens + n == r.num_tokens]
        feed = None
        if self._in_flight is not None:
            # Decodes whose input is the token the step in flight sampled.
            rows = [i for i, r in enumerate(batch.requests)
                    if r.num_pending and r.num_computed_tokens >= r.num_known_tokens]
            if rows:
                feed = TokenFeed(self._in_flight.tokens, rows, [batch.requests[i].pending_index for i in rows])
        logits = self.runner.execute(batch.requests, batch.num_tokens, sample_rows, feed)
        self._last_batch = len(batch.requests)
        self._peak_batch = max(self._peak_batch, self._last_batch)
        self.scheduler.after_step(batch)
        self._steps += 1
        sampled = [batch.requests[i] for i in sample_rows]
        if not sampled:
            return None
        raw, tokens = self.sampler.sample_tokens(logits, sampled)
        if not defer:
            return SampledStep(sampled, tokens, self.sampler.results(raw, tokens, [r.params for r in sampled]))
        for j, r in enumerate(sampled):
            r.num_pending += 1
            r.pending_index = j
            if (len(r.output_token_ids) + r.num_pending >= r.params.max_tokens
                    or r.num_tokens >= self.max_model_len):
                r.final_pending = True  # ends by length: no step after this one
        return self._readback.start(sampled, tokens)

    def _process(self, step: SampledStep) -> list[RequestOutput]:
        """Appends a launched step's tokens to their requests; outputs of those that changed."""
        deferred = step.picks is None  # its tokens were counted as pending at launch
        picks = step.read()
        changed: dict[str, _Group] = {}
        now = time.monotonic()
        for req, pick in zip(step.requests, picks):
            if deferred:
                req.num_pending -= 1
            entry = self._seq_of.get(id(req))
            if entry is None or req.is_finished:
                continue  # ended by an earlier token (or aborted): this one is dropped
            group, seq = entry
            self._append_token(seq, pick, now)
            changed[group.request_id] = group
        return [self._output(group, final=done) for group in changed.values()
                if (done := group.finished) or group.stream]

    def _append_token(self, seq: _Sequence, pick: Any, now: float) -> None:
        req = seq.request
        token = pick.token_id
        req.output_token_ids.append(token)
        if req.params.logprobs is not None:
            req.logprobs.append(pick)
        if req.first_token_time is None:
            req.first_token_time = now
        self._generated_tokens += 1
        reason = check_stop_token(req, token, self.eos_token_ids)
        if reason is not None:
            if token in req.params.stop_token_ids:
                req.stop_reason = token  # EOS reports no stop reason, as OpenAI-style APIs do
            self._finish(seq, reason)
            return
        if seq.detok is not None:
            new_text = seq.detok.step([token])
            if new_text:
                seq.text += new_text
                if req.params.stop and len(req.output_token_ids) >= req.params.min_tokens:
                    hit = find_stop(seq.text, len(new_text), req.params.stop)
                    if hit is not None:
                        index, stop = hit
                        seq.text = seq.text[:index]
                        req.stop_reason = stop
                        self._finish(seq, "stop")
                        return
        if len(req.output_token_ids) >= req.params.max_tokens or req.num_known_tokens >= self.max_model_len:
            if seq.detok is not None:
                seq.text += seq.detok.flush()  # a character left incomplete at the end
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        req = seq.request
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        if req.status is not RequestStatus.FINISHED:
            self.scheduler.remove(req)
            req.status = RequestStatus.FINISHED

    def _release(self, group: _Group) -> None:
        del self._groups[group.request_id]
        if not Sampler.can_defer(group.params):
            self._num_no_defer -= 1
        for seq in group.seqs:
            self._seq_of.pop(id(seq.request), None)

    def _output(self, group: _Group, final: bool) -> RequestOutput:
        completions = []
        for i, seq in enumerate(group.seqs):
            req = seq.request
            done = req.is_finished
            visible = len(seq.text)
            if not done and req.params.stop:
                visible -= stop_holdback(seq.text, req.params.stop)
            visible = max(visible, seq.emitted_chars)
            delta_text = seq.text[seq.emitted_chars:visible]
            delta_ids = req.output_token_ids[seq.emitted_tokens:]
            seq.emitted_chars, seq.emitted_tokens = visible, len(req.output_token_ids)
            # Only a final output gets copies; a step's output shares the live lists (its callers
            # read the deltas), which keeps a step's cost independent of how long outputs are.
            token_ids = list(req.output_token_ids) if final else req.output_token_ids
            logprobs = None
            if req.params.logprobs is not None:
                logprobs = list(req.logprobs) if final else req.logprobs
            completions.append(CompletionOutput(
                index=i, text=seq.text[:visible], token_ids=token_ids,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=logprobs, delta_text=delta_text, delta_token_ids=delta_ids))
        first = group.seqs[0].request
        if final and group.request_id in self._groups:
            self._release(group)
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            outputs=completions, finished=final, prompt_tokens=len(group.prompt_token_ids),
            cached_tokens=first.num_cached_tokens, arrival_time=first.arrival_time,
            first_token_time=min((s.request.first_token_time for s in group.seqs
                                  if s.request.first_token_time is not None), default=None),
            finish_time=max((s.request.finish_time or 0.0 for s in group.seqs), default=None) if final else None)

    # -- monitoring --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Current running/waiting counts, KV use and token totals."""
        return EngineStats(
            running=self.scheduler.num_running, waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv.num_used_blocks, kv_blocks_total=self.num_blocks,
            prompt_tokens_total=self._prompt_tokens, generated_tokens_total=self._generated_tokens,
            prefix_cache_hit_tokens=self.kv.hits, preemptions=self.scheduler.num_preemptions,
            steps=self._steps, last_batch_size=self._last_batch, peak_batch_size=self._peak_batch)


def _is_model_dir(model: Any) -> bool:
    return isinstance(model, (str, Path)) and Path(model).is_dir()


def _has_tokenizer(model_src: Any) -> bool:
    if not isinstance(model_src, (str, Path)):
        return False
    d = Path(model_src)
    return d.is_dir() and any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))

