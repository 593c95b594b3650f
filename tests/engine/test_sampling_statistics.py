"""Sampling as the engine runs it, on every device it runs on: the draws follow the float64
reference distribution (Pearson's chi-square), and a seeded request draws the same tokens whatever
else shares its batch.

On the CPU the sampler runs the PyTorch reference of `kernels.sampling.sample`; on CUDA the Triton
kernel (the same function, found without sorting). The reference distribution is
`test_sampler.reference_distribution`, written from the definitions in plain Python floats.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.sampler import Sampler
from test_sampler import EOS, chi2_critical, make_request, random_logits, reference_distribution

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def binned_chi_square(tokens: list[int], probs: list[float], bins: int) -> tuple[float, int]:
    """Pearson's statistic over bins of about equal reference probability (tokens taken in
    vocabulary order), so that each bin expects enough draws; and its degrees of freedom."""
    mass, current = 0.0, []
    per_bin = sum(probs) / bins
    groups: list[list[int]] = []
    for i, p in enumerate(probs):
        if p <= 0:
            continue
        current.append(i)
        mass += p
        if mass >= per_bin * (len(groups) + 1):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    edges = {t: g for g, members in enumerate(groups) for t in members}
    counts = Counter(edges[t] for t in tokens)
    expected = [sum(probs[t] for t in members) * len(tokens) for members in groups]
    stat = sum((counts.get(g, 0) - e) ** 2 / e for g, e in enumerate(expected))
    return stat, len(groups) - 1


CASES = [
    # (params, vocab, logit scale): small vocabularies checked token by token, large ones in bins
    ({"temperature": 1.0}, 16, 1.0),
    ({"temperature": 0.7, "top_k": 6}, 16, 1.0),
    ({"temperature": 1.0, "top_p": 0.8}, 16, 1.0),
    ({"temperature": 1.5, "min_p": 0.1}, 16, 1.0),
    ({"temperature": 1.2, "top_k": 10, "top_p": 0.9, "min_p": 0.02}, 16, 1.0),
    ({"temperature": 1.0, "top_p": 0.9}, 5000, 0.3),  # flat: most of the row kept
    ({"temperature": 0.8, "top_k": 300, "top_p": 0.7}, 5000, 1.0),
    ({"temperature": 1.0, "min_p": 0.2}, 5000, 0.5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
@pytest.mark.parametrize("params,vocab,scale", CASES,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_draws_follow_the_float64_reference_distribution(device, seeded, params, vocab, scale):
    row = random_logits(1, vocab=vocab, seed=21, scale=scale)[0]
    if vocab > 1000:
        row = row.to(torch.bfloat16).float()  # what a bf16 model gives: ties at the cuts
    draws = 20000 if vocab <= 16 or device == "cuda" else 3000
    requests = [make_request(request_id=f"r{i}", seed=1000 + i if seeded else None, **params)
                for i in range(draws)]
    logits = row.expand(draws, vocab).contiguous().to(device)
    _, tokens = Sampler(vocab, [EOS], seed=7).sample_tokens(logits, requests)
    tokens = tokens.tolist()
    probs = reference_distribution(row.tolist(), requests[0])
    allowed = reference_distribution(row.tolist(), requests[0], slack=1e-5)
    assert all(allowed[t] > 0 for t in tokens), "drew a token the filters remove"
    if vocab <= 16:
        counts = Counter(tokens)
        support = [i for i, p in enumerate(probs) if p > 0]
        stat = sum((counts.get(i, 0) - draws * probs[i]) ** 2 / (draws * probs[i]) for i in support)
        dof = len(support) - 1
    else:
        stat, dof = binned_chi_square(tokens, probs, bins=min(40, draws // 50))
    assert dof >= 2, probs  # the case must leave a real choice
    assert stat < chi2_critical(dof), (stat, dof)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_requests_draw_the_same_tokens_in_any_batch(device):
    """Across steps (the draw counter advances) and batches of every kind of neighbour."""
    vocab = 4000
    mine_params = [{"temperature": 1.0}, {"temperature": 0.9, "top_p": 0.9},
                   {"temperature": 1.1, "top_k": 50, "min_p": 0.01}, {"top_p": 0.5, "repetition_penalty": 1.2}]
    neighbours = [{"temperature": 0.0}, {"temperature": 1.3, "top_k": 3}, {"top_p": 0.95, "seed": 5},
                  {"min_p": 0.3, "frequency_penalty": 0.5}, {"temperature": 0.7}]

    def logits_for(request_id: str, step: int) -> torch.Tensor:
        seed = (sum(map(ord, request_id)) * 7919 + step) % (2**31)
        return random_logits(1, vocab=vocab, seed=seed, scale=0.5 if step % 2 else 3.0)[0]

    def run(with_neighbours: list[dict], order_seed: int) -> list[list[int]]:
        mine = [make_request(request_id=f"me{i}", seed=300 + i, **p) for i, p in enumerate(mine_params)]
        others = [make_request(request_id=f"n{i}", **p) for i, p in enumerate(with_neighbours)]
        batch = mine + others
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(order_seed)).tolist()
        batch = [batch[i] for i in order]
        sampler = Sampler(vocab, [EOS], seed=order_seed)
        for step in range(5):
            logits = torch.stack([logits_for(r.request_id, step) for r in batch]).to(device)
            _, tokens = sampler.sample_tokens(logits, batch)
            for r, t in zip(batch, tokens.tolist()):
                r.output_token_ids.append(t)
        return [r.output_token_ids for r in mine]

    alone = run([], 0)
    assert run(neighbours, 1) == alone
    assert run(neighbours[::-1] + neighbours, 2) == alone
    assert len({tuple(t) for t in alone}) == len(alone)
