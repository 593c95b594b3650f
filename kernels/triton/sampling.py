"""Sampling on the device: one program per row, no sort, no host in the loop.

The function is `kernels.sampling.sample` (its docstring defines it). A program reads its row as
LANES columns: lane j holds tokens j, j + LANES, j + 2 LANES, ... Every pass keeps per-lane running
values (maxima, sums) and reduces across lanes once, after the loop, so a pass is a stream of
loads with a few operations per element and no synchronisation inside.

1. Pass 1: per-lane online max and softmax mass of z = x * (1 / T), finite count and minimum.
   These lane masses are already what a draw needs (below): pure temperature sampling is one pass.
2. Top-k: the k-th largest z, by pivot passes (each counts the tokens at or above PIVOTS values
   spread over the bracket that holds the answer, and the bracket shrinks to the pivot interval
   holding it, until one value is left). The k-th largest lane maximum bounds it from below.
3. The draw (round r, uniform u_r): u_r times the domain's mass picks a lane by the running sum of
   lane masses, then a token inside the lane by the running sum of its tokens.
4. Top-p by rejection: the token drawn from {z >= max(top-k, min-p cut)} is kept if the mass above
   it is under top_p times the mass top-k kept; else the next round draws from the tokens above
   it. The pass that measures the mass above a token also gives the next round's lane masses, so
   a round is one pass (about 1.1 rounds at top_p 0.9). After MAX_ROUNDS rejections the top-p cut
   is found by pivot passes and drawn under directly.
A greedy row (temperature below GREEDY_TEMPERATURE) takes one argmax pass instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling import (
    DRAW_LANES,
    GREEDY_TEMPERATURE,
    MAX_ROUNDS,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
)

PIVOTS = 8  # thresholds tried per pass of a search
MAX_PASSES = 64  # a search bracket not closed by then keeps its lowest value (keeps a little more)
STRIPS = 4  # rows of LANES tokens loaded together by the streaming passes (16 KB of float32 in flight)
STAGES = 3  # loads issued ahead in each pass's loop


@triton.jit
def _philox_uniform(seed, offset, rnd, M0: tl.constexpr, M1: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                    ROUNDS: tl.constexpr):
    """u in [0, 1): top 24 bits of word 0 of Philox-4x32 (key = seed, counter = (offset, rnd, 0))."""
    zero = tl.full([1], 0, tl.uint64)
    s = zero + seed.to(tl.uint64)
    o = zero + offset.to(tl.uint64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = (o & 0xFFFFFFFF).to(tl.uint32)
    c1 = (o >> 32).to(tl.uint32)
    c2 = (zero + rnd.to(tl.uint64)).to(tl.uint32)
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
def _in_domain(z, lower, strict):
    """z above the domain's lower end: z > lower when `strict` is 1, else z >= lower."""
    return tl.where(strict != 0, z > lower, z >= lower)


@triton.jit
def _lane_masses(base, V, inv_t, m, lower, strict, k_cut, LANES: tl.constexpr, STRIPS: tl.constexpr,
                 STAGES: tl.constexpr):
    """Per lane, the mass exp(z - m) of the tokens in the domain; and the mass of z >= k_cut."""
    tile = tl.arange(0, STRIPS)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    acc = tl.zeros([LANES], tl.float32)
    acc_k = tl.zeros([LANES], tl.float32)
    for start in tl.range(0, V, STRIPS * LANES, num_stages=STAGES):
        idx = start + tile
        z = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
        w = tl.exp(z - m)
        acc += tl.sum(tl.where(_in_domain(z, lower, strict), w, 0.0), axis=0)
        acc_k += tl.sum(tl.where(z >= k_cut, w, 0.0), axis=0)
    return acc, tl.sum(acc_k, axis=0)


@triton.jit
def _draw(base, V, inv_t, m, lower, strict, lane_mass, u, LANES: tl.constexpr, NCH: tl.constexpr):
    """The token where u times the domain's mass falls: lanes in order, then the lane's tokens."""
    lanes = tl.arange(0, LANES)
    total = tl.sum(lane_mass, axis=0)
    goal = u * total
    run = tl.cumsum(lane_mass, axis=0)
    lane = tl.min(tl.where(run > goal, lanes, LANES), axis=0)
    # Rounding can lift the goal to the total: the last lane with mass is then the one.
    last_lane = tl.max(tl.where(lane_mass > 0.0, lanes, -1), axis=0)
    lane = tl.where(lane < LANES, lane, last_lane)
    before = tl.sum(tl.where(lanes == lane, run - lane_mass, 0.0), axis=0)
    blocks = tl.arange(0, NCH)
    idx = lane + blocks * LANES
    z = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
    w = tl.where(_in_domain(z, lower, strict), tl.exp(z - m), 0.0)
    csum = before + tl.cumsum(w, axis=0)
    pos = tl.min(tl.where(csum > goal, blocks, NCH), axis=0)
    last = tl.max(tl.where(w > 0.0, blocks, -1), axis=0)
    pos = tl.where(pos < NCH, pos, last)
    token = lane + pos * LANES
    z_tok = tl.sum(tl.where(blocks == pos, z, 0.0), axis=0)
    return token, z_tok


@triton.jit
def _search(base, V, inv_t, m, lo, hi, target, IS_MASS: tl.constexpr, LANES: tl.constexpr,
            PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr, STAGES: tl.constexpr):
    """The largest value v of the row in [lo, hi) whose weight(z >= v) reaches `target` (weight 1
    per finite token, or exp(z - m) with IS_MASS). Requires weight(z >= lo) >= target."""
    lanes = tl.arange(0, LANES)
    steps = tl.arange(0, PIVOTS)
    answer = lo
    passes = 0
    done = 0
    while done == 0:
        piv = lo + ((hi - lo) / PIVOTS) * steps.to(tl.float32)  # piv[0] == lo exactly
        acc = tl.zeros([PIVOTS, LANES], tl.float32)
        mn_l = tl.full([LANES], float("inf"), tl.float32)
        mx_l = tl.full([LANES], -float("inf"), tl.float32)
        for start in tl.range(0, V, LANES, num_stages=STAGES):
            idx = start + lanes
            z = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
            if IS_MASS:
                w = tl.exp(z - m)
            else:
                w = tl.where(z > -float("inf"), 1.0, 0.0)
            acc += tl.where(z[None, :] >= piv[:, None], w[None, :], 0.0)
            inside = (z >= lo) & (z < hi)
            mn_l = tl.minimum(mn_l, tl.where(inside, z, float("inf")))
            mx_l = tl.maximum(mx_l, tl.where(inside, z, -float("inf")))
        weight = tl.sum(acc, axis=1)
        mn = tl.min(mn_l, axis=0)
        mx = tl.max(mx_l, axis=0)
        passes += 1
        if (mn >= mx) | (passes >= MAX_PASSES):
            # One value left in the bracket (or out of passes: its lowest value, which reaches the
            # target too).
            answer = mn
            done = 1
        else:
            j = tl.maximum(tl.sum((weight >= target).to(tl.int32), axis=0) - 1, 0)
            new_lo = tl.sum(tl.where(steps == j, piv, 0.0), axis=0)
            hi = tl.where(j + 1 < PIVOTS, tl.sum(tl.where(steps == j + 1, piv, 0.0), axis=0), hi)
            lo = new_lo
    return answer


@triton.jit
def _sample_kernel(x_ptr, stride_x, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
                   out_ptr, rounds_ptr, GREEDY_T: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr,
                   W0: tl.constexpr, W1: tl.constexpr, ROUNDS: tl.constexpr, LANES: tl.constexpr,
                   NCH: tl.constexpr, PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr,
                   MAX_ROUNDS: tl.constexpr, STRIPS: tl.constexpr, STAGES: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    lanes = tl.arange(0, LANES)
    tile = tl.arange(0, STRIPS)[:, None] * LANES + lanes[None, :]
    t = tl.load(temp_ptr + row)
    token = 0
    used = 0
    if t < GREEDY_T:
        best = tl.full([LANES], -float("inf"), tl.float32)
        best_i = tl.full([LANES], 0, tl.int32) + V
        for start in tl.range(0, V, STRIPS * LANES, num_stages=STAGES):
            idx = start + tile
            x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            x_top = tl.max(x, axis=0)
            x_at = tl.min(tl.where(x == x_top[None, :], idx, V), axis=0)
            take = x_top > best  # strictly: a lane keeps its first maximum
            best = tl.where(take, x_top, best)
            best_i = tl.where(take, x_at, best_i)
        top = tl.max(best, axis=0)
        token = tl.min(tl.where(best == top, best_i, V), axis=0)
        token = tl.where(token < V, token, 0)
    else:
        inv_t = tl.math.div_rn(1.0, t)  # correctly rounded, as the reference's division
        seed = tl.load(seed_ptr + row)
        offset = tl.load(offset_ptr + row)
        # -- pass 1: per-lane online max and mass, finite count and minimum
        lm = tl.full([LANES], -float("inf"), tl.float32)
        ls = tl.zeros([LANES], tl.float32)
        low_l = tl.full([LANES], float("inf"), tl.float32)
        fin_l = tl.zeros([LANES], tl.int32)
        for start in tl.range(0, V, STRIPS * LANES, num_stages=STAGES):
            idx = start + tile
            z = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
            nm = tl.maximum(lm, tl.max(z, axis=0))
            safe = tl.where(nm > -float("inf"), nm, 0.0)
            ls = ls * tl.exp(lm - safe) + tl.sum(tl.exp(z - safe[None, :]), axis=0)
            lm = nm
            fin = z > -float("inf")
            fin_l += tl.sum(fin.to(tl.int32), axis=0)
            low_l = tl.minimum(low_l, tl.min(tl.where(fin, z, float("inf")), axis=0))
        m = tl.max(lm, axis=0)
        lane_mass = ls * tl.exp(lm - m)
        lane_mass = tl.where(lm > -float("inf"), lane_mass, 0.0)
        low = tl.min(low_l, axis=0)
        finite = tl.sum(fin_l, axis=0)
        kept_k = tl.sum(lane_mass, axis=0)  # the mass top-k keeps (all, without top-k)
        # -- the cuts known before any draw: top-k, min-p
        floor = -float("inf")
        k = tl.load(top_k_ptr + row).to(tl.int32)
        k_cut = -float("inf")
        if (k > 0) & (k < finite):
            # The k-th largest lane maximum is at most the k-th largest token.
            ranked = tl.sort(lm, descending=True)
            lower = tl.sum(tl.where(lanes == k - 1, ranked, 0.0), axis=0)
            lower = tl.maximum(tl.where(k <= LANES, lower, low), low)
            top = m + tl.abs(m) * 2.4e-7 + 1e-30  # just above the max: the bracket's end is exclusive
            k_cut = _search(base, V, inv_t, m, lower, top, k.to(tl.float32), False, LANES, PIVOTS, MAX_PASSES,
                            STAGES)
            floor = k_cut
        mp = tl.load(min_p_ptr + row)
        if mp > 0.0:
            floor = tl.maximum(floor, m + tl.log(mp))
        if floor > -float("inf"):
            lane_mass, kept_k = _lane_masses(base, V, inv_t, m, floor, 0, k_cut, LANES, STRIPS, STAGES)
        p = tl.load(top_p_ptr + row)
        goal = p * kept_k
        # -- rounds: draw, keep the token if the mass above it is under top_p of what top-k kept
        lower = floor
        strict = 0
        done = 0
        while done == 0:
            u = _philox_uniform(seed, offset, used, M0, M1, W0, W1, ROUNDS)
            token, z_tok = _draw(base, V, inv_t, m, lower, strict, lane_mass, u, LANES, NCH)
            used += 1
            if p >= 1.0:
                done = 1
            else:
                above, _unused = _lane_masses(base, V, inv_t, m, z_tok, 1, float("inf"), LANES, STRIPS, STAGES)
                if tl.sum(above, axis=0) < goal:
                    done = 1
                else:
                    lower = z_tok
                    strict = 1
                    lane_mass = above
                    if used >= MAX_ROUNDS:
                        # Out of rounds: find the top-p cut itself and draw under it.
                        top = m + tl.abs(m) * 2.4e-7 + 1e-30
                        cut = _search(base, V, inv_t, m, tl.maximum(floor, low), top, goal, True, LANES,
                                      PIVOTS, MAX_PASSES, STAGES)
                        cut = tl.maximum(cut, floor)
                        lane_mass, _unused = _lane_masses(base, V, inv_t, m, cut, 0, float("inf"), LANES, STRIPS,
                                                          STAGES)
                        u = _philox_uniform(seed, offset, used, M0, M1, W0, W1, ROUNDS)
                        token, z_tok = _draw(base, V, inv_t, m, cut, 0, lane_mass, u, LANES, NCH)
                        used += 1
                        done = 1
    tl.store(out_ptr + row, token.to(tl.int64))
    tl.store(rounds_ptr + row, used)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied to a fresh (aligned) allocation if it starts off a 16-byte boundary: Triton
    compiles one kernel variant per argument alignment, and each costs seconds the first time."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                  rounds: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.sampling.sample` on the device: same arguments, int64 token ids [N].

    `rounds`, if given (int32 [N]), receives how many uniforms each row used (0 for greedy rows):
    for tests and benchmarks."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if rounds is None:
        rounds = torch.empty(n, dtype=torch.int32, device=logits.device)
    _sample_kernel[(n,)](
        logits, logits.stride(0), vocab,
        *(_aligned(t.to(dtype).contiguous()) for t, dtype in (
            (temperature, torch.float32), (top_k, torch.int32), (top_p, torch.float32), (min_p, torch.float32),
            (seeds, torch.int64), (offsets, torch.int64))),
        out, rounds,
        GREEDY_T=GREEDY_TEMPERATURE, M0=PHILOX_M0, M1=PHILOX_M1, W0=PHILOX_W0, W1=PHILOX_W1,
        ROUNDS=PHILOX_ROUNDS, LANES=DRAW_LANES, NCH=triton.next_power_of_2(triton.cdiv(vocab, DRAW_LANES)),
        PIVOTS=PIVOTS, MAX_PASSES=MAX_PASSES, MAX_ROUNDS=MAX_ROUNDS, STRIPS=STRIPS, STAGES=STAGES, num_warps=8)
    return out


@triton.jit
def _uniform_kernel(seed_ptr, offset_ptr, round_ptr, out_ptr, M0: tl.constexpr, M1: tl.constexpr,
                    W0: tl.constexpr, W1: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.program_id(0)
    u = _philox_uniform(tl.load(seed_ptr + i), tl.load(offset_ptr + i), tl.load(round_ptr + i), M0, M1, W0, W1,
                        ROUNDS)
    tl.store(out_ptr + i, u)


def philox_uniform_triton(seeds: torch.Tensor, offsets: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
    """The u the sampling kernel draws for each (seed, offset, round), float32 [N] (for tests)."""
    out = torch.empty(seeds.shape[0], dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        _uniform_kernel[(seeds.shape[0],)](seeds.to(torch.int64), offsets.to(torch.int64), rounds.to(torch.int32),
                                           out, M0=PHILOX_M0, M1=PHILOX_M1, W0=PHILOX_W0, W1=PHILOX_W1,
                                           ROUNDS=PHILOX_ROUNDS)
    return out
