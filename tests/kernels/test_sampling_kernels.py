"""The sampling kernel and its reference: Philox against its published answers, the Triton kernel's
uniforms bit for bit, its draws against the reference's (the same algorithm) and against the kept
set of the definitions computed in float64 (kernels/sampling.py).

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (small vocabularies: the
interpreter is slow); with one, compiled on CUDA with real vocabulary sizes.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # Must be set before any kernel is decorated: triton.jit picks interpreted or compiled then.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kernels.sampling import (  # noqa: E402
    GREEDY_TEMPERATURE,
    MAX_ROUNDS,
    draw_order,
    philox4x32_ref,
    philox_uniform_ref,
    sample,
    sample_ref,
)
from kernels.triton.sampling import philox_uniform_triton, sample_triton  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
VOCABS = [50, 3000, 151936] if _CUDA else [50, 1500]


def fresh_generator() -> torch.Generator:
    # A new seed every run; pytest shows the printed seed of a failing test, to replay it.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


# -- Philox ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # the known-answer vectors of Random123 for philox4x32, 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_reference_gives_the_published_answers(counter, key, expected):
    words = philox4x32_ref(tuple(np.uint64(c) for c in counter), tuple(np.uint64(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_kernel_uniforms_equal_the_reference_bit_for_bit():
    gen = fresh_generator()
    n = 257
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    offsets = torch.randint(0, 2**45, (n,), generator=gen)
    offsets[:3] = torch.tensor([0, 1, 2**32 - 1])
    rounds = torch.randint(0, MAX_ROUNDS + 1, (n,), generator=gen, dtype=torch.int32)
    ref = philox_uniform_ref(seeds, offsets, rounds)
    got = philox_uniform_triton(seeds.to(DEVICE), offsets.to(DEVICE), rounds.to(DEVICE)).cpu()
    assert torch.equal(got, ref)
    assert float(ref.min()) >= 0.0 and float(ref.max()) < 1.0
    # Neighbouring counters, rounds and seeds give unrelated numbers.
    assert len(set(ref.tolist())) == n
    assert not torch.equal(philox_uniform_ref(seeds, offsets, rounds + 1), ref)


def test_draw_order_takes_every_token_once_lane_by_lane():
    order = draw_order(2500).tolist()
    assert sorted(order) == list(range(2500))
    assert order[:3] == [0, 1024, 2048] and order[3] == 1


# -- thresholds and draws against float64 --------------------------------------------------------


def rows_and_params(vocab: int, gen: torch.Generator):
    """Rows of logits of several kinds (float32 spread, bf16-rounded with ties, peaked, with masked
    tokens) and parameter sets covering each filter alone and combined, plus greedy rows."""
    cases = [  # (temperature, top_k, top_p, min_p)
        (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 0.5, 0.0),
        (1.0, 5, 1.0, 0.0), (0.8, 40, 0.9, 0.0), (1.0, 0, 1.0, 0.1), (1.2, 20, 0.95, 0.05),
        (1.0, 1, 1.0, 0.0), (0.0, 0, 1.0, 0.0), (0.0, 3, 0.5, 0.1), (2.0, 0, 0.99, 0.0),
        (1.0, vocab - 1, 0.7, 0.0), (0.5, 0, 0.05, 0.0),
    ]
    rows, params = [], []
    for kind in ("spread", "bf16", "peaked", "masked", "flat"):
        for c in cases if kind != "flat" else [(1.0, 0, 0.002, 0.0), (1.0, 0, 0.3, 0.0), (0.7, 0, 0.01, 0.0)]:
            x = torch.randn(vocab, generator=gen) * 2.0
            if kind == "bf16":
                x = x.to(torch.bfloat16).float()  # many exact ties
            elif kind == "peaked":
                x = torch.randn(vocab, generator=gen) * 8.0
            elif kind == "flat":  # almost uniform: a small top_p rejects for many rounds
                x = torch.linspace(0.0, 1e-3, vocab)[torch.randperm(vocab, generator=gen)]
            elif kind == "masked":
                x[torch.randperm(vocab, generator=gen)[: vocab // 3]] = -math.inf
            rows.append(x)
            params.append(c)
    return torch.stack(rows), params


def kept_by_definition(z: np.ndarray, top_k: int, top_p: float, min_p: float, slack: float) -> np.ndarray:
    """Which tokens the filters keep by the definitions, in float64 (sorting); `slack` widens each
    cut a little, for what float32 arithmetic may still keep at a boundary."""
    fin = np.isfinite(z)
    desc = np.sort(z[fin])[::-1]
    cut = -math.inf
    if 0 < top_k < len(desc):
        cut = desc[top_k - 1]
    if top_p < 1.0:
        kept = desc[desc >= cut]
        w = np.exp(kept - kept[0])
        before = np.cumsum(w) - w
        keep = max(1, int(np.sum(before / w.sum() < top_p + slack)))
        cut = kept[keep - 1]
    if min_p > 0.0:
        cut = max(cut, desc[0] + math.log(min_p) - slack)
    return fin & (z >= cut - slack)


@pytest.mark.parametrize("vocab", VOCABS)
def test_kernel_draws_only_kept_tokens_in_the_rounds_the_reference_uses(vocab):
    gen = fresh_generator()
    logits, params = rows_and_params(vocab, gen)
    n = logits.shape[0]
    t, k, p, mp = (torch.tensor(col) for col in zip(*params))
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    offsets = torch.randint(0, 2**40, (n,), generator=gen)
    rounds = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    got = sample_triton(*(a.to(DEVICE) for a in (logits, t, k, p, mp, seeds, offsets)), rounds=rounds).cpu()
    ref_rounds = torch.full((n,), -1, dtype=torch.int32)
    ref = sample_ref(logits, t, k, p, mp, seeds, offsets, rounds=ref_rounds)
    rounds = rounds.cpu()
    for i, (temp, top_k, top_p, min_p) in enumerate(params):
        x = logits[i]
        if temp < GREEDY_TEMPERATURE:
            assert got[i] == int(x.argmax()) and rounds[i] == 0, (i, params[i])
            continue
        z = (x * (1.0 / torch.tensor(temp))).double().numpy()
        kept = kept_by_definition(z, top_k, top_p, min_p, slack=1e-5)
        assert kept[int(got[i])], (i, params[i], "drew a filtered token")
        assert 1 <= rounds[i] <= MAX_ROUNDS + 1 and (top_p < 1.0 or rounds[i] == 1), (i, params[i], int(rounds[i]))
    # The same algorithm: float rounding can move a rare draw (and then the rounds after it).
    same = (got == ref) & (rounds == ref_rounds)
    assert same.float().mean() >= 0.9, (got.tolist(), ref.tolist(), rounds.tolist(), ref_rounds.tolist())


@pytest.mark.parametrize("vocab", [64, 1500] if not _CUDA else [64, 3000, 151936])
def test_kernel_draws_the_tokens_of_the_reference(vocab):
    gen = fresh_generator()
    logits, params = rows_and_params(vocab, gen)
    n = logits.shape[0]
    t, k, p, mp = (torch.tensor(col) for col in zip(*params))
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    offsets = torch.randint(0, 2**40, (n,), generator=gen)
    ref = sample_ref(logits, t, k, p, mp, seeds, offsets)
    got = sample(*(a.to(DEVICE) for a in (logits, t, k, p, mp, seeds, offsets))).cpu()
    # Float rounding at a top-p cut or a CDF boundary can move a draw; on these rows it is rare.
    assert (got == ref).float().mean() >= 0.95, (got.tolist(), ref.tolist())


def test_a_row_draws_the_same_token_in_any_batch_and_any_position():
    gen = fresh_generator()
    vocab = 1500 if not _CUDA else 151936
    logits, params = rows_and_params(vocab, gen)
    n = logits.shape[0]
    t, k, p, mp = (torch.tensor(col) for col in zip(*params))
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    offsets = torch.randint(0, 2**40, (n,), generator=gen)
    cols = [a.to(DEVICE) for a in (logits, t, k, p, mp, seeds, offsets)]
    whole = sample(*cols).cpu()
    perm = torch.randperm(n, generator=gen)
    shuffled = sample(*(c[perm.to(DEVICE)] for c in cols)).cpu()
    assert torch.equal(shuffled, whole[perm])
    alone = [int(sample(*(c[i:i + 1] for c in cols))) for i in range(0, n, 7)]
    assert alone == whole[::7].tolist()
