"""The engine: requests in, one continuous batch per step, outputs out.

`Engine.step()` reads top to bottom: schedule -> run -> postprocess. The scheduler picks the
step's work, the runner computes logits and the sampler picks tokens (`_launch`), and the
postprocessor appends each sequence's new token and checks its stop conditions (`_process`);
finished requests leave at once and free their blocks. Loading the model and sizing the parts is
`engine.factory`'s; the stop, text and delta rules are `engine.postprocess`'s.

Overlapped steps (on by default on CUDA): a step is launched before the previous step's tokens are
read back, so the host's bookkeeping runs while the GPU computes. A decode then takes its input
token straight from the previous step's sampled tokens on the device; a request that the previous
token ended (EOS, a stop string) has run one step too many, whose token is dropped. Sampling,
penalties and logprobs all run on the device, so they keep the overlap. Guided requests
(`engine.guided`) turn it off while they live: the mask of a grammar's next token needs the token
before it. Their masks are computed while the step's forward pass runs on the device.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.factory import build_engine_parts
from engine.guided import GuidedDecoder
from engine.outputs import RequestOutput
from engine.postprocess import Postprocessor
from engine.readback import Readback, SampledStep
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.sequence_group import SequenceGroup
from engine.stats import EngineStats
from engine.token_feed import TokenFeed
from engine.tokenizer import Tokenizer


class Engine:
    """Continuous-batching generation engine over a paged KV cache.

    Drive it with `add_request`, then `step` while `has_unfinished()`; `abort` cancels.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        parts = build_engine_parts(config or EngineConfig(**kwargs))
        self.config = config = parts.config
        self.device = parts.device
        self.model, self.info, self.dtype = parts.model, parts.info, parts.dtype
        self.tokenizer = parts.tokenizer
        self.eos_token_ids = parts.eos_token_ids
        self.max_model_len = parts.max_model_len
        self.block_size = config.block_size
        self.num_blocks = parts.num_blocks
        self.kv, self.scheduler, self.runner, self.sampler = parts.kv, parts.scheduler, parts.runner, parts.sampler
        self.overlap_steps = parts.overlap_steps
        self.tp = parts.tp
        # The model processes end with the engine, also when it is dropped without `close`.
        self._stop_ranks = weakref.finalize(self, parts.tp.close) if parts.tp is not None else None
        self.postprocess = Postprocessor(self.eos_token_ids, self.max_model_len)
        self.guided = GuidedDecoder(self.tokenizer, self.info.vocab_size, self.eos_token_ids)
        self._readback = Readback(self.device, config.max_num_seqs)
        self._in_flight: SampledStep | None = None  # launched, tokens not read yet
        self._groups: dict[str, SequenceGroup] = {}
        self._seq_of: dict[int, tuple[SequenceGroup, Sequence]] = {}
        self._prompt_tokens = 0
        self._prefill_tokens = 0
        self._generated_tokens = 0
        self._steps = 0
        self._last_batch = 0
        self._peak_batch = 0

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
                    priority: int = 0, arrival_time: float | None = None, stream: bool = True,
                    tenant: str | None = None, weight: float = 1.0) -> None:
        """Queues a request. Raises ValueError, naming what is wrong, for input it cannot run.

        ``tenant`` and ``weight``: whose request it is; requests of one priority are shared
        between tenants in proportion to their weights (the scheduler's fair queueing).

        With `stream=False`, `step` returns the request's output only once it has finished (the
        offline path, where building an output per request per step is host time for nothing)."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        params = params or SamplingParams()
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt, messages)
        self._validate_prompt(ids, params)
        grammar = params.grammar()
        group = SequenceGroup(request_id, prompt if isinstance(prompt, str) else None, ids, params, stream)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for i in range(params.n):
            req = Request(request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                          prompt_token_ids=ids, params=params, priority=priority,
                          arrival_time=arrival, seq_index=i, tenant=tenant, weight=weight,
                          leader=group.seqs[0].request if group.seqs else None)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer.hf, ids, params.skip_special_tokens)
            group.seqs.append(Sequence(req, detok))
        if grammar is not None:
            self.guided.add([seq.request for seq in group.seqs], grammar)  # ValueError: not usable
        for seq in group.seqs:
            self._seq_of[id(seq.request)] = (group, seq)
            self.scheduler.add(seq.request)
        self._groups[request_id] = group
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
        overlap = self.overlap_steps and self.guided.active == 0
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
        self._prefill_tokens += sum(max(0, min(r.num_computed_tokens + n, r.num_prompt_tokens) - r.num_computed_tokens)
                                    for r, n in zip(batch.requests, batch.num_tokens))
        logits = self.runner.execute(batch.requests, batch.num_tokens, sample_rows, feed)
        self._last_batch = len(batch.requests)
        self._peak_batch = max(self._peak_batch, self._last_batch)
        self.scheduler.after_step(batch)
        self._steps += 1
        sampled = [batch.requests[i] for i in sample_rows]
        if not sampled:
            return None
        pending = self._in_flight.tokens if self._in_flight is not None else None
        if self.guided.active:
            logits = self.guided.mask(logits, sampled)  # host work while the forward pass runs
        raw, tokens = self.sampler.sample_tokens(logits, sampled, pending)
        params = [r.params for r in sampled]
        if not defer:
            return SampledStep(sampled, tokens, self.sampler.results(raw, tokens, params))
        logprobs = self.sampler.logprob_tensors(raw, tokens, params)
        for j, r in enumerate(sampled):
            r.num_pending += 1
            r.pending_index = j
            if (len(r.output_token_ids) + r.num_pending >= r.params.max_tokens
                    or r.num_tokens >= self.max_model_len):
                r.final_pending = True  # ends by length: no step after this one
        return self._readback.start(sampled, tokens, logprobs)

    def _process(self, step: SampledStep) -> list[RequestOutput]:
        """Appends a launched step's tokens to their requests; outputs of those that changed."""
        deferred = step.picks is None  # its tokens were counted as pending at launch
        picks = step.read()
        changed: dict[str, SequenceGroup] = {}
        now = time.monotonic()
        for req, pick in zip(step.requests, picks):
            if deferred:
                req.num_pending -= 1
            entry = self._seq_of.get(id(req))
            if entry is None or req.is_finished:
                continue  # ended by an earlier token (or aborted): this one is dropped
            group, seq = entry
            self._generated_tokens += 1
            reason = self.postprocess.append_token(seq, pick, now)
            if self.guided.active:
                if reason in (None, "length"):
                    reason = self.guided.accept(req, pick.token_id) or self._length_reason(req)
                    if reason == "stop" and seq.detok is not None:
                        seq.text += seq.detok.flush()  # the grammar's end: no more bytes to come
            if reason is not None:
                self._finish(seq, reason)
            changed[group.request_id] = group
        return [self._output(group, final=done) for group in changed.values()
                if (done := group.finished) or group.stream]

    def _length_reason(self, req: Request) -> str | None:
        # A grammar that has not ended when max_tokens runs out ends by length, like any request.
        at_end = len(req.output_token_ids) >= req.params.max_tokens or req.num_known_tokens >= self.max_model_len
        return "length" if at_end else None

    def _finish(self, seq: Sequence, reason: str) -> None:
        req = seq.request
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        if req.status is not RequestStatus.FINISHED:
            self.scheduler.remove(req)
            req.status = RequestStatus.FINISHED

    def _release(self, group: SequenceGroup) -> None:
        del self._groups[group.request_id]
        for seq in group.seqs:
            self._seq_of.pop(id(seq.request), None)
            self.guided.remove(seq.request)

    def _output(self, group: SequenceGroup, final: bool) -> RequestOutput:
        out = self.postprocess.output(group, final)
        if final and group.request_id in self._groups:
            self._release(group)
        return out

    def close(self) -> None:
        """Stops the engine's model processes (tensor parallelism); a no-op for one process."""
        if self._stop_ranks is not None:
            self._stop_ranks()

    # -- monitoring --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Current running/waiting counts, KV use and token totals."""
        return EngineStats(
            running=self.scheduler.num_running, waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv.num_used_blocks, kv_blocks_total=self.num_blocks,
            prompt_tokens_total=self._prompt_tokens, prefill_tokens_total=self._prefill_tokens,
            generated_tokens_total=self._generated_tokens,
            prefix_cache_hit_tokens=self.kv.hits, preemptions=self.scheduler.num_preemptions,
            steps=self._steps, last_batch_size=self._last_batch, peak_batch_size=self._peak_batch)


    def memory_by_rank(self) -> list[dict[str, int]]:
        """Bytes of weights and of KV cache each model process holds: one entry, or one per
        tensor-parallel rank (rank 0 first)."""
        from engine.tp_ranks import kv_cache_bytes, weight_bytes

        own = {"weights": weight_bytes(self.model), "kv_cache": kv_cache_bytes(self.runner.kv_caches)}
        return [own] + (self.tp.memory() if self.tp is not None else [])
