"""The PyTorch reference kernels against independent float64 math written out here.

These pin down what every faster implementation must compute: CPU only, small, fast.
"""

from __future__ import annotations

import cmath
import math
import os

import pytest
import torch

from kernels.activation import silu_and_mul_ref
from kernels.attention import paged_attention_ref, write_kv_ref
from kernels.metadata import AttnMetadata
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.rotary import apply_rotary_ref, rotary_cos_sin


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def naive_attention(q, k_cache, v_cache, starts, ctx_lens, tables, scale) -> torch.Tensor:
    """Per token, per head: softmax over keys 0..p read one position at a time from the blocks."""
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, ctx in enumerate(ctx_lens):
        q_len = starts[i + 1] - starts[i]
        for j in range(q_len):
            t = starts[i] + j
            p = ctx - q_len + j
            keys = [k_cache[tables[i][n // block_size], n % block_size].double() for n in range(p + 1)]
            vals = [v_cache[tables[i][n // block_size], n % block_size].double() for n in range(p + 1)]
            for h in range(q.shape[1]):
                kv = h // group
                scores = [float(q[t, h].double() @ key[kv]) * scale for key in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[t, h] = sum(w / total * val[kv] for w, val in zip(weights, vals))
    return out


@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_ref_matches_naive_attention(gen: torch.Generator, group: int) -> None:
    num_kv, d, block_size, num_blocks = 2, 16, 4, 24
    specs = [(1, 9), (5, 5), (3, 11), (1, 1), (1, 6)]  # decodes, a prefill, a chunk after a prefix
    k_cache = torch.randn(num_blocks, block_size, num_kv, d, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv, d, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for _, ctx in specs:
        n = -(-ctx // block_size)
        tables.append(order[at : at + n] + [order[-1]] * (3 - n))
        at += n
    starts = [0]
    for q_len, _ in specs:
        starts.append(starts[-1] + q_len)
    ctx_lens = [c for _, c in specs]
    q = torch.randn(starts[-1], num_kv * group, d, generator=gen)
    meta = AttnMetadata(
        slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(q for q, _ in specs),
        max_context_len=max(ctx_lens),
    )
    scale = 0.3
    out = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    expected = naive_attention(q, k_cache, v_cache, starts, ctx_lens, tables, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_write_kv_ref_stores_each_token_at_its_slot(gen: torch.Generator) -> None:
    k_cache = torch.randn(5, 4, 2, 8, generator=gen)
    v_cache = torch.randn(5, 4, 2, 8, generator=gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = [13, -1, 0, 19, 6]
    k = torch.randn(5, 2, 8, generator=gen)
    v = torch.randn(5, 2, 8, generator=gen)
    write_kv_ref(k, v, k_cache, v_cache, torch.tensor(slots))
    for t, s in enumerate(slots):
        if s >= 0:
            assert torch.equal(k_cache[s // 4, s % 4], k[t]) and torch.equal(v_cache[s // 4, s % 4], v[t])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[[s for s in slots if s >= 0]] = False
    assert torch.equal(k_cache.view(20, 2, 8)[untouched], before_k.view(20, 2, 8)[untouched])
    assert torch.equal(v_cache.view(20, 2, 8)[untouched], before_v.view(20, 2, 8)[untouched])


def test_rms_norm_ref_matches_float64_formula(gen: torch.Generator) -> None:
    x = torch.randn(6, 40, generator=gen) * 5
    w = torch.randn(40, generator=gen)
    xd = x.double()
    expected = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6).double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_add_rms_norm_ref_returns_normed_sum_and_sum(gen: torch.Generator) -> None:
    x = torch.randn(3, 24, generator=gen)
    r = torch.randn(3, 24, generator=gen)
    w = torch.randn(24, generator=gen)
    normed, summed = fused_add_rms_norm_ref(x, r, w, 1e-5)
    s = x.double() + r.double()
    torch.testing.assert_close(summed.double(), s)
    expected = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(normed.double(), expected, rtol=1e-5, atol=1e-6)


def test_silu_and_mul_ref_matches_float64_formula(gen: torch.Generator) -> None:
    x = torch.randn(4, 2 * 30, generator=gen) * 4
    g, u = x[:, :30].double(), x[:, 30:].double()
    expected = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(silu_and_mul_ref(x).double(), expected, rtol=1e-5, atol=1e-6)


def llama3_inv_freq_naive(d: int, base: float, factor: float, low: float, high: float, old: int) -> list[float]:
    """Llama-3.1 scaling, written from the published rule one frequency at a time."""
    out = []
    for i in range(0, d, 2):
        f = 1.0 / base ** (i / d)
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, "llama3"])
def test_rotary_ref_is_a_complex_rotation(gen: torch.Generator, scaling) -> None:
    d, base, max_pos = 32, 10000.0, 300
    if scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        inv = llama3_inv_freq_naive(d, base, 8.0, 1.0, 4.0, 64)
    elif scaling is None:
        inv = [1.0 / base ** (i / d) for i in range(0, d, 2)]
    else:
        inv = [1.0 / base ** (i / d) / 4.0 for i in range(0, d, 2)]
    table = rotary_cos_sin(d, max_pos, base, scaling)
    q = torch.randn(5, 3, d, generator=gen)
    k = torch.randn(5, 1, d, generator=gen)
    pos = torch.randint(0, max_pos, (5,), generator=gen)
    q_out, k_out = apply_rotary_ref(q, k, pos, table)
    half = d // 2
    for x, y in ((q, q_out), (k, k_out)):
        expected = torch.empty(x.shape, dtype=torch.float64)
        for t in range(x.shape[0]):
            for h in range(x.shape[1]):
                for i in range(half):
                    # Rotate-half layout: element i pairs with i + d/2 as one complex number.
                    z = complex(float(x[t, h, i]), float(x[t, h, i + half]))
                    z *= cmath.exp(1j * int(pos[t]) * inv[i])
                    expected[t, h, i], expected[t, h, i + half] = z.real, z.imag
        # The table is float32; at positions up to 300 its angle rounding is about 3e-5.
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_rotary_cos_sin_rejects_unknown_scaling() -> None:
    with pytest.raises(ValueError, match="yarn"):
        rotary_cos_sin(16, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_decode_ignores_unwritten_slots_past_the_context(gen: torch.Generator) -> None:
    # Slots past a sequence's end hold whatever was there before (the reference needs them finite:
    # the engine zero-fills the CPU pool). Their values must not change the result.
    k_cache = torch.randn(4, 4, 1, 8, generator=gen)
    v_cache = torch.randn(4, 4, 1, 8, generator=gen)
    meta = AttnMetadata(
        slot_mapping=torch.tensor([5, 9]),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        context_lens=torch.tensor([6, 10], dtype=torch.int32),
        block_tables=torch.tensor([[0, 1, 3], [2, 3, 0]], dtype=torch.int32),
        max_query_len=1,
        max_context_len=10,
    )
    q = torch.randn(2, 2, 8, generator=gen)
    clean = paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    k_cache[1, 2:] = 1e4  # past sequence 0's 6 tokens (read, since sequence 1 is longer)
    v_cache[1, 2:] = -1e4
    out = paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out, clean)
