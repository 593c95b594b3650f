"""Turns each row of next-token logits into one token.

Order of operations, per row (that of Hugging Face's `generate`):

1. logprobs (if asked) from `log_softmax` of the raw logits, before anything below;
2. repetition penalty (prompt + output tokens), then frequency and presence penalties
   (output tokens);
3. `min_tokens`: EOS (unless `ignore_eos`) and `stop_token_ids` masked while the output is shorter;
4. greedy rows: argmax. Other rows: temperature, then top-k, then top-p (over what top-k kept),
   then min-p, then one draw.

Every filter keeps the tokens whose scaled logit is at or above a per-row threshold, so the three
combine into one threshold and tokens tied at a cut are all kept (Hugging Face and vLLM do so for
top-k; for top-p they cut inside a tie by sort position, which among equal logits is arbitrary).
The thresholds come from a `topk` candidate list, which holds the kept tokens in the common cases;
a full sort is only the fallback when it does not (a long top-p tail, heavy ties).

The draw is by inverse CDF: one uniform number per row, from the request's own generator when it has
a seed, picks the token where it falls in the cumulative distribution, taken in vocabulary order.
That order and the threshold depend on the row alone, so a seeded request draws the same tokens
whatever else shares the batch (zeros for filtered tokens add nothing to a cumulative sum, so the
candidate and the full-row paths give the same numbers). One number per row, where the exponential
race would draw one per vocabulary entry, is what keeps sampling cheap on a CPU.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from itertools import chain

import torch

from engine.request import Request, TokenLogprob
from engine.sampling_params import SamplingParams

# Dividing by a temperature this small could overflow float32; the result would be greedy anyway.
GREEDY_TEMPERATURE = 1e-5
# How many top tokens the filters look at before falling back to a full sort. Top-p at 0.9-0.95 and
# min-p on a trained model's logits nearly always keep far fewer; `topk` of this many costs about
# two passes over the row, a full sort some fifty.
CANDIDATES = 512


class Sampler:
    """Picks the next token of every running request from one batch of logits.

    `vocab_size` is the number of real tokens: logit columns past it (an embedding padded for the
    hardware) are ignored, never sampled and never part of a logprob. `eos_token_ids` are masked
    while a request's output is shorter than its `min_tokens`. `seed` seeds the generator shared by
    the rows whose request has no seed; None uses torch's default CPU generator.

    The sampler never changes its inputs (neither the logits nor the requests); the caller appends
    the returned token and logprob to its request.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int | None = None):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(sorted({int(t) for t in eos_token_ids}))
        self._shared: torch.Generator | None = None
        if seed is not None:
            self._shared = torch.Generator()
            self._shared.manual_seed(seed)
        # The prompt never changes while a request lives, so its distinct ids are found once, not
        # per step; weak keys drop them when the request goes away.
        self._prompt_ids: weakref.WeakKeyDictionary[Request, torch.Tensor] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[TokenLogprob]:
        """Samples one token per row: row i of `logits` ([N, V], float32) belongs to `requests[i]`.

        Returns, per request, the chosen token id, its logprob and, when `params.logprobs` is N > 0,
        the top N (token id, logprob) pairs, most likely first. Logprobs are `log_softmax` of the
        raw model logits, before penalties, temperature and filters (what vLLM and OpenAI report by
        default). When `params.logprobs` is None no logprob is computed and `logprob` is NaN.
        """
        if not requests:
            return []
        raw, tokens = self.sample_tokens(logits, requests)
        return self.results(raw, tokens, [r.params for r in requests])

    @staticmethod
    def can_defer(params: SamplingParams) -> bool:
        """Whether a request's tokens may be read back a step late: not when penalties need its
        latest token or logprobs are asked for."""
        return (params.logprobs is None and params.repetition_penalty == 1.0
                and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0)

    def sample_tokens(self, logits: torch.Tensor, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen token of each row as a tensor on the logits' device (the greedy path never
        waits for the device), with the raw logits that `__call__` computes logprobs from."""
        raw, x, greedy = self._prepare(logits, requests)
        n = len(requests)
        if all(greedy):
            tokens = x.argmax(dim=-1)
        else:
            random_rows = [i for i, g in enumerate(greedy) if not g]
            if len(random_rows) == n:
                tokens = self._draw(x, requests)
            else:
                tokens = torch.empty(n, dtype=torch.long, device=x.device)
                gi = torch.tensor([i for i, g in enumerate(greedy) if g], device=x.device)
                ri = torch.tensor(random_rows, device=x.device)
                tokens[gi] = x[gi].argmax(dim=-1)
                tokens[ri] = self._draw(x[ri], [requests[i] for i in random_rows])
        return raw, tokens

    def probabilities(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The distribution each row's next token would be drawn from, [N, V] float32.

        Penalties, min_tokens, temperature and filters applied, as `__call__` does before its draw;
        greedy rows are one-hot at their argmax. Consumes no randomness; meant for tests and
        debugging.
        """
        _, x, greedy = self._prepare(logits, requests)
        out = torch.zeros_like(x)
        for i, g in enumerate(greedy):
            if g:
                out[i, x[i].argmax()] = 1.0
                continue
            row = x[i : i + 1]
            filters = _Filters(row, [requests[i].params])
            z = row / filters.temperature.unsqueeze(1)
            z = z.masked_fill(z < filters.threshold.unsqueeze(1), -math.inf)
            out[i] = torch.softmax(z, dim=-1)[0]
        return out

    def _prepare(self, logits: torch.Tensor, requests: Sequence[Request]):
        """(raw logits cut to the vocabulary, logits after penalties and min_tokens, greedy)."""
        n = len(requests)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                f"logits must be [len(requests)={n}, vocab], got {tuple(logits.shape)}"
            )
        raw = logits[:, : min(logits.shape[1], self.vocab_size)]
        if raw.dtype != torch.float32:
            raw = raw.float()
        x = self._apply_penalties(raw, requests)
        x = self._mask_min_tokens(x, raw, requests)
        greedy = [r.params.temperature < GREEDY_TEMPERATURE for r in requests]
        return raw, x, greedy

    # -- penalties and masks -----------------------------------------------------------------------

    def _apply_penalties(self, x: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Repetition penalty, then frequency and presence penalties; returns x or a changed copy.

        Only the logits of tokens that occurred change, so the work is done on those entries alone
        (keys row * V + token into the flattened logits), not on dense [N, V] count tensors.
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
        x = x.clone(memory_format=torch.contiguous_format)  # the caller's logits stay as they were
        flat = x.view(-1)
        reqs = [requests[i] for i in rows]

        def per_row(values: list[float], default: float = 0.0) -> torch.Tensor:
            """A value for every row of x, `default` for rows without penalties."""
            full = torch.full((x.shape[0],), default, dtype=torch.float32)
            full[rows] = torch.tensor(values, dtype=torch.float32)
            return full.to(device)

        def keys(ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
            offsets = torch.tensor(rows, device=device) * vocab
            k = ids + torch.repeat_interleave(offsets, torch.tensor(lengths, device=device))
            return k[ids < vocab]  # ids past the vocabulary (never expected) have no logit

        out_keys = keys(
            torch.tensor(
                list(chain.from_iterable(r.output_token_ids for r in reqs)),
                dtype=torch.long,
                device=device,
            ),
            [len(r.output_token_ids) for r in reqs],
        )

        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            prompts = [self._distinct_prompt_ids(r, device) for r in reqs]
            prompt_keys = keys(torch.cat(prompts), [p.shape[0] for p in prompts])
            # (return_counts picks torch's sort-based CPU path, many times faster here than
            # without.)
            seen, _ = torch.unique(torch.cat([prompt_keys, out_keys]), return_counts=True)
            penalty = per_row([r.params.repetition_penalty for r in reqs], default=1.0)
            values = flat[seen]
            p = penalty[seen // vocab]
            # CTRL / Hugging Face: push a seen token toward "less likely" whatever its sign.
            flat[seen] = torch.where(values > 0, values / p, values * p)

        if any(r.params.frequency_penalty or r.params.presence_penalty for r in reqs):
            occurred, counts = torch.unique(out_keys, return_counts=True)
            row = occurred // vocab
            # OpenAI: subtract freq * count and, once a token has appeared at all, pres.
            flat[occurred] -= (
                per_row([r.params.frequency_penalty for r in reqs])[row] * counts
                + per_row([r.params.presence_penalty for r in reqs])[row]
            )
        return x

    def _distinct_prompt_ids(self, request: Request, device: torch.device) -> torch.Tensor:
        cached = self._prompt_ids.get(request)
        if cached is None or cached.device != device:
            cached = torch.unique(
                torch.tensor(request.prompt_token_ids, dtype=torch.long, device=device)
            )
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
            x = x.clone()
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = -math.inf
        return x

    # -- random draw -------------------------------------------------------------------------------

    def _draw(self, x: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """One token per row of x from softmax(x / T) restricted to what the filters keep."""
        device = x.device
        m = x.shape[0]
        u = self._uniforms(requests).to(device)
        filters = _Filters(x, [r.params for r in requests])
        tokens = torch.empty(m, dtype=torch.long, device=device)

        fits = [i for i in range(m) if filters.fits[i]]
        if fits:
            # Every kept token is a candidate: draw among candidates, put back in vocabulary order.
            idx = torch.tensor(fits, device=device)
            cand_ids = filters.cand_ids[idx]
            cand_z = filters.cand_z[idx]
            kept = (cand_z >= filters.threshold[idx].unsqueeze(1)) & filters.valid[idx]
            order = cand_ids.masked_fill(~kept, x.shape[1]).argsort(dim=-1)
            weights = torch.exp(cand_z.gather(1, order) - filters.z_max[idx].unsqueeze(1))
            weights = weights * kept.gather(1, order)
            pick = _inverse_cdf(weights, u[idx])
            tokens[idx] = cand_ids.gather(1, order).gather(1, pick.unsqueeze(1)).squeeze(1)

        rest = [i for i in range(m) if not filters.fits[i]]
        if rest:
            idx = torch.tensor(rest, device=device) if len(rest) < m else None
            # z is the draw's own (an indexed copy, or the cached z / T it is the last user of), so
            # it is changed in place: each of these is a pass over [r, V].
            z = filters.scaled(idx)
            z_max = filters.z_max if idx is None else filters.z_max[idx]
            threshold = filters.threshold if idx is None else filters.threshold[idx]
            if bool(torch.isfinite(threshold).any()):
                z.masked_fill_(z < threshold.unsqueeze(1), -math.inf)
            weights = z.sub_(z_max.unsqueeze(1)).exp_()
            picked = _inverse_cdf(weights, u if idx is None else u[idx])
            if idx is None:
                tokens = picked
            else:
                tokens[idx] = picked
        return tokens

    def _uniforms(self, requests: Sequence[Request]) -> torch.Tensor:
        """One U[0, 1) number per row, float64 on the CPU: seeded rows from their own generator."""
        u = torch.empty(len(requests), dtype=torch.float64)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self._shared)
        if len(unseeded) < len(requests):
            for i, r in enumerate(requests):
                if r.generator is not None:
                    u[i] = torch.rand(
                        1, dtype=torch.float64, generator=r.generator, device=r.generator.device
                    ).item()
        return u

    # -- results -----------------------------------------------------------------------------------

    @staticmethod
    def results(
        raw: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TokenLogprob]:
        """Per row: the chosen token and, where `params.logprobs` asks, its logprob and the top N
        (reads the tokens back from the device)."""
        token_ids = tokens.tolist()
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out = [TokenLogprob(token_id=t, logprob=math.nan) for t in token_ids]
        if not lp_rows:
            return out
        if len(lp_rows) == len(params):
            logprobs, chosen_tokens = torch.log_softmax(raw, dim=-1), tokens
        else:
            idx = torch.tensor(lp_rows, device=raw.device)
            logprobs, chosen_tokens = torch.log_softmax(raw[idx], dim=-1), tokens[idx]
        chosen = logprobs.gather(1, chosen_tokens.unsqueeze(1)).squeeze(1).tolist()
        most = max(params[i].logprobs for i in lp_rows)
        if most > 0:
            top_values, top_ids = logprobs.topk(min(most, logprobs.shape[1]), dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(lp_rows):
            out[i].logprob = chosen[j]
            k = params[i].logprobs
            if k:
                out[i].top = list(zip(top_ids[j][:k], top_values[j][:k]))
        return out


class _Filters:
    """Per-row temperature and the threshold on scaled logits z = x / T that top-k, top-p and min-p
    set.

    `cand_ids` / `cand_z` are each row's top candidates (descending), `valid` marks the columns that
    belong to the row (rows look at different numbers of candidates), and `fits[i]` says whether
    every token row i keeps is among its candidates. Everything here depends on the row alone: how
    many candidates a row uses is fixed by its own parameters, and a threshold comes out the same
    however many top tokens were looked at to find it.
    """

    def __init__(self, x: torch.Tensor, params: Sequence[SamplingParams]):
        device = x.device
        m, vocab = x.shape
        self._x = x
        self._z: torch.Tensor | None = None
        self.temperature = torch.tensor(
            [p.temperature for p in params], dtype=torch.float32, device=device
        )
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        filtered = [bool(k) or p.top_p < 1.0 or p.min_p > 0.0 for k, p in zip(top_k, params)]
        # A top-k row needs only its k tokens plus one more, to see whether ties run past them.
        width = [
            min(vocab, k + 1 if k else CANDIDATES) if f else 1 for k, f in zip(top_k, filtered)
        ]
        columns = max(width)
        raw_values, self.cand_ids = x.topk(columns, dim=-1)
        self.cand_z = raw_values / self.temperature.unsqueeze(1)
        self.z_max = self.cand_z[:, 0]
        width_t = torch.tensor(width, device=device)
        self.valid = torch.arange(columns, device=device).unsqueeze(0) < width_t.unsqueeze(1)
        last = self.cand_z.gather(1, (width_t - 1).unsqueeze(1)).squeeze(
            1
        )  # the row's last candidate
        whole_row = width_t == vocab

        k_t = torch.tensor(top_k, device=device)
        threshold_k = torch.where(
            k_t > 0,
            self.cand_z.gather(1, (k_t - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
            torch.full((m,), -math.inf, device=device),
        )
        threshold = threshold_k.clone()

        p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            threshold[p_rows] = self._top_p(x, params, p_rows, top_k, threshold_k, whole_row)

        min_p = [p.min_p for p in params]
        if any(mp > 0 for mp in min_p):
            # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): no softmax needed.
            log_min_p = torch.tensor(
                [math.log(mp) if mp > 0 else -math.inf for mp in min_p],
                dtype=torch.float32,
                device=device,
            )
            threshold = torch.maximum(threshold, self.z_max + log_min_p)
        self.threshold = threshold
        # Tokens outside the candidates are <= the last one, so they are all dropped iff it is.
        self.fits = (
            torch.tensor(filtered, device=device) & (whole_row | (last < threshold))
        ).tolist()

    def scaled(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """z = x / T of all rows, or a copy of some rows; one full pass, done at most once."""
        if self._z is None:
            self._z = self._x / self.temperature.unsqueeze(1)
        return self._z if rows is None else self._z[rows]

    def _top_p(self, x, params, rows, top_k, threshold_k, whole_row) -> torch.Tensor:
        """Top-p thresholds of `rows`: the smallest top slice (of what top-k kept) reaching top_p.

        Tried on the candidates first; rows whose slice runs past them are retried on 8 times as
        many top tokens, then on the fully sorted row. The answer does not depend on which try finds
        it: the slice is a prefix of the same descending order either way.
        """
        device, vocab = x.device, x.shape[1]
        idx = torch.tensor(rows, device=device)
        top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float64, device=device)
        has_k = torch.tensor([bool(top_k[i]) for i in rows], device=device)
        t_k = threshold_k[idx]
        z_max = self.z_max[idx]
        # Without top-k, top-p is a fraction of the whole row's mass: one full pass.
        mass = torch.full((len(rows),), math.nan, device=device)
        no_k = [j for j, i in enumerate(rows) if not top_k[i]]
        if no_k:
            z = self.scaled(None if len(no_k) == x.shape[0] else idx[no_k])
            mass[no_k] = torch.exp(z - z_max[no_k].unsqueeze(1)).sum(dim=-1)
        thresholds, resolved = _top_p_slice(
            self.cand_z[idx], self.valid[idx], whole_row[idx], z_max, t_k, has_k, mass, top_p
        )
        width = self.cand_z.shape[1]
        while not bool(resolved.all()):
            j = (~resolved).nonzero().flatten()
            # A topk over more than a quarter of the row costs about what sorting it does.
            width = width * 8 if width * 8 <= vocab // 4 else vocab
            z = self.scaled(idx[j])
            wider = (
                z.topk(width, dim=-1).values
                if width < vocab
                else z.sort(dim=-1, descending=True).values
            )
            thresholds[j], resolved[j] = _top_p_slice(
                wider,
                torch.ones_like(wider, dtype=torch.bool),
                torch.full((len(j),), width == vocab, device=device),
                z_max[j],
                t_k[j],
                has_k[j],
                mass[j],
                top_p[j],
            )
        return thresholds


def _top_p_slice(z, valid, whole_row, z_max, t_k, has_k, mass, top_p):
    """Top-p over descending candidates z [r, w]: (thresholds, whether the candidates sufficed)."""
    in_k = (z >= t_k.unsqueeze(1)) & valid
    weights = torch.exp(z - z_max.unsqueeze(1)) * in_k
    total = torch.where(has_k, weights.sum(dim=-1), mass)
    # float64 running sum: float32 drifts by ~1e-4 over a large vocabulary, enough to move the cut.
    before = weights.cumsum(dim=-1, dtype=torch.float64) - weights.double()
    fraction = before / total.double().unsqueeze(1)
    # Keep every token whose predecessors' mass is still below top_p (the first always).
    keep = ((fraction < top_p.unsqueeze(1)) & in_k).sum(dim=-1).clamp(min=1)
    thresholds = z.gather(1, (keep - 1).unsqueeze(1)).squeeze(1)
    last = z.gather(1, (valid.sum(dim=-1) - 1).unsqueeze(1)).squeeze(1)
    # Enough if the candidates hold all that top-k kept (so all that top-p looks at), or, without
    # top-k, if the slice ends before the candidates run out.
    k_inside = whole_row | (last < t_k)
    return thresholds, k_inside | (~has_k & (keep < in_k.sum(dim=-1)))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, where u (in [0, 1)) falls in the cumulative sum of non-negative weights."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    target = (u.unsqueeze(1) * total.double()).to(cdf.dtype)
    index = torch.searchsorted(cdf, target, right=True)
    # Rounding can lift the target to the total itself; the last token with weight is then the one.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last).squeeze(1)
