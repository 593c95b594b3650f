"""Turns each row of next-token logits into one token.

Order of operations, per row (that of Hugging Face's `generate`):

1. logprobs (if asked) from `log_softmax` of the raw logits, before anything below;
2. repetition penalty (prompt + output tokens), then frequency and presence penalties
   (output tokens);
3. `min_tokens`: EOS (unless `ignore_eos`) and `stop_token_ids` masked while the output is shorter;
4. greedy rows: argmax. Other rows: temperature, then top-k, then top-p (over what top-k kept),
   then min-p, then one draw (`kernels.sampling.sample`, which defines the filters and the draw).

Every filter keeps the tokens whose scaled logit is at or above a per-row threshold, so the three
combine into one threshold and tokens tied at a cut are all kept (Hugging Face and vLLM do so for
top-k; for top-p they cut inside a tie by sort position, which among equal logits is arbitrary).

The draw takes one uniform number per row from Philox keyed by the request's seed, with the number
of tokens the request has drawn so far as the counter: a seeded request draws the same tokens
whatever else shares the batch and whenever its steps run; an unseeded one gets a seed of its own
from the sampler's generator when it is first sampled.

Nothing here waits for a GPU: per-row values travel through pinned memory, penalties use dense
per-row counts built on the device (including the token still pending on the device from the step
in flight), and logprobs can be left on the device for a later read (`logprob_tensors`).
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from engine.request import Request, TokenLogprob
from engine.sampling_params import SamplingParams
from kernels import sample
from kernels.sampling import GREEDY_TEMPERATURE, SEED_BITS, filtered_probs_ref

# A seeded request's n completions share its seed; the completion's index goes into the high bits
# of the Philox counter, above any count of drawn tokens.
SEQ_INDEX_SHIFT = 40


@dataclass
class LogprobTensors:
    """Logprobs of the rows that asked for them, still on the device: row `rows[j]` of the batch
    has `chosen[j]` and, for its first `counts[j]` columns, `top_values[j]` / `top_ids[j]`."""

    rows: list[int]
    counts: list[int]
    chosen: torch.Tensor
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None

    def to_host(self, non_blocking: bool) -> LogprobTensors:
        """A copy on the host (pinned and still in flight when `non_blocking` on a GPU)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=non_blocking)

        return LogprobTensors(self.rows, self.counts, move(self.chosen), move(self.top_values),
                              move(self.top_ids))


def assemble(token_ids: list[int], logprobs: LogprobTensors | None) -> list[TokenLogprob]:
    """Per row: the token and, for rows in `logprobs` (host tensors), its logprob and top N."""
    out = [TokenLogprob(token_id=t, logprob=math.nan) for t in token_ids]
    if logprobs is None:
        return out
    chosen = logprobs.chosen.tolist()
    values = logprobs.top_values.tolist() if logprobs.top_values is not None else None
    ids = logprobs.top_ids.tolist() if logprobs.top_ids is not None else None
    for j, (i, k) in enumerate(zip(logprobs.rows, logprobs.counts)):
        out[i].logprob = chosen[j]
        if k:
            out[i].top = list(zip(ids[j][:k], values[j][:k]))
    return out


def _own_float32(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of x that the sampler may change in place."""
    return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`; to a GPU through pinned memory, asynchronously (a copy
    from pageable memory would wait for everything queued on the stream)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


class Sampler:
    """Picks the next token of every running request from one batch of logits.

    `vocab_size` is the number of real tokens: logit columns past it (an embedding padded for the
    hardware) are ignored, never sampled and never part of a logprob. `eos_token_ids` are masked
    while a request's output is shorter than its `min_tokens`. `seed` seeds the generator that gives
    each unseeded request its own draw seed; None takes one from the operating system.

    The sampler never changes its inputs (neither the logits nor the requests' tokens); the caller
    appends the returned token and logprob to its request.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int | None = None):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(sorted({int(t) for t in eos_token_ids}))
        self._rng = random.Random(seed)
        # The prompt never changes while a request lives, so its distinct ids are found once, not
        # per step; weak keys drop them when the request goes away.
        self._prompt_ids: weakref.WeakKeyDictionary[Request, torch.Tensor] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[TokenLogprob]:
        """Samples one token per row: row i of `logits` ([N, V]) belongs to `requests[i]`.

        Returns, per request, the chosen token id, its logprob and, when `params.logprobs` is N > 0,
        the top N (token id, logprob) pairs, most likely first. Logprobs are `log_softmax` of the
        raw model logits, before penalties, temperature and filters (what vLLM and OpenAI report by
        default). When `params.logprobs` is None no logprob is computed and `logprob` is NaN.
        """
        if not requests:
            return []
        raw, tokens = self.sample_tokens(logits, requests)
        return self.results(raw, tokens, [r.params for r in requests])

    def sample_tokens(self, logits: torch.Tensor, requests: Sequence[Request],
                      pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen token of each row as a tensor on the logits' device (nothing waits for the
        device), with the raw logits that logprobs come from.

        `pending` is the token tensor of the step in flight: a request with `num_pending` has its
        latest token at `pending[request.pending_index]`, which the penalties count."""
        raw, x, greedy = self._prepare(logits, requests, pending)
        if all(greedy):
            return raw, x.argmax(dim=-1)
        dev = x.device
        rows = [self._row(r) for r in requests]
        # Two copies per step: the float columns and the integer columns. Each column is padded to
        # a multiple of 4 entries, so every one starts 16-byte aligned whatever the batch size
        # (Triton compiles a kernel variant per argument alignment: a column starting misaligned
        # at some batch sizes would compile a second and third variant in the middle of a run).
        n = len(requests)
        pad = (0,) * (-n % 4)
        t, p, mp, k, seed, base = zip(*rows)
        floats = to_device([t + pad, p + pad, mp + pad], torch.float32, dev)
        offsets = tuple(o + len(r.output_token_ids) + r.num_pending for o, r in zip(base, requests))
        ints = to_device([k + pad, seed + pad, offsets + pad], torch.int64, dev)
        tokens = sample(x, floats[0, :n], ints[0, :n], floats[1, :n], floats[2, :n], ints[1, :n], ints[2, :n])
        return raw, tokens

    def _row(self, r: Request) -> tuple[float, float, float, int, int, int]:
        """(temperature, top_p, min_p, top_k, draw seed, counter base) of a request, made once."""
        row = r.sampling_row
        if row is None:
            p = r.params
            if p.seed is not None:
                seed, base = p.seed % (1 << SEED_BITS), r.seq_index << SEQ_INDEX_SHIFT
            else:
                seed, base = self._rng.getrandbits(SEED_BITS), 0
            top_k = p.top_k if 0 < p.top_k < self.vocab_size else 0
            row = (float(p.temperature), float(p.top_p), float(p.min_p), top_k, seed, base)
            r.sampling_row = row
        return row

    def probabilities(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The distribution each row's next token would be drawn from, [N, V] float32.

        Penalties, min_tokens, temperature and filters applied, as `__call__` does before its draw;
        greedy rows are one-hot at their argmax. Consumes no randomness; meant for tests and
        debugging.
        """
        _, x, _ = self._prepare(logits, requests, None)
        x = x.float()
        out = torch.zeros_like(x)
        for i, r in enumerate(requests):
            p = r.params
            top_k = p.top_k if 0 < p.top_k < x.shape[1] else 0
            out[i] = filtered_probs_ref(x[i], p.temperature, top_k, p.top_p, p.min_p)
        return out

    def _prepare(self, logits: torch.Tensor, requests: Sequence[Request], pending: torch.Tensor | None):
        """(raw logits cut to the vocabulary, logits after penalties and min_tokens, greedy).

        Logits in a 16-bit dtype (a decode graph's) stay so until something changes them: the
        argmax and the sampling kernel read them as they are, and convert exactly."""
        n = len(requests)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                f"logits must be [len(requests)={n}, vocab], got {tuple(logits.shape)}"
            )
        raw = logits[:, : min(logits.shape[1], self.vocab_size)]
        if raw.device.type != "cuda" and raw.dtype != torch.float32:
            raw = raw.float()  # the reference computes in float32
        x = self._apply_penalties(raw, requests, pending)
        x = self._mask_min_tokens(x, raw, requests)
        greedy = [r.params.temperature < GREEDY_TEMPERATURE for r in requests]
        return raw, x, greedy

    # -- penalties and masks -----------------------------------------------------------------------

    def _apply_penalties(self, x: torch.Tensor, requests: Sequence[Request],
                         pending: torch.Tensor | None = None) -> torch.Tensor:
        """Repetition penalty, then frequency and presence penalties; returns x or a changed copy.

        The rows with penalties get dense per-token output counts [r, V] built on the device (a
        scatter of their output tokens, the one pending on the device included), so nothing here
        depends on how many tokens occurred or waits for the device.
        """
        rows = [
            i
            for i, r in enumerate(requests)
            if r.params.repetition_penalty != 1.0
            or r.params.frequency_penalty != 0.0
            or r.params.presence_penalty != 0.0
        ]
        if not rows:
            return x
        device, vocab = x.device, x.shape[1]
        reqs = [requests[i] for i in rows]
        r = len(rows)
        counts = torch.zeros((r, vocab), dtype=torch.float32, device=device)
        outs = [[t for t in q.output_token_ids if t < vocab] for q in reqs]
        if any(outs):
            ids = to_device(list(chain.from_iterable(outs)), torch.long, device)
            which = to_device([j for j, o in enumerate(outs) for _ in o], torch.long, device)
            counts.view(-1).index_put_((which * vocab + ids,), torch.ones_like(ids, dtype=torch.float32),
                                       accumulate=True)
        waiting = [j for j, q in enumerate(reqs) if q.num_pending]
        if waiting:
            if pending is None:
                raise ValueError("a request has a pending token but no pending tensor was given")
            src = to_device([reqs[j].pending_index for j in waiting], torch.long, device)
            dst = to_device(waiting, torch.long, device)
            tok = pending.index_select(0, src).clamp(max=vocab - 1)  # ids are < vocab already
            counts.view(-1).index_put_((dst * vocab + tok,), torch.ones_like(tok, dtype=torch.float32),
                                       accumulate=True)
        params = to_device([(q.params.repetition_penalty, q.params.frequency_penalty,
                             q.params.presence_penalty) for q in reqs], torch.float32, device)
        rep, freq, pres = (params[:, c:c + 1] for c in range(3))
        idx = to_device(rows, torch.long, device)
        y = x.index_select(0, idx).float()
        occurred = counts > 0
        if any(q.params.repetition_penalty != 1.0 for q in reqs):
            seen = occurred.clone()
            for j, q in enumerate(reqs):
                if q.params.repetition_penalty != 1.0:
                    seen[j].index_fill_(0, self._distinct_prompt_ids(q, device, vocab), True)
            # CTRL / Hugging Face: push a seen token toward "less likely" whatever its sign.
            y = torch.where(seen, torch.where(y > 0, y / rep, y * rep), y)
        # OpenAI: subtract freq * count and, once a token has appeared at all, pres.
        y = y - freq * counts - pres * occurred
        x = _own_float32(x)  # the caller's logits stay as they were
        x.index_copy_(0, idx, y.to(x.dtype))
        return x

    def _distinct_prompt_ids(self, request: Request, device: torch.device, vocab: int) -> torch.Tensor:
        cached = self._prompt_ids.get(request)
        if cached is None or cached.device != device:
            ids = sorted({t for t in request.prompt_token_ids if t < vocab})
            cached = to_device(ids, torch.long, device)
            self._prompt_ids[request] = cached
        return cached

    def _mask_min_tokens(
        self, x: torch.Tensor, raw: torch.Tensor, requests: Sequence[Request]
    ) -> torch.Tensor:
        """Masks the tokens that would end a request before it has `min_tokens` output tokens."""
        vocab = x.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(requests):
            p = r.params
            if len(r.output_token_ids) + r.num_pending >= p.min_tokens:
                continue
            # With ignore_eos, EOS ends nothing, so there is no reason to forbid it.
            enders = (
                set(p.stop_token_ids)
                if p.ignore_eos
                else set(p.stop_token_ids).union(self.eos_token_ids)
            )
            for t in enders:
                if t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return x
        if x is raw:
            x = _own_float32(x)
        keys = to_device([i * vocab + t for i, t in zip(rows, cols)], torch.long, x.device)
        x.view(-1).index_fill_(0, keys, -math.inf)
        return x

    # -- results -----------------------------------------------------------------------------------

    @staticmethod
    def logprob_tensors(raw: torch.Tensor, tokens: torch.Tensor,
                        params: Sequence[SamplingParams]) -> LogprobTensors | None:
        """The logprobs the rows ask for, left on the device (None if no row asks)."""
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not lp_rows:
            return None
        if len(lp_rows) == len(params):
            logprobs = torch.log_softmax(raw, dim=-1, dtype=torch.float32)
            chosen_tokens = tokens
        else:
            idx = to_device(lp_rows, torch.long, raw.device)
            logprobs = torch.log_softmax(raw[idx], dim=-1, dtype=torch.float32)
            chosen_tokens = tokens[idx]
        chosen = logprobs.gather(1, chosen_tokens.unsqueeze(1)).squeeze(1)
        counts = [params[i].logprobs for i in lp_rows]
        top_values = top_ids = None
        if max(counts) > 0:
            top_values, top_ids = logprobs.topk(min(max(counts), logprobs.shape[1]), dim=-1)
        return LogprobTensors(lp_rows, counts, chosen, top_values, top_ids)

    @classmethod
    def results(
        cls, raw: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TokenLogprob]:
        """Per row: the chosen token and, where `params.logprobs` asks, its logprob and the top N
        (reads the tokens back from the device)."""
        lp = cls.logprob_tensors(raw, tokens, params)
        return assemble(tokens.tolist(), None if lp is None else lp.to_host(non_blocking=False))
