"""Scheduling without a model: budgets, caps, chunked prefill, priorities, preemption, no deadlock."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

BS = 4


def req(rid: str, prompt_len: int, max_tokens: int, priority: int = 0, t: float = 0.0) -> Request:
    return Request(request_id=rid, prompt_token_ids=[(i * 7 + len(rid)) % 97 for i in range(prompt_len)],
                   params=SamplingParams(max_tokens=max_tokens), priority=priority, arrival_time=t)


def run_to_completion(sched: Scheduler, max_steps: int = 10_000):
    """Drives the scheduler like the engine does, appending a token whenever a request reaches the
    end of its tokens. Yields each step's batch."""
    for _ in range(max_steps):
        if not sched.has_work():
            return
        batch = sched.schedule()
        assert batch.requests, "scheduler made no progress with work pending (deadlock)"
        samplers = [r for r, n in zip(batch.requests, batch.num_tokens)
                    if r.num_computed_tokens + n == r.num_tokens]
        sched.after_step(batch)
        yield batch
        for r in samplers:
            r.output_token_ids.append(1)
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.remove(r)
                r.status = RequestStatus.FINISHED
    raise AssertionError("did not finish")


def test_budget_and_sequence_cap_hold_every_step():
    kv = KVCacheManager(256, BS)
    s = Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(6):
        s.add(req(f"r{i}", 7, 5, t=i))
    for batch in run_to_completion(s):
        assert batch.total_tokens <= 10
        assert len(batch) <= 3
        assert len(s.running) <= 3
    assert kv.num_free_blocks == 256


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes():
    kv = KVCacheManager(256, BS, enable_prefix_caching=False)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=8)
    short = req("short", 3, 10, t=0)
    s.add(short)
    s.after_step(s.schedule())  # short's prefill
    short.output_token_ids.append(1)
    long = req("long", 30, 2, t=1)
    s.add(long)
    chunks = []
    for batch in run_to_completion(s):
        if long in batch.requests:
            n = batch.num_tokens[batch.requests.index(long)]
            chunks.append(n)
            if short in batch.requests:  # a decode and a prefill chunk in the same step
                assert batch.num_tokens[batch.requests.index(short)] == 1
    # 30 prompt tokens in chunks of at most 8 (7 while short decodes), then decode tokens.
    assert sum(chunks) == 30 + 1
    assert max(chunks) <= 8 and len(chunks) >= 5


def test_lower_priority_number_is_admitted_first():
    kv = KVCacheManager(256, BS)
    s = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    s.add(req("bulk", 4, 2, priority=5, t=0))
    s.add(req("urgent", 4, 2, priority=0, t=1))
    first = s.schedule()
    assert [r.request_id for r in first.requests] == ["urgent"]


def test_preemption_frees_the_newest_lowest_priority_and_everything_finishes():
    kv = KVCacheManager(10, BS)  # 40 token slots
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [req(f"r{i}", 6, 12, priority=(1 if i == 0 else 0), t=i) for i in range(4)]
    for r in reqs:
        s.add(r)
    preempted = []
    for batch in run_to_completion(s):
        preempted += batch.preempted
        kv.check_invariants(s.running)
    assert preempted, "the pool was too small for all four; something must have been preempted"
    # The request of the lowest priority (highest number) is the first victim.
    assert preempted[0].request_id == "r0"
    assert all(len(r.output_token_ids) == 12 for r in reqs)
    assert kv.num_free_blocks == 10


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 10), st.integers(0, 2)),
                      min_size=1, max_size=12),
       num_blocks=st.integers(8, 24), budget=st.integers(1, 32), max_seqs=st.integers(1, 6),
       caching=st.booleans(), priority_yield=st.sampled_from([None, 0.25, 1.0]))
def test_random_workloads_always_finish_without_leaks(specs, num_blocks, budget, max_seqs, caching, priority_yield):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching)
    s = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, priority_yield=priority_yield)
    counter = itertools.count()
    reqs = []
    for p, m, prio in specs:
        if kv.blocks_needed(p + m) > num_blocks:
            continue  # the engine rejects such a request up front
        r = req(f"r{next(counter)}", p, m, prio, t=len(reqs))
        reqs.append(r)
        s.add(r)
    for batch in run_to_completion(s):
        assert batch.total_tokens <= budget
        assert len(s.running) <= max_seqs
        kv.check_invariants(s.running)
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert kv.num_free_blocks == num_blocks


def _tenant_req(rid: str, tenant: str, weight: float, t: float, priority: int = 9) -> Request:
    r = req(rid, 4, 4, priority=priority, t=t)
    r.tenant, r.weight = tenant, weight
    return r


def test_tenants_share_the_engine_by_weight_not_by_arrival():
    # A queues 40 requests first; B (weight 3) arrives later with 40 of the same size. B is served
    # three for every one of A's from then on, instead of waiting behind all of A's backlog.
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(40):
        s.add(_tenant_req(f"a{i}", "A", 1.0, t=i))
    order: list[str] = []
    steps = run_to_completion(s)
    for _ in range(3):
        batch = next(steps)
        order += [r.request_id for r in batch.requests if r.num_computed_tokens == r.num_tokens
                  and not r.output_token_ids]
    for i in range(40):
        s.add(_tenant_req(f"b{i}", "B", 3.0, t=100 + i))
    admitted: list[str] = []
    for batch in steps:
        admitted += [r.request_id for r in batch.requests if not r.output_token_ids
                     and r.request_id not in admitted]
    window = admitted[:40]
    b_share = sum(1 for rid in window if rid.startswith("b")) / len(window)
    assert 0.65 <= b_share <= 0.85, window  # 3/4 by weight
    assert kv.num_free_blocks == 1024


def test_interactive_still_goes_before_another_tenants_bulk():
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(10):
        s.add(_tenant_req(f"a{i}", "A", 1.0, t=i))
    s.add(_tenant_req("b-interactive", "B", 1.0, t=50, priority=0))
    first = s.schedule()
    assert first.requests[0].request_id == "b-interactive"


def test_preemption_takes_the_tenant_most_ahead_of_its_share():
    s = Scheduler(KVCacheManager(1024, BS), max_num_seqs=8, max_num_batched_tokens=64)
    a = [_tenant_req(f"a{i}", "A", 1.0, t=i) for i in range(3)]
    b = _tenant_req("b0", "B", 1.0, t=10)
    for r in [*a, b]:
        s.add(r)
    s.schedule()
    # A's third request starts furthest ahead in virtual time (A already had two before it).
    assert s._pick_victim(exclude=set()) is a[2]


def test_a_better_priority_takes_the_place_of_running_bulk_at_the_sequence_cap():
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=64)
    bulk = [req(f"bulk{i}", 4, 20, priority=1000, t=i) for i in range(3)]
    for r in bulk:
        s.add(r)
    s.after_step(s.schedule())  # the three bulk requests fill the sequence slots
    for r in bulk:
        r.output_token_ids.append(1)
    urgent = req("urgent", 4, 2, priority=0, t=10)
    s.add(urgent)
    batch = s.schedule()
    # The newest bulk request gives its place (and leaves this step's batch); the others decode.
    assert urgent in batch.requests
    assert batch.preempted == [bulk[2]] and bulk[2] not in batch.requests
    assert bulk[2].status is RequestStatus.WAITING and bulk[2].num_computed_tokens == 0
    assert len(s.running) == 3 and batch.total_tokens == 2 + 4
    s.after_step(batch)
    kv.check_invariants(s.running)


def test_a_better_priority_takes_the_blocks_of_running_bulk():
    kv = KVCacheManager(6, BS, enable_prefix_caching=False)  # 24 token slots
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    bulk = [req(f"bulk{i}", 8, 20, priority=1000, t=i) for i in range(3)]  # two blocks each
    for r in bulk:
        s.add(r)
    s.after_step(s.schedule())
    assert kv.num_free_blocks == 0
    urgent = req("urgent", 6, 2, priority=0, t=10)
    s.add(urgent)
    for r in bulk:
        r.output_token_ids.append(1)
    batch = s.schedule()
    assert urgent in batch.requests
    # Room for urgent's prompt and the survivors' decode blocks: the two newest bulk ones went.
    assert [r.request_id for r in batch.preempted] == ["bulk2", "bulk1"]
    kv.check_invariants(s.running)


def test_equal_priorities_never_displace_each_other():
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(2):
        s.add(req(f"old{i}", 4, 20, priority=1000, t=i))
    s.after_step(s.schedule())
    for r in s.running:
        r.output_token_ids.append(1)
    s.add(req("new", 4, 20, priority=1000, t=5))
    batch = s.schedule()
    assert not batch.preempted and [r.request_id for r in batch.requests] == ["old0", "old1"]


def test_interactive_of_one_tenant_displaces_the_bulk_of_the_tenant_most_ahead():
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    # A's three bulk requests started first: A is ahead in virtual time of B's one.
    for r in [*(_tenant_req(f"a{i}", "A", 1.0, t=i, priority=1000) for i in range(3)),
              _tenant_req("b0", "B", 1.0, t=5, priority=1000)]:
        s.add(r)
    s.after_step(s.schedule())
    s.add(_tenant_req("b-interactive", "B", 1.0, t=10, priority=0))
    batch = s.schedule()
    assert [r.request_id for r in batch.preempted] == ["a2"]
    assert "b-interactive" in [r.request_id for r in batch.requests]


def test_bulk_yields_the_step_to_interactive_work_but_keeps_moving():
    kv = KVCacheManager(1024, BS)
    s = Scheduler(kv, max_num_seqs=64, max_num_batched_tokens=512, priority_yield=1.0)
    bulk = [req(f"bulk{i}", 4, 50, priority=1000, t=i) for i in range(20)]
    for r in bulk:
        s.add(r)
    s.after_step(s.schedule())
    for r in bulk:
        r.output_token_ids.append(1)
    urgent = [req(f"urgent{i}", 4, 3, priority=0, t=100 + i) for i in range(3)]
    for r in urgent:
        s.add(r)
    steps = run_to_completion(s)
    first = next(steps)  # bulk decodes (20 tokens), then the urgent prompts join (12 tokens)
    assert all(r in first.requests for r in urgent)
    while any(r.status is not RequestStatus.FINISHED for r in urgent):
        batch = next(steps)
        urgent_tokens = sum(n for r, n in zip(batch.requests, batch.num_tokens) if r.priority == 0)
        bulk_tokens = batch.total_tokens - urgent_tokens
        if urgent_tokens:
            # At most as many bulk tokens as interactive ones: 3 decodes, 3 bulk decodes.
            assert 1 <= bulk_tokens <= urgent_tokens, (urgent_tokens, bulk_tokens)
    later = next(steps)  # the interactive work is done: bulk has the whole step again
    assert len(later.requests) == 20
    for _ in steps:
        pass
    assert kv.num_free_blocks == 1024


def test_without_a_yield_bulk_keeps_the_whole_step():
    s = Scheduler(KVCacheManager(1024, BS), max_num_seqs=64, max_num_batched_tokens=512)
    bulk = [req(f"bulk{i}", 4, 50, priority=1000, t=i) for i in range(20)]
    for r in [*bulk, req("urgent", 4, 3, priority=0, t=100)]:
        s.add(r)
    batch = s.schedule()
    assert len(batch.requests) == 21
