"""The KV cache manager's bookkeeping: reference counts, prefix sharing, LRU reuse, no leaks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.kv_cache import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def make_request(tokens: list[int], rid: str = "r") -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, req: Request) -> bool:
    cached = kv.find_cached_prefix(req)
    n = req.num_tokens - len(cached) * BS
    if not kv.allocate(req, n, cached):
        return False
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return True


def test_shared_prefix_reuses_blocks_and_skips_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request(list(range(10)), "a")  # blocks: [0..3] [4..7] [8, 9]
    assert admit(kv, a)
    b = make_request(list(range(8)) + [99, 98, 97], "b")
    cached = kv.find_cached_prefix(b)
    assert cached == a.block_ids[:2]
    assert kv.allocate(b, b.num_tokens - 2 * BS, cached)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert kv.blocks[a.block_ids[0]].ref_count == 2
    kv.check_invariants([a, b])


def test_whole_prompt_cached_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request(list(range(8)), "a")
    assert admit(kv, a)
    b = make_request(list(range(8)), "b")
    # Both blocks are cached, but the last token must run to produce logits: only block 0 is taken.
    assert kv.find_cached_prefix(b) == a.block_ids[:1]


def test_freed_blocks_stay_cached_until_reused_least_recent_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request(list(range(9)), "a")
    assert admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    again = make_request(list(range(8)) + [5], "again")
    assert len(kv.find_cached_prefix(again)) == 2  # still there after free
    # The never-used block goes first, then a's tail (freed first), and a's head survives longest.
    other = make_request([50 + i for i in range(3 * BS)], "other")
    assert kv.allocate(other, other.num_tokens)
    assert len(kv.find_cached_prefix(again)) == 1


def test_allocation_fails_cleanly_when_pool_is_exhausted():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request(list(range(12)), "a")
    assert not kv.allocate(a, 12)
    assert a.block_ids == [] and kv.num_free_blocks == 2


def test_double_free_is_detected():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request([1, 2, 3], "a")
    assert kv.allocate(a, 3)
    ids = list(a.block_ids)
    kv.free(a)
    a.block_ids = ids
    try:
        kv.free(a)
    except RuntimeError as e:
        assert "double free" in str(e)
    else:
        raise AssertionError("double free went unnoticed")


class KVMachine(RuleBasedStateMachine):
    """Random admissions, growth, frees and cache resets; the books must always balance."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BS)
        self.live: list[Request] = []
        self.count = 0

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def add(self, tokens: list[int]) -> None:
        # A tiny alphabet makes shared prefixes common.
        self.count += 1
        req = make_request(tokens, f"r{self.count}")
        if admit(self.kv, req):
            self.live.append(req)
        else:
            assert req.block_ids == []

    @precondition(lambda self: self.live)
    @rule(data=st.data(), grow=st.integers(1, 6))
    def decode(self, data: st.DataObject, grow: int) -> None:
        req = data.draw(st.sampled_from(self.live))
        if self.kv.allocate(req, grow):
            req.output_token_ids.extend([1] * grow)
            req.num_computed_tokens = req.num_tokens
            self.kv.cache_full_blocks(req)
            assert len(req.block_ids) == self.kv.blocks_needed(req.num_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        self.kv.free(req)

    @rule()
    def reset(self) -> None:
        self.kv.reset_prefix_cache()

    @invariant()
    def books_balance(self) -> None:
        self.kv.check_invariants(self.live)
        held = {b for r in self.live for b in r.block_ids}
        assert self.kv.num_free_blocks + len(held) == self.kv.num_blocks

    @invariant()
    def shared_blocks_hold_the_same_tokens(self) -> None:
        seen: dict[int, tuple[int, ...]] = {}
        for r in self.live:
            toks = r.all_token_ids
            for i, b in enumerate(r.block_ids):
                content = tuple(toks[i * BS:(i + 1) * BS])
                if b in seen and len(content) == BS and len(seen[b]) == BS:
                    assert seen[b] == content, "two requests share a block with different tokens"
                seen.setdefault(b, content)

    def teardown(self) -> None:
        for r in self.live:
            self.kv.free(r)
        assert self.kv.num_free_blocks == self.kv.num_blocks  # nothing leaked


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=100, deadline=None)
@given(prefix=st.lists(st.integers(0, 50), min_size=BS, max_size=4 * BS),
       tails=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), min_size=2, max_size=5))
def test_common_prefix_is_computed_once(prefix: list[int], tails: list[list[int]]):
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    reqs = [make_request(prefix + t, f"r{i}") for i, t in enumerate(tails)]
    assert admit(kv, reqs[0])
    full = len(prefix) // BS
    for r in reqs[1:]:
        cached = kv.find_cached_prefix(r)
        assert len(cached) >= min(full, (r.num_tokens - 1) // BS)
        # Every hit block holds exactly this request's tokens at that place.
        for i, b in enumerate(cached):
            assert any(len(o.block_ids) > i and o.block_ids[i] == b
                       and o.all_token_ids[i * BS:(i + 1) * BS] == r.all_token_ids[i * BS:(i + 1) * BS]
                       for o in reqs if o.block_ids)
        assert kv.allocate(r, r.num_tokens - len(cached) * BS, cached)
        r.num_computed_tokens = r.num_tokens
        kv.cache_full_blocks(r)
    kv.check_invariants(reqs)
    for r in reqs:
        kv.free(r)
    assert kv.num_free_blocks == 64
