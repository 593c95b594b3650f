"""Each Triton kernel against its PyTorch reference, on fresh random inputs.

Without a GPU the kernels run under the Triton interpreter on CPU tensors, in float32 and float16,
with small shapes (the interpreter is slow). With a GPU they are compiled and run on CUDA tensors
in bfloat16 (and float16 / float32), with larger shapes and a cache pool past 2**31 elements.
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # Must be set before any kernel is decorated: triton.jit picks interpreted or compiled then.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kernels.activation import silu_and_mul_ref  # noqa: E402
from kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from kernels.metadata import AttnMetadata  # noqa: E402
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402
from kernels.rotary import apply_rotary_ref, rotary_cos_sin  # noqa: E402
from kernels.triton.activation import silu_and_mul_triton  # noqa: E402
from kernels.triton.attention import paged_attention_triton, write_kv_triton  # noqa: E402
from kernels.triton.norm import fused_add_rms_norm_triton, rms_norm_triton  # noqa: E402
from kernels.triton.rotary import apply_rotary_triton  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if _CUDA else [torch.float32, torch.float16]

# Relative L2 error allowed against a reference computed in float32 from the same inputs: float32
# arithmetic (ieee dots) lands far under 1e-4; fp16 and bf16 outputs carry their own rounding
# (2**-11 and 2**-8 per element) plus low-precision operands in the matrix products.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def fresh_generator() -> torch.Generator:
    # A new seed every run; pytest shows the printed seed of a failing test, to replay it.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------- small fused ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 4, 1000)])
def test_rms_norm_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = fresh_generator()
    x = randn(*shape, gen=gen, dtype=dtype) * 3
    w = randn(shape[-1], gen=gen, dtype=dtype)
    out = rms_norm_triton(x, w, 1e-6)
    ref = rms_norm_ref(x.float(), w.float(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < REL_TOL[dtype]
    # Same dtype path as the reference: rounding happens at the same points.
    assert rel_err(out, rms_norm_ref(x, w, 1e-6)) < REL_TOL[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 200)])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = fresh_generator()
    x = randn(*shape, gen=gen, dtype=dtype)
    res = randn(*shape, gen=gen, dtype=dtype) * 2
    w = randn(shape[-1], gen=gen, dtype=dtype)
    x_before, res_before = x.clone(), res.clone()
    normed, summed = fused_add_rms_norm_triton(x, res, w, 1e-5)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(summed, ref_summed), "the residual sum must be the reference's exactly"
    assert rel_err(normed, fused_add_rms_norm_ref(x.float(), res.float(), w.float(), 1e-5)[0]) < REL_TOL[dtype]
    assert rel_err(normed, ref_normed) < REL_TOL[dtype] / 4
    assert torch.equal(x, x_before) and torch.equal(res, res_before), "inputs must be left untouched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,q_heads,k_heads,head_dim", [(1, 4, 4, 64), (9, 8, 2, 128), (5, 12, 1, 64)]
)
def test_rotary_matches_reference(dtype: torch.dtype, num_tokens: int, q_heads: int, k_heads: int, head_dim: int) -> None:
    gen = fresh_generator()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    table = rotary_cos_sin(head_dim, 512, 500000.0, scaling, device=DEVICE)
    q = randn(num_tokens, q_heads, head_dim, gen=gen, dtype=dtype)
    k = randn(num_tokens, k_heads, head_dim, gen=gen, dtype=dtype)
    pos = torch.randint(0, 512, (num_tokens,), generator=gen).to(DEVICE)
    q_out, k_out = apply_rotary_triton(q, k, pos, table)
    q_ref, k_ref = apply_rotary_ref(q.float(), k.float(), pos, table)
    assert rel_err(q_out, q_ref) < REL_TOL[dtype] and rel_err(k_out, k_ref) < REL_TOL[dtype]


def test_rotary_reads_strided_views_of_a_fused_projection() -> None:
    gen = fresh_generator()
    q_heads, k_heads, d, t = 4, 2, 64, 6
    qkv = randn(t, (q_heads + 2 * k_heads) * d, gen=gen)
    q = qkv[:, : q_heads * d].view(t, q_heads, d)
    k = qkv[:, q_heads * d : (q_heads + k_heads) * d].view(t, k_heads, d)
    table = rotary_cos_sin(d, 64, 10000.0, device=DEVICE)
    pos = torch.randint(0, 64, (t,), generator=gen).to(DEVICE)
    q_out, k_out = apply_rotary_triton(q, k, pos, table)
    q_ref, k_ref = apply_rotary_ref(q, k, pos, table)
    assert rel_err(q_out, q_ref) < 1e-5 and rel_err(k_out, k_ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (5, 3, 600), (2, 2 * 1500)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = fresh_generator()
    x = randn(*shape, gen=gen, dtype=dtype) * 3
    out = silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert rel_err(out, silu_and_mul_ref(x.float())) < REL_TOL[dtype]
    assert rel_err(out, silu_and_mul_ref(x)) < REL_TOL[dtype] / 4


# ---------------------------------------------------------------------------- paged attention


def make_batch(
    specs: list[tuple[int, int]],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    spare_blocks: int = 7,
    pool_blocks: int | None = None,
    poison_tails: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttnMetadata]:
    """A flat batch of sequences given as (query_len, context_len), over a randomly ordered pool.

    The caches are filled with random values everywhere (never zeros), so a wrong block lookup or a
    key past the context reads plausible but wrong data and shows up in the comparison.
    """
    per_seq = [-(-ctx // block_size) for _, ctx in specs]
    needed = sum(per_seq)
    num_blocks = pool_blocks or needed + spare_blocks
    if pool_blocks is None:
        k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        order = torch.randperm(num_blocks, generator=gen)[:needed]
    else:
        # A pool too large to fill with random data: fill only the blocks in use, all at the top.
        k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
        v_cache = torch.empty_like(k_cache)
        order = num_blocks - 1 - torch.randperm(needed, generator=gen)
        idx = order.to(DEVICE)
        k_cache[idx] = randn(needed, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        v_cache[idx] = randn(needed, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    width = max(per_seq) + 2
    # Padding entries point at real blocks too: a kernel that reads past the context is caught by
    # the comparison rather than by a crash.
    tables = torch.randint(0, num_blocks, (len(specs), width), generator=gen, dtype=torch.int32)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[at : at + n].to(torch.int32)
        at += n
    if poison_tails:
        # Slots past each sequence's end in its last block are NaN, as an uninitialised pool may
        # be: a kernel that reads them (even with zero weight) turns the output NaN.
        for i, (_, ctx) in enumerate(specs):
            if ctx % block_size:
                last = int(tables[i, per_seq[i] - 1])
                k_cache[last, ctx % block_size :] = float("nan")
                v_cache[last, ctx % block_size :] = float("nan")
    q_lens = [q for q, _ in specs]
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    slots = []
    for i, (q_len, ctx) in enumerate(specs):
        for p in range(ctx - q_len, ctx):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
    meta = AttnMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=starts.to(DEVICE),
        context_lens=torch.tensor([c for _, c in specs], dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE),
        max_query_len=max(q_lens),
        max_context_len=max(c for _, c in specs),
    )
    q = randn(sum(q_lens), num_kv_heads * group, head_dim, gen=gen, dtype=dtype)
    return q, k_cache, v_cache, meta


def check_attention(q, k_cache, v_cache, meta, dtype, **kwargs) -> None:
    scale = q.shape[-1] ** -0.5
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale, **kwargs)
    # The reference reads whole blocks and needs finite unwritten slots (the engine zero-fills its
    # CPU pool); the Triton kernel gets the NaN-poisoned cache, so reading past a context fails it.
    ref = paged_attention_ref(q.float(), torch.nan_to_num(k_cache.float()), torch.nan_to_num(v_cache.float()),
                              meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"relative error {err:.2e}"


# Interpreter shapes stay small; the GPU gets long contexts.
LONG = 3000 if _CUDA else 400


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_batch_matches_reference(dtype, group, head_dim, num_splits) -> None:
    gen = fresh_generator()
    specs = [(1, 1), (1, 17), (1, 100), (1, LONG)]
    q, kc, vc, meta = make_batch(specs, 2, group, head_dim, 16, dtype, gen)
    check_attention(q, kc, vc, meta, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_single_sequence(dtype) -> None:
    gen = fresh_generator()
    q, kc, vc, meta = make_batch([(1, 1)], 1, 4, 64, 16, dtype, gen)
    check_attention(q, kc, vc, meta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 64, 16), (8, 128, 32), (4, 64, 8)])
def test_mixed_batch_matches_reference(dtype, group, head_dim, block_size) -> None:
    # decode, fresh prefill, chunk after a prefix hit, a one-token sequence, a longer chunk, a
    # sequence with no query this step, and another decode.
    gen = fresh_generator()
    specs = [(1, 50), (7, 7), (5, 40), (1, 1), (33, 80), (0, 10), (1, 130)]
    q, kc, vc, meta = make_batch(specs, 2, group, head_dim, block_size, dtype, gen)
    check_attention(q, kc, vc, meta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m", [None, 16])
def test_long_prefill_chunk_matches_reference(dtype, block_m) -> None:
    gen = fresh_generator()
    specs = [(70, 200), (1, 64)] if not _CUDA else [(1000, 1500), (300, 300), (1, 2048)]
    q, kc, vc, meta = make_batch(specs, 1, 4, 64, 16, dtype, gen)
    check_attention(q, kc, vc, meta, dtype, block_m=block_m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_then_attend_matches_reference(dtype) -> None:
    gen = fresh_generator()
    specs = [(1, 30), (12, 12), (4, 21)]
    q, kc, vc, meta = make_batch(specs, 2, 4, 64, 16, dtype, gen, poison_tails=False)
    n = q.shape[0]
    k_new = randn(n, 2, 64, gen=gen, dtype=dtype)
    v_new = randn(n, 2, 64, gen=gen, dtype=dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_ref(k_new, v_new, kc_ref, vc_ref, meta.slot_mapping)
    write_kv_triton(k_new, v_new, kc, vc, meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    check_attention(q, kc, vc, meta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_skips_padding_slots_and_touches_nothing_else(dtype) -> None:
    gen = fresh_generator()
    num_blocks, block_size, heads, d = 9, 16, 3, 64
    kc = randn(num_blocks, block_size, heads, d, gen=gen, dtype=dtype)
    vc = randn(num_blocks, block_size, heads, d, gen=gen, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:11]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    # Strided views, as the output of a fused QKV projection would be.
    kv = randn(11, 2 * heads * d, gen=gen, dtype=dtype)
    k, v = kv[:, : heads * d].view(11, heads, d), kv[:, heads * d :].view(11, heads, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    write_kv_ref(k, v, kc_ref, vc_ref, slots)
    write_kv_triton(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.skipif(not _CUDA, reason="needs a GPU: a pool past 2**31 elements is 4+ GiB per cache")
def test_block_pool_past_int32_offsets() -> None:
    gen = fresh_generator()
    heads, d, block_size = 8, 128, 16
    pool = (2**31 // (block_size * heads * d)) + 64  # the top blocks start past element 2**31
    specs = [(1, 300), (20, 90)]
    q, kc, vc, meta = make_batch(specs, heads, 4, d, block_size, torch.bfloat16, gen, pool_blocks=pool)
    assert int(meta.block_tables[:, :1].min()) * block_size * heads * d > 2**31
    check_attention(q, kc, vc, meta, torch.bfloat16)
    check_attention(q[[0]], kc, vc, AttnMetadata(
        meta.slot_mapping[:1], meta.query_start_loc[:2], meta.context_lens[:1], meta.block_tables[:1], 1, 300
    ), torch.bfloat16, num_splits=2)
    # Writes land at the top of the pool too.
    n = q.shape[0]
    k_new = randn(n, heads, d, gen=gen, dtype=torch.bfloat16)
    write_kv_triton(k_new, k_new, kc, vc, meta.slot_mapping)
    flat = kc.view(-1, heads, d)
    assert torch.equal(flat[meta.slot_mapping], k_new)
