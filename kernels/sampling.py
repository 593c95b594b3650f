"""Drawing one token per row of logits: temperature, top-k, top-p, min-p, then a draw.

The distribution, per row:

1. A row whose temperature is below `GREEDY_TEMPERATURE` takes its argmax (the first, on ties).
2. Otherwise z = logits * (1 / temperature), and each filter sets a cut on z; a token is kept when
   its z is at or above all of them, so tokens tied at a cut are all kept:
   - top-k (0 < k < vocab): the k-th largest z;
   - top-p (< 1): the largest value v with mass(z >= v, among what top-k kept) >= top_p times the
     mass top-k kept, where mass is the sum of exp(z - max z);
   - min-p (> 0): max z + log(min_p), i.e. probability >= min_p times the top probability.
   The token is drawn with probability proportional to exp(z - max z) among the kept tokens
   (`filtered_probs_ref` gives this distribution).

The draw, the same in both implementations: round r takes a uniform u_r and picks, in a fixed
token order (`draw_order`), the token where u_r times the domain's mass falls in the running sum;
the first domain is what top-k and min-p keep. Top-p is then applied by rejection: the token is
kept when the mass of the tokens above it is under top_p times the mass top-k kept (exactly when
it is at or above the top-p cut); otherwise the next round draws from the tokens above it, which
still hold every kept token. A kept draw is a draw from the kept set, so no sort and no search for
the top-p cut are needed; after MAX_ROUNDS rejections (a rare, very flat row with a small top_p)
the cut is found directly and drawn under.

u_r comes from Philox-4x32-10 keyed by the row's 64-bit seed, with counter (offset, r): the caller
gives each request its own seed and counts its draws in the offset, so a request draws the same
tokens whatever else shares the batch, and no generator state lives anywhere.

The PyTorch reference (`sample_ref`) is what the CPU runs; the Triton kernel
(kernels/triton/sampling.py) computes the same thing on a GPU without waiting for the host. They
differ only in float rounding (the order of the mass sums), which can move a draw that lands
within rounding of a boundary.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.dispatch import use_triton

# Below this temperature a row is greedy: dividing by it could overflow float32, and the result
# would be the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
# How many top tokens `Filters` looks at before falling back to a full sort. Top-p at 0.9-0.95 and
# min-p on a trained model's logits nearly always keep far fewer; `topk` of this many costs about
# two passes over the row, a full sort some fifty.
CANDIDATES = 512
# The draw's token order: lane j holds tokens j, j + DRAW_LANES, j + 2 DRAW_LANES, ..., lanes in
# order (the kernel's running sums go lane by lane, which keeps its passes free of synchronisation).
DRAW_LANES = 1024
# Rejection rounds before the top-p cut is looked for directly.
MAX_ROUNDS = 12

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_BITS = 63  # seeds are taken modulo 2**63, so they fit a signed 64-bit tensor


def philox4x32_ref(counter: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                   key: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Philox-4x32-10 of 32-bit words held in uint64 arrays: the four output words."""
    m32 = np.uint64(_MASK32)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for _ in range(PHILOX_ROUNDS):
        p0 = np.uint64(PHILOX_M0) * c0  # < 2**64: exact in uint64
        p1 = np.uint64(PHILOX_M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m32)
        k0 = (k0 + np.uint64(PHILOX_W0)) & m32
        k1 = (k1 + np.uint64(PHILOX_W1)) & m32
    return c0, c1, c2, c3


def philox_uniform_ref(seeds: torch.Tensor, offsets: torch.Tensor, rounds: torch.Tensor | int = 0) -> torch.Tensor:
    """u in [0, 1) per row, float32: the top 24 bits of the first word of Philox-4x32-10 with key
    (seed low 32 bits, seed high 32 bits) and counter (offset low, offset high, round, 0)."""
    s = seeds.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    o = offsets.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    m32, zero = np.uint64(_MASK32), np.zeros(s.shape, dtype=np.uint64)
    r = (rounds.detach().cpu().numpy() if isinstance(rounds, torch.Tensor) else np.full(s.shape, rounds))
    r = r.astype(np.uint64) & m32
    word = philox4x32_ref((o & m32, o >> np.uint64(32), r, zero), (s & m32, s >> np.uint64(32)))[0]
    u = (word >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy(u).to(seeds.device)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One token id per row of `logits` ([N, V], float32 or a 16-bit dtype, read as float32), int64
    [N] on the logits' device.

    Per-row parameters are 1-D tensors of N on the same device: `temperature` and `top_p`,
    `min_p` float32; `top_k` int32 or int64 (0: off); `seeds`, `offsets` int64 (see the module
    docstring). On CUDA nothing here waits for the device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    if use_triton(logits):
        from kernels.triton.sampling import sample_triton

        return sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seeds, offsets)


# -- the reference ---------------------------------------------------------------------------------


def draw_order(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids in the order the draw's running sum takes them (see DRAW_LANES)."""
    blocks = -(-vocab // DRAW_LANES)
    order = (torch.arange(DRAW_LANES, device=device).unsqueeze(1)
             + torch.arange(blocks, device=device).unsqueeze(0) * DRAW_LANES).flatten()
    return order[order < vocab]


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
               rounds: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of `sample` (any device; reads per-row flags on the host). `rounds`, if given
    (int32 [N]), receives how many uniforms each row used (0 for greedy rows)."""
    n, vocab = logits.shape
    x = logits.float()
    device = x.device
    temps = temperature.float()
    tokens = torch.zeros(n, dtype=torch.long, device=device)
    used = torch.zeros(n, dtype=torch.int32, device=device)
    greedy = temps < GREEDY_TEMPERATURE
    if bool(greedy.any()):
        tokens[greedy] = x[greedy].argmax(dim=-1)
    rand = (~greedy).nonzero().flatten()
    if rand.numel():
        tokens[rand], used[rand] = _sample_rows(
            x[rand], temps[rand], top_k[rand].long(), top_p[rand].float(), min_p[rand].float(),
            seeds[rand], offsets[rand])
    if rounds is not None:
        rounds.copy_(used)
    return tokens


def _sample_rows(x, temps, top_k, top_p, min_p, seeds, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws for rows that are not greedy: (tokens, uniforms used per row)."""
    r, vocab = x.shape
    device = x.device
    inf = torch.full((r,), math.inf, device=device)
    z = x * (1.0 / temps).unsqueeze(1)
    m = z.max(dim=-1).values
    w = torch.exp(z - m.unsqueeze(1))
    finite = torch.isfinite(z).sum(dim=-1)
    has_k = (top_k > 0) & (top_k < finite)
    k_cut = -inf
    if bool(has_k.any()):
        ranked = z.topk(int(top_k[has_k].max()), dim=-1).values
        k_cut = torch.where(has_k, ranked.gather(1, (top_k - 1).clamp(0, ranked.shape[1] - 1).unsqueeze(1)).squeeze(1),
                            -inf)
    floor = torch.maximum(k_cut, torch.where(min_p > 0, m + torch.log(min_p), -inf))
    kept_k = (w * (z >= k_cut.unsqueeze(1))).sum(dim=-1)
    goal = top_p * kept_k
    order = draw_order(vocab, device)
    lower, strict = floor.clone(), torch.zeros(r, dtype=torch.bool, device=device)
    tokens = torch.zeros(r, dtype=torch.long, device=device)
    used = torch.zeros(r, dtype=torch.int32, device=device)
    active = torch.ones(r, dtype=torch.bool, device=device)
    for rnd in range(MAX_ROUNDS):
        tok, z_tok = _draw_in(z, w, lower, strict, order, philox_uniform_ref(seeds, offsets, rnd).to(device))
        above = (w * (z > z_tok.unsqueeze(1))).sum(dim=-1)
        keep = active & ((top_p >= 1.0) | (above < goal))
        tokens[keep], used[keep] = tok[keep], rnd + 1
        active &= ~keep
        if not bool(active.any()):
            return tokens, used
        lower = torch.where(active, z_tok, lower)
        strict |= active
    # Out of rounds: the top-p cut itself, then one draw under it.
    desc, at = z.sort(dim=-1, descending=True)
    reach = w.gather(1, at).cumsum(dim=-1)
    j = torch.searchsorted(reach, goal.unsqueeze(1)).clamp(max=vocab - 1)
    cut = torch.maximum(desc.gather(1, j).squeeze(1), floor)
    tok, _ = _draw_in(z, w, cut, torch.zeros_like(strict), order,
                      philox_uniform_ref(seeds, offsets, MAX_ROUNDS).to(device))
    tokens[active], used[active] = tok[active], MAX_ROUNDS + 1
    return tokens, used


def _draw_in(z, w, lower, strict, order, u) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the token where u times the mass of {z > lower (strict) or >= lower} falls in the
    running sum taken in `order`; and its z."""
    lo = lower.unsqueeze(1)
    inside = torch.where(strict.unsqueeze(1), z > lo, z >= lo)
    pos = _inverse_cdf((w * inside)[:, order], u)
    tok = order[pos]
    return tok, z.gather(1, tok.unsqueeze(1)).squeeze(1)


def filtered_probs_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       min_p: float) -> torch.Tensor:
    """The distribution one row [V] is drawn from (float32), for tests and debugging; a greedy
    temperature gives the one-hot of the argmax."""
    if temperature < GREEDY_TEMPERATURE:
        out = torch.zeros_like(logits)
        out[logits.argmax()] = 1.0
        return out
    row = logits.float().unsqueeze(0)
    filters = Filters(row, [temperature], [top_k], [top_p], [min_p])
    z = filters.scaled()
    z = z.masked_fill(z < filters.threshold.unsqueeze(1), -math.inf)
    return torch.softmax(z, dim=-1)[0]


class Filters:
    """Per-row temperature and the cut on scaled logits z = x * (1 / T) that top-k, top-p and min-p
    set, found from sorted candidates: the distribution's definition, for `filtered_probs_ref`.

    `cand_ids` / `cand_z` are each row's top candidates (descending), `valid` marks the columns that
    belong to the row (rows look at different numbers of candidates), and `fits[i]` says whether
    every token row i keeps is among its candidates. Everything here depends on the row alone: how
    many candidates a row uses is fixed by its own parameters, and a threshold comes out the same
    however many top tokens were looked at to find it.
    """

    def __init__(self, x: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                 min_p: list[float]):
        device = x.device
        m, vocab = x.shape
        self._x = x
        self._z: torch.Tensor | None = None
        self.temperature = torch.tensor(temperature, dtype=torch.float32, device=device)
        top_k = [int(k) if 0 < k < vocab else 0 for k in top_k]
        filtered = [bool(k) or p < 1.0 or mp > 0.0 for k, p, mp in zip(top_k, top_p, min_p)]
        # A top-k row needs only its k tokens plus one more, to see whether ties run past them.
        width = [
            min(vocab, k + 1 if k else CANDIDATES) if f else 1 for k, f in zip(top_k, filtered)
        ]
        columns = max(width)
        raw_values, self.cand_ids = x.topk(columns, dim=-1)
        self.cand_z = raw_values * (1.0 / self.temperature).unsqueeze(1)
        self.z_max = self.cand_z[:, 0]
        width_t = torch.tensor(width, device=device)
        self.valid = torch.arange(columns, device=device).unsqueeze(0) < width_t.unsqueeze(1)
        last = self.cand_z.gather(1, (width_t - 1).unsqueeze(1)).squeeze(1)  # the row's last candidate
        whole_row = width_t == vocab

        k_t = torch.tensor(top_k, device=device)
        threshold_k = torch.where(
            k_t > 0,
            self.cand_z.gather(1, (k_t - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
            torch.full((m,), -math.inf, device=device),
        )
        threshold = threshold_k.clone()

        p_rows = [i for i, p in enumerate(top_p) if p < 1.0]
        if p_rows:
            threshold[p_rows] = self._top_p(x, top_p, p_rows, top_k, threshold_k, whole_row)

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
        """z = x * (1 / T) of all rows, or a copy of some rows; one full pass, done at most once."""
        if self._z is None:
            self._z = self._x * (1.0 / self.temperature).unsqueeze(1)
        return self._z if rows is None else self._z[rows]

    def _top_p(self, x, top_p, rows, top_k, threshold_k, whole_row) -> torch.Tensor:
        """Top-p thresholds of `rows`: the smallest top slice (of what top-k kept) reaching top_p.

        Tried on the candidates first; rows whose slice runs past them are retried on 8 times as
        many top tokens, then on the fully sorted row. The answer does not depend on which try finds
        it: the slice is a prefix of the same descending order either way.
        """
        device, vocab = x.device, x.shape[1]
        idx = torch.tensor(rows, device=device)
        top_p_t = torch.tensor([top_p[i] for i in rows], dtype=torch.float64, device=device)
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
            self.cand_z[idx], self.valid[idx], whole_row[idx], z_max, t_k, has_k, mass, top_p_t
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
                top_p_t[j],
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
    target = (u.unsqueeze(1) * total).to(cdf.dtype)
    index = torch.searchsorted(cdf, target, right=True)
    # Rounding can lift the target to the total itself; the last token with weight is then the one.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last).squeeze(1)
