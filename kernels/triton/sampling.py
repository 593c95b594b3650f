"""Sampling on the device: one program per row, no sort, no host in the loop.

The function is `kernels.sampling.sample` (see its docstring for the definition). A program reads
its row a few times:

1. max, finite min, finite count and the softmax mass of z = x / T (one pass, online);
2. top-k and top-p each look for "the largest value v whose weight at or above v reaches a target"
   (weight 1 per token for top-k, exp(z - max) for top-p). A pass counts the weight at or above
   PIVOTS evenly spaced values in the current bracket [lo, hi) and the smallest and largest z
   inside it; the bracket shrinks to the pivot interval that holds the answer, until the values
   in it are all one value. Random bf16 logits take 3-5 passes, float32 ones a few more;
3. the draw: running sums over the kept tokens in vocabulary order until u times their mass is
   passed (about half a pass on average).

The weight sums are fixed-order float32 sums, so a pivot's weight is the same number every pass
and never grows as the pivot rises: the bracket keeps the answer. A greedy row (temperature below
`GREEDY_TEMPERATURE`) takes one argmax pass instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling import (
    GREEDY_TEMPERATURE,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
)

BLOCK = 1024  # tokens per loop iteration
PIVOTS = 16  # thresholds tried per pass of a search
MAX_PASSES = 48  # a bracket that has not closed by then keeps its lowest value (keeps a little more)


@triton.jit
def _philox_uniform(seed, offset, M0: tl.constexpr, M1: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                    ROUNDS: tl.constexpr):
    """u in [0, 1): top 24 bits of word 0 of Philox-4x32 (key = seed, counter = (offset, 0, 0))."""
    one = tl.full([1], 0, tl.uint64)
    s = one + seed.to(tl.uint64)
    o = one + offset.to(tl.uint64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = (o & 0xFFFFFFFF).to(tl.uint32)
    c1 = (o >> 32).to(tl.uint32)
    c2 = tl.zeros([1], tl.uint32)
    c3 = tl.zeros([1], tl.uint32)
    m0 = tl.full([1], M0, tl.uint32)
    m1 = tl.full([1], M1, tl.uint32)
    w0 = tl.full([1], W0, tl.uint32)
    w1 = tl.full([1], W1, tl.uint32)
    for _ in tl.static_range(ROUNDS):
        p0_hi = tl.umulhi(m0, c0)
        p0_lo = m0 * c0
        p1_hi = tl.umulhi(m1, c2)
        p1_lo = m1 * c2
        c0 = p1_hi ^ c1 ^ k0
        c1 = p1_lo
        c2 = p0_hi ^ c3 ^ k1
        c3 = p0_lo
        k0 = k0 + w0
        k1 = k1 + w1
    u = (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.sum(u, axis=0)


@triton.jit
def _search(base, V, t, m, lo, hi, target, IS_MASS: tl.constexpr, TARGET_IS_FRACTION: tl.constexpr,
            BLOCK: tl.constexpr, PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr):
    """The largest element value v in [lo, hi) with weight(z >= v) >= target, and that weight.

    Requires weight(z >= lo) >= target. With TARGET_IS_FRACTION, `target` is a fraction of
    weight(z >= lo), which the first pass measures."""
    cols = tl.arange(0, BLOCK)
    steps = tl.arange(0, PIVOTS)
    answer = lo
    weight_at = 0.0
    passes = 0
    done = 0
    first = 1
    while done == 0:
        span = (hi - lo) / PIVOTS
        piv = lo + span * steps.to(tl.float32)  # piv[0] == lo exactly
        acc = tl.zeros([PIVOTS], tl.float32)
        mn = float("inf")
        mx = -float("inf")
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            z = tl.math.div_rn(x, t)
            if IS_MASS:
                w = tl.exp(z - m)
            else:
                w = tl.where(z > -float("inf"), 1.0, 0.0)
            ge = z[None, :] >= piv[:, None]
            acc += tl.sum(tl.where(ge, w[None, :], 0.0), axis=1)
            inside = (z >= lo) & (z < hi)
            mn = tl.minimum(mn, tl.min(tl.where(inside, z, float("inf")), axis=0))
            mx = tl.maximum(mx, tl.max(tl.where(inside, z, -float("inf")), axis=0))
        at_lo = tl.sum(tl.where(steps == 0, acc, 0.0), axis=0)
        if TARGET_IS_FRACTION:
            if first == 1:
                target = target * at_lo
        first = 0
        passes += 1
        if (mn >= mx) | (passes >= MAX_PASSES):
            # One value left in the bracket (or out of passes: its lowest value, which reaches the
            # target too). Nothing lies in [lo, mn), so its weight is lo's.
            answer = mn
            weight_at = at_lo
            done = 1
        else:
            j = tl.maximum(tl.sum((acc >= target).to(tl.int32), axis=0) - 1, 0)
            new_lo = tl.sum(tl.where(steps == j, piv, 0.0), axis=0)
            new_hi = tl.where(j + 1 < PIVOTS, tl.sum(tl.where(steps == j + 1, piv, 0.0), axis=0), hi)
            lo = new_lo
            hi = new_hi
    return answer, weight_at


@triton.jit
def _sample_kernel(x_ptr, stride_x, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
                   out_ptr, thr_ptr, GREEDY_T: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, W0: tl.constexpr,
                   W1: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr,
                   MAX_PASSES: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    cols = tl.arange(0, BLOCK)
    t = tl.load(temp_ptr + row)
    token = 0
    if t < GREEDY_T:
        best = -float("inf")
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            bm = tl.max(x, axis=0)
            bi = tl.min(tl.where(x == bm, idx, V), axis=0)
            take = bm > best  # strictly: an earlier block keeps a tie
            token = tl.where(take, bi, token)
            best = tl.where(take, bm, best)
    else:
        # -- pass 1: max, finite min and count, and the mass of exp(z - max), online
        m = -float("inf")
        mass = 0.0
        low = float("inf")
        finite = 0
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            z = tl.math.div_rn(x, t)
            bm = tl.maximum(m, tl.max(z, axis=0))
            safe = tl.where(bm > -float("inf"), bm, 0.0)
            mass = mass * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), axis=0)
            m = bm
            fin = z > -float("inf")
            finite += tl.sum(fin.to(tl.int32), axis=0)
            low = tl.minimum(low, tl.min(tl.where(fin, z, float("inf")), axis=0))
        # Just above the max: the bracket's upper end is exclusive.
        top = m + tl.abs(m) * 2.4e-7 + 1e-30
        threshold = -float("inf")
        kept_mass = mass
        k = tl.load(top_k_ptr + row).to(tl.int32)
        if (k > 0) & (k < finite):
            t_k, _count = _search(base, V, t, m, low, top, k.to(tl.float32), False, False,
                                  BLOCK, PIVOTS, MAX_PASSES)
            threshold = t_k
            kept_mass = -1.0  # unknown: measured below if needed
        p = tl.load(top_p_ptr + row)
        if p < 1.0:
            lo = tl.maximum(threshold, low)
            t_p, p_mass = _search(base, V, t, m, lo, top, p, True, True, BLOCK, PIVOTS, MAX_PASSES)
            threshold = t_p
            kept_mass = p_mass
        mp = tl.load(min_p_ptr + row)
        if mp > 0.0:
            t_m = m + tl.log(mp)
            if t_m > threshold:
                threshold = t_m
                kept_mass = -1.0
        if kept_mass < 0.0:
            kept_mass = 0.0
            for start in range(0, V, BLOCK):
                idx = start + cols
                x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
                z = tl.math.div_rn(x, t)
                kept_mass += tl.sum(tl.where(z >= threshold, tl.exp(z - m), 0.0), axis=0)
        # -- the draw: where u * kept_mass falls in the running sum, in vocabulary order
        u = _philox_uniform(tl.load(seed_ptr + row), tl.load(offset_ptr + row), M0, M1, W0, W1, ROUNDS)
        goal = u * kept_mass
        running = 0.0
        token = -1
        last = 0
        start = 0
        while (start < V) & (token < 0):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            z = tl.math.div_rn(x, t)
            w = tl.where(z >= threshold, tl.exp(z - m), 0.0)
            csum = running + tl.cumsum(w, axis=0)
            crossed = tl.min(tl.where(csum > goal, idx, V), axis=0)
            if crossed < V:
                token = crossed
            last = tl.maximum(last, tl.max(tl.where(w > 0.0, idx, -1), axis=0))
            running += tl.sum(w, axis=0)
            start += BLOCK
        if token < 0:
            token = last  # rounding lifted the goal to the total: the last kept token
        tl.store(thr_ptr + row, threshold)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                  thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.sampling.sample` on the device: same arguments, int64 token ids [N].

    `thresholds`, if given (float32 [N]), receives each random row's final cut on z (-inf: none),
    for tests; greedy rows leave theirs untouched."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if thresholds is None:
        thresholds = torch.empty(n, dtype=torch.float32, device=logits.device)
    _sample_kernel[(n,)](
        logits, logits.stride(0), vocab,
        *(t.to(dtype).contiguous() for t, dtype in (
            (temperature, torch.float32), (top_k, torch.int32), (top_p, torch.float32), (min_p, torch.float32),
            (seeds, torch.int64), (offsets, torch.int64))),
        out, thresholds,
        GREEDY_T=GREEDY_TEMPERATURE, M0=PHILOX_M0, M1=PHILOX_M1, W0=PHILOX_W0, W1=PHILOX_W1,
        ROUNDS=PHILOX_ROUNDS, BLOCK=BLOCK, PIVOTS=PIVOTS, MAX_PASSES=MAX_PASSES, num_warps=8)
    return out


@triton.jit
def _uniform_kernel(seed_ptr, offset_ptr, out_ptr, M0: tl.constexpr, M1: tl.constexpr, W0: tl.constexpr,
                    W1: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.program_id(0)
    u = _philox_uniform(tl.load(seed_ptr + i), tl.load(offset_ptr + i), M0, M1, W0, W1, ROUNDS)
    tl.store(out_ptr + i, u)


def philox_uniform_triton(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The u the sampling kernel draws for each (seed, offset), float32 [N] (for tests)."""
    out = torch.empty(seeds.shape[0], dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        _uniform_kernel[(seeds.shape[0],)](seeds.to(torch.int64), offsets.to(torch.int64), out, M0=PHILOX_M0,
                                           M1=PHILOX_M1, W0=PHILOX_W0, W1=PHILOX_W1, ROUNDS=PHILOX_ROUNDS)
    return out
