"""The sampling kernel and its reference: Philox against its published answers, the Triton kernel's
uniforms bit for bit, and its thresholds and draws against a float64 computation from the
definitions (kernels/sampling.py).

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
    philox4x32_ref,
    philox_uniform_ref,
    sample,
    sample_ref,
)
from kernels.triton.sampling import philox_uniform_triton, sample_triton  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
VOCABS = [50, 3000, 151936] if _CUDA else [50, 3000]


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
    ref = philox_uniform_ref(seeds, offsets)
    got = philox_uniform_triton(seeds.to(DEVICE), offsets.to(DEVICE)).cpu()
    assert torch.equal(got, ref)
    assert float(ref.min()) >= 0.0 and float(ref.max()) < 1.0
    # Neighbouring counters and neighbouring seeds give unrelated numbers.
    assert len(set(ref.tolist())) == n


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
    for kind in ("spread", "bf16", "peaked", "masked"):
        for c in cases:
            x = torch.randn(vocab, generator=gen) * 2.0
            if kind == "bf16":
                x = x.to(torch.bfloat16).float()  # many exact ties
            elif kind == "peaked":
                x = torch.randn(vocab, generator=gen) * 8.0
            elif kind == "masked":
                x[torch.randperm(vocab, generator=gen)[: vocab // 3]] = -math.inf
            rows.append(x)
            params.append(c)
    return torch.stack(rows), params


def exact_threshold(z: np.ndarray, top_k: int, top_p: float, min_p: float) -> float:
    """The cut on z by the definitions, in float64 (sorting)."""
    fin = z[np.isfinite(z)]
    desc = np.sort(fin)[::-1]
    t = -math.inf
    if 0 < top_k < len(desc):
        t = desc[top_k - 1]
    if top_p < 1.0:
        kept = desc[desc >= t]
        w = np.exp(kept - kept[0])
        before = np.cumsum(w) - w
        keep = max(1, int(np.sum(before / w.sum() < top_p)))
        t = kept[keep - 1]
    if min_p > 0.0:
        t = max(t, desc[0] + math.log(min_p))
    return float(t)


def mass_at(z: np.ndarray, v: float) -> float:
    zf = z[np.isfinite(z)]
    return float(np.exp(zf[zf >= v] - zf.max()).sum())


@pytest.mark.parametrize("vocab", VOCABS)
def test_kernel_thresholds_and_draws_match_the_definitions(vocab):
    gen = fresh_generator()
    logits, params = rows_and_params(vocab, gen)
    n = logits.shape[0]
    t, k, p, mp = (torch.tensor(col) for col in zip(*params))
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    offsets = torch.randint(0, 2**40, (n,), generator=gen)
    thresholds = torch.full((n,), math.nan, device=DEVICE)
    dev = [a.to(DEVICE) for a in (logits, t, k, p, mp, seeds, offsets)]
    got = sample_triton(*dev, thresholds=thresholds).cpu()
    thresholds = thresholds.cpu()
    u = philox_uniform_ref(seeds, offsets).double()
    for i, (temp, top_k, top_p, min_p) in enumerate(params):
        x = logits[i]
        if temp < GREEDY_TEMPERATURE:
            assert got[i] == int(x.argmax()), (i, params[i])
            continue
        z32 = (x / temp).numpy()  # the kernel divides in float32, correctly rounded
        z = z32.astype(np.float64)
        want_t = exact_threshold(z, top_k, top_p, min_p)
        got_t = float(thresholds[i])
        t_min_p = z.max() + math.log(min_p) if min_p else -math.inf
        if top_p < 1.0 and got_t != want_t and got_t > t_min_p + 1e-6:
            # Only a float32 mass sum landing within rounding of the top-p cut may move it: the
            # kernel's cut must still be the largest value whose mass reaches top_p (within 1e-5).
            base = mass_at(z, exact_threshold(z, top_k, 1.0, 0.0))
            assert mass_at(z, got_t) >= top_p * base * (1 - 1e-5), (i, params[i], got_t, want_t)
            above = z[z > got_t]
            assert above.size == 0 or mass_at(z, above.min()) < top_p * base * (1 + 1e-5), (i, params[i])
        else:
            assert got_t == pytest.approx(want_t, rel=1e-6, abs=1e-6), (i, params[i], got_t, want_t)
        # The draw: where u times the kept mass falls in the running sum, in vocabulary order.
        w = np.where(z >= got_t, np.exp(z - z.max()), 0.0)
        assert w[int(got[i])] > 0, (i, params[i], "drew a filtered token")
        cdf = np.cumsum(w)
        goal = float(u[i]) * cdf[-1]
        tok = int(got[i])
        slack = 1e-5 * cdf[-1]
        assert cdf[tok] - w[tok] <= goal + slack and cdf[tok] >= goal - slack, (i, params[i])


@pytest.mark.parametrize("vocab", [64, 3000])
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
    vocab = 3000
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
