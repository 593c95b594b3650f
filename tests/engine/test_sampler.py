"""The sampler against an independent float64 reference: distributions, draws, seeds, masks,
logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.request import Request
from engine.sampler import Sampler
from kernels.sampling import CANDIDATES
from engine.sampling_params import SamplingParams

VOCAB = 64
EOS = 7


def make_request(prompt=(1, 2, 3), output=(), request_id="r", **params) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(**params))
    request.output_token_ids = list(output)
    return request


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


# -- the reference: plain Python floats, written from the definitions, not from the sampler --------


def reference_distribution(
    logits: list[float], request: Request, eos_ids=(EOS,), slack: float = 0.0
) -> list[float]:
    """The next-token distribution by the textbook definitions, in float64.

    `slack` widens each filter's cut-off a little, giving the set of tokens that a float32
    implementation may still legitimately keep at a boundary.
    """
    p = request.params
    x = [float(v) for v in logits]
    vocab = len(x)
    seen = set(request.prompt_token_ids) | set(request.output_token_ids)
    for t in seen:
        if t < vocab:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(request.output_token_ids).items():
        if t < vocab:
            x[t] -= p.frequency_penalty * c + p.presence_penalty
    if len(request.output_token_ids) < p.min_tokens:
        enders = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        for t in enders:
            if t < vocab:
                x[t] = -math.inf
    if p.temperature == 0:
        best = max(range(vocab), key=lambda i: (x[i], -i))
        return [1.0 if i == best else 0.0 for i in range(vocab)]
    x = [v / p.temperature for v in x]
    order = sorted(range(vocab), key=lambda i: -x[i])
    keep = set(range(vocab))
    if 0 < p.top_k < vocab:
        kth = x[order[p.top_k - 1]]
        keep = {i for i in keep if x[i] >= kth - slack}
    if p.top_p < 1:
        top = max(x[i] for i in keep)
        weights = {i: math.exp(x[i] - top) for i in keep}
        total = sum(weights.values())
        mass = 0.0
        kept = set()
        for i in order:
            if i not in keep:
                continue
            if mass < p.top_p + slack or not kept:
                kept.add(i)
            mass += weights[i] / total
        # Tokens tied with the last one kept are kept too: a tie has no order to cut it by.
        edge = min(x[i] for i in kept)
        keep = {i for i in keep if x[i] >= edge}
    if p.min_p > 0:
        top = max(x)
        keep = {i for i in keep if math.exp(x[i] - top) >= p.min_p * (1 - slack)}
    top = max(x[i] for i in keep)
    weights = [math.exp(x[i] - top) if i in keep else 0.0 for i in range(vocab)]
    total = sum(weights)
    return [w / total for w in weights]


def assert_distribution_matches(sampler: Sampler, logits: torch.Tensor, requests: list[Request]):
    got = sampler.probabilities(logits, requests).double()
    for i, request in enumerate(requests):
        want = torch.tensor(
            reference_distribution(logits[i].tolist(), request), dtype=torch.float64
        )
        assert torch.allclose(got[i], want, atol=1e-5), (request.params, got[i], want)


# -- distributions ---------------------------------------------------------------------------------

FILTER_CASES = [
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 1.7},
    {"temperature": 0.8, "top_k": 5},
    {"temperature": 1.0, "top_k": 1},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 2.0, "top_p": 0.3},
    {"temperature": 1.0, "top_k": 10, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 1.3, "top_k": 20, "top_p": 0.95, "min_p": 0.05},
    {"temperature": 0.0, "top_k": 3},
]


@pytest.mark.parametrize(
    "params", FILTER_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items())
)
def test_filtered_distribution_matches_float64_reference(params):
    sampler = Sampler(VOCAB, [EOS])
    requests = [make_request(request_id=f"r{i}", **params) for i in range(3)]
    assert_distribution_matches(sampler, random_logits(3, seed=1), requests)


def test_filters_in_one_batch_each_match_their_own_reference():
    sampler = Sampler(VOCAB, [EOS])
    requests = [make_request(request_id=f"r{i}", **p) for i, p in enumerate(FILTER_CASES)]
    assert_distribution_matches(sampler, random_logits(len(requests), seed=2), requests)


PENALTY_CASES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"frequency_penalty": 0.8},
    {"presence_penalty": 1.5},
    {"frequency_penalty": -0.5, "presence_penalty": -1.0},
    {
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.4,
        "presence_penalty": 0.3,
        "temperature": 0.9,
        "top_p": 0.9,
    },
    {"repetition_penalty": 1.5, "temperature": 0.0},
]


@pytest.mark.parametrize(
    "params", PENALTY_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items())
)
def test_penalized_distribution_matches_float64_reference(params):
    sampler = Sampler(VOCAB, [EOS])
    requests = [
        make_request(prompt=[1, 2, 3, 40], output=[3, 3, 5, 9, 5, 3], request_id="a", **params),
        make_request(prompt=[60, 61], output=[], request_id="b", **params),
        make_request(prompt=[4], output=[10, 11, 12, 10], request_id="c"),  # no penalty, same batch
    ]
    assert_distribution_matches(sampler, random_logits(3, seed=3), requests)


def test_penalties_follow_openai_and_ctrl_semantics_on_known_values():
    sampler = Sampler(8)
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]])
    rep = make_request(prompt=[0], output=[1], repetition_penalty=2.0, temperature=0.0)
    x = sampler._apply_penalties(logits, [rep])
    assert x[0, :3].tolist() == [1.0, -4.0, 1.0]  # positive divided, negative multiplied
    freq = make_request(prompt=[0], output=[2, 2, 4], frequency_penalty=0.5, presence_penalty=0.25)
    x = sampler._apply_penalties(logits, [freq])
    assert x[0].tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.25, 0.0, 0.5 - 0.5 - 0.25, 0.5, 0.5, 0.5]
    assert logits[0, 0] == 2.0  # the caller's logits are untouched


def test_padding_columns_past_the_vocabulary_are_never_chosen():
    sampler = Sampler(VOCAB, seed=0)
    logits = torch.cat([random_logits(4), torch.full((4, 16), 100.0)], dim=1)
    requests = [make_request(request_id=f"r{i}", temperature=t) for i, t in enumerate([0, 1, 2, 5])]
    for _ in range(20):
        assert all(out.token_id < VOCAB for out in sampler(logits, requests))


# -- large vocabularies: the candidate list, the wider retry and the full-sort fallback ------------


def bf16_like(logits: torch.Tensor) -> torch.Tensor:
    """Logits rounded as a bfloat16 model gives them: many exact ties."""
    return logits.to(torch.bfloat16).float()


@pytest.mark.parametrize("vocab", [3000, 20000])
@pytest.mark.parametrize(
    "params,scale",
    [
        ({"top_p": 0.9}, 6.0),  # peaked: the slice ends inside the candidates
        ({"top_p": 0.9}, 0.3),  # flat: thousands kept, widened or fully sorted
        ({"top_p": 0.5, "top_k": 700}, 0.3),  # top-k wider than the candidates
        ({"min_p": 0.5, "temperature": 0.7}, 0.2),  # min-p keeping most of the row
        ({"top_k": 40, "top_p": 0.95}, 2.0),
    ],
)
def test_large_vocabulary_distribution_matches_reference(vocab, params, scale):
    sampler = Sampler(vocab, [EOS])
    requests = [make_request(request_id=f"r{i}", **params) for i in range(2)]
    assert_distribution_matches(
        sampler, random_logits(2, vocab=vocab, seed=12, scale=scale), requests
    )


@pytest.mark.parametrize("params", [{"top_p": 0.9}, {"min_p": 0.3}])
def test_draws_reach_kept_tokens_beyond_the_candidate_list(params):
    vocab, draws = 3000, 4000
    row = random_logits(1, vocab=vocab, seed=14, scale=0.3)[0]
    requests = [make_request(request_id=f"r{i}", **params) for i in range(draws)]
    tokens = [
        o.token_id for o in Sampler(vocab, seed=5)(row.expand(draws, vocab).contiguous(), requests)
    ]
    probs = reference_distribution(row.tolist(), requests[0])
    head = set(row.topk(CANDIDATES).indices.tolist())
    tail_mass = sum(p for i, p in enumerate(probs) if i not in head)
    assert tail_mass > 0.5  # most of what the filters keep lies past the candidates
    tail_share = sum(t not in head for t in tokens) / draws
    assert abs(tail_share - tail_mass) < 5 * math.sqrt(tail_mass * (1 - tail_mass) / draws)
    assert all(probs[t] > 0 for t in tokens)


def test_ties_at_the_top_k_edge_are_all_kept():
    vocab = 4000
    logits = bf16_like(random_logits(2, vocab=vocab, seed=13, scale=1.0))
    requests = [
        make_request(request_id=f"r{i}", top_k=300, top_p=p) for i, p in enumerate([1.0, 0.6])
    ]
    kth = logits[0].topk(300).values[-1]
    assert int((logits[0] >= kth).sum()) > 300  # the case has ties running past k
    assert_distribution_matches(Sampler(vocab), logits, requests)


def test_seeded_draws_do_not_depend_on_how_many_candidates_the_batch_needs():
    vocab = 20000
    params = [{"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 30, "top_p": 0.8}]

    def run(neighbours: list[dict]) -> list[list[int]]:
        mine = [make_request(request_id=f"me{i}", seed=40 + i, **p) for i, p in enumerate(params)]
        batch = mine + [make_request(request_id=f"n{i}", **p) for i, p in enumerate(neighbours)]
        for step in range(4):
            logits = torch.stack(
                [
                    random_logits(
                        1,
                        vocab=vocab,
                        seed=hash((r.request_id, step)) % 999,
                        scale=0.4 if step % 2 else 4.0,
                    )[0]
                    for r in batch
                ]
            )
            for r, out in zip(batch, Sampler(vocab, seed=step)(logits, batch)):
                r.output_token_ids.append(out.token_id)
        return [r.output_token_ids for r in mine]

    alone = run([])
    assert run([{"top_k": 5000}, {"temperature": 0.0}, {"top_p": 0.3, "top_k": 2}]) == alone
    assert run([{"top_k": 9000, "top_p": 0.99}]) == alone


# -- greedy ----------------------------------------------------------------------------------------


def test_greedy_is_argmax_of_each_row():
    sampler = Sampler(VOCAB, [EOS])
    logits = random_logits(16, seed=4)
    requests = [make_request(request_id=f"r{i}", temperature=0.0, seed=i) for i in range(16)]
    got = [out.token_id for out in sampler(logits, requests)]
    assert got == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_argmax_next_to_random_rows():
    sampler = Sampler(VOCAB, [EOS], seed=0)
    logits = random_logits(6, seed=5)
    requests = [
        make_request(request_id=f"r{i}", temperature=0.0 if i % 2 else 1.5) for i in range(6)
    ]
    got = [out.token_id for out in sampler(logits, requests)]
    assert got[1::2] == logits[1::2].argmax(dim=-1).tolist()


# -- seeds -----------------------------------------------------------------------------------------


def step_logits(request_id: str, step: int) -> torch.Tensor:
    """The logits a fake model gives one request at one step, whatever the batch holds."""
    seed = (sum(map(ord, request_id)) * 1000 + step) % (2**31)
    return random_logits(1, vocab=VOCAB, seed=seed, scale=1.5)[0]


def run_steps(requests: list[Request], steps: int, sampler: Sampler) -> dict[str, list[int]]:
    for step in range(steps):
        logits = torch.stack([step_logits(r.request_id, step) for r in requests])
        for request, out in zip(requests, sampler(logits, requests)):
            request.output_token_ids.append(out.token_id)
    return {r.request_id: r.output_token_ids for r in requests}


def others(seed: int) -> list[Request]:
    """Eight requests of every kind, to surround the one under test."""
    kinds = [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"top_p": 0.5, "seed": 99},
        {"min_p": 0.2, "temperature": 2.0},
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "seed": 7},
        {"min_tokens": 3, "presence_penalty": 1.0},
        {"temperature": 1.2, "top_k": 3, "top_p": 0.9},
    ]
    return [make_request(request_id=f"other{seed}-{i}", **k) for i, k in enumerate(kinds)]


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0},
        {"temperature": 0.8, "top_k": 10, "top_p": 0.9},
        {"min_p": 0.05, "repetition_penalty": 1.2},
    ],
)
def test_seeded_request_draws_the_same_tokens_alone_and_in_any_batch(params):
    alone = make_request(request_id="me", seed=1234, **params)
    alone_tokens = run_steps([alone], 6, Sampler(VOCAB, [EOS], seed=1))["me"]
    for batch_seed in range(2):
        me = make_request(request_id="me", seed=1234, **params)
        batch = others(batch_seed)
        batch.insert(3 + batch_seed, me)
        assert (
            run_steps(batch, 6, Sampler(VOCAB, [EOS], seed=50 + batch_seed))["me"] == alone_tokens
        )


def test_different_seeds_draw_different_tokens():
    runs = [
        run_steps([make_request(request_id="me", seed=s, temperature=1.5)], 12, Sampler(VOCAB))[
            "me"
        ]
        for s in (1, 2, 3)
    ]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def test_n_completions_of_one_seeded_prompt_differ_by_seq_index():
    params = SamplingParams(seed=5, temperature=1.5)
    requests = [Request(f"r{i}", [1, 2], params, seq_index=i) for i in range(3)]
    outs = run_steps(requests, 10, Sampler(VOCAB))
    assert len({tuple(v) for v in outs.values()}) == 3


# -- the draw itself: frequencies against the reference --------------------------------------------


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty approximation)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def chi_square(counts: Counter, probs: list[float], draws: int) -> tuple[float, int]:
    """Pearson's statistic over tokens with probability > 0, and the degrees of freedom."""
    support = [i for i, p in enumerate(probs) if p > 0]
    stat = sum((counts.get(i, 0) - draws * probs[i]) ** 2 / (draws * probs[i]) for i in support)
    return stat, len(support) - 1


@pytest.mark.parametrize(
    "params,seeded",
    [
        ({"temperature": 1.0}, False),
        ({"temperature": 0.7, "top_k": 12}, False),
        ({"temperature": 1.0, "top_p": 0.8}, True),
        ({"temperature": 1.5, "min_p": 0.1}, True),
        (
            {"temperature": 1.0, "top_k": 8},
            True,
        ),  # run with a larger vocabulary: the candidate path
    ],
)
def test_draw_frequencies_match_reference_distribution(params, seeded):
    vocab = 16 if params.get("top_k") != 8 else 2000
    logits_row = random_logits(1, vocab=vocab, seed=6, scale=1.0)[0]
    draws = 20000 if not seeded else 4000
    requests = [
        make_request(request_id=f"r{i}", seed=i if seeded else None, **params) for i in range(draws)
    ]
    tokens = Sampler(vocab, seed=123)(logits_row.expand(draws, vocab).contiguous(), requests)
    counts = Counter(out.token_id for out in tokens)
    probs = reference_distribution(logits_row.tolist(), requests[0])
    assert all(probs[t] > 0 for t in counts), "drew a token the filters remove"
    stat, dof = chi_square(counts, probs, draws)
    assert dof >= 2, probs  # the case must leave a real choice
    assert stat < chi2_critical(dof), (stat, dof)


# -- min_tokens, EOS, stop tokens ------------------------------------------------------------------


def eos_loving_logits(n: int) -> torch.Tensor:
    logits = random_logits(n, seed=8)
    logits[:, EOS] = 50.0
    logits[:, 20] = 49.0  # a stop token id, next most likely
    return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_tokens_until_reached(temperature):
    sampler = Sampler(VOCAB, [EOS], seed=0)
    for produced in range(4):
        request = make_request(
            output=[30] * produced, min_tokens=3, stop_token_ids=[20], temperature=temperature
        )
        token = sampler(eos_loving_logits(1), [request])[0].token_id
        if produced < 3:
            assert token not in (EOS, 20)
        elif temperature == 0.0:
            assert token == EOS


def test_ignore_eos_leaves_eos_unmasked_but_still_masks_stop_tokens():
    sampler = Sampler(VOCAB, [EOS])
    request = make_request(min_tokens=5, ignore_eos=True, stop_token_ids=[20], temperature=0.0)
    assert sampler(eos_loving_logits(1), [request])[0].token_id == EOS
    logits = eos_loving_logits(1)
    logits[0, EOS] = -50.0
    assert sampler(logits, [request])[0].token_id != 20


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_top_n():
    sampler = Sampler(VOCAB, [EOS], seed=0)
    logits = random_logits(4, seed=9)
    requests = [
        make_request(request_id="a", logprobs=5, temperature=0.0),
        make_request(
            request_id="b",
            logprobs=3,
            temperature=0.4,
            top_k=4,
            repetition_penalty=1.5,
            output=[1, 2],
        ),  # penalties don't change logprobs
        make_request(request_id="c", logprobs=0),
        make_request(request_id="d"),
    ]
    outs = sampler(logits, requests)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, (request, out) in enumerate(zip(requests, outs)):
        n = request.params.logprobs
        if n is None:
            assert math.isnan(out.logprob) and out.top == []
            continue
        assert out.logprob == pytest.approx(reference[i, out.token_id].item(), abs=1e-5)
        values, ids = reference[i].topk(n) if n else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in out.top] == ids.tolist()
        assert [v for _, v in out.top] == pytest.approx(values.tolist(), abs=1e-5)


# -- properties ------------------------------------------------------------------------------------

filter_params = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.3, 1.0, 2.5]),
        "top_k": st.integers(0, 40),
        "top_p": st.sampled_from([1.0, 0.95, 0.7, 0.3, 0.05]),
        "min_p": st.sampled_from([0.0, 0.01, 0.2, 0.9]),
        "repetition_penalty": st.sampled_from([1.0, 1.4]),
        "presence_penalty": st.sampled_from([0.0, 1.0]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=filter_params,
    logits_seed=st.integers(0, 2**20),
    scale=st.sampled_from([0.5, 3, 20]),
    draw_seed=st.integers(0, 2**20),
)
def test_never_draws_a_token_the_reference_gives_zero_probability(
    params, logits_seed, scale, draw_seed
):
    vocab = 32
    logits = random_logits(4, vocab=vocab, seed=logits_seed, scale=scale)
    requests = [
        make_request(
            prompt=[0, 1],
            output=[2, 2, 5],
            request_id=f"r{i}",
            seed=draw_seed + i if i % 2 else None,
            **params,
        )
        for i in range(4)
    ]
    sampler = Sampler(vocab, [EOS], seed=draw_seed)
    for i, out in enumerate(sampler(logits, requests)):
        allowed = reference_distribution(logits[i].tolist(), requests[i], slack=1e-5)
        assert allowed[out.token_id] > 0, (params, out.token_id)


@settings(max_examples=40, deadline=None)
@given(
    logits_seed=st.integers(0, 2**20),
    temperature=st.sampled_from([0.1, 1.0, 3.0]),
    top_p=st.sampled_from([1.0, 0.5]),
    draw_seed=st.integers(0, 2**20),
)
def test_top_k_one_equals_greedy(logits_seed, temperature, top_p, draw_seed):
    logits = random_logits(5, seed=logits_seed)
    sampled = Sampler(VOCAB, seed=draw_seed)(
        logits,
        [
            make_request(request_id=f"r{i}", top_k=1, temperature=temperature, top_p=top_p)
            for i in range(5)
        ],
    )
    greedy = Sampler(VOCAB)(
        logits, [make_request(request_id=f"g{i}", temperature=0.0) for i in range(5)]
    )
    assert [o.token_id for o in sampled] == [o.token_id for o in greedy]


def test_sampler_rejects_logits_that_do_not_match_the_requests():
    with pytest.raises(ValueError, match="logits must be"):
        Sampler(VOCAB)(random_logits(2), [make_request()])
    assert Sampler(VOCAB)(torch.empty(0, VOCAB), []) == []
