"""The KV cache manager: a pool of fixed-size blocks handed to requests, with prefix caching.

Each block holds `block_size` consecutive tokens of one sequence. Blocks are reference counted: a
block shared by several requests (a common prefix) is freed only when the last one lets go. A block
that is full is hashed together with its parent's hash, so the hash names the whole prefix up to
and including that block; a later request whose prompt starts with the same tokens finds the blocks
by hash and skips computing them. A freed block keeps its contents and hash until it is reused, and
reuse takes the least recently freed block first, so popular prefixes survive.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.request import Request

BlockKey = tuple[int, tuple[int, ...]]  # (parent block's hash, the block's tokens)


@dataclass(eq=False)
class Block:
    """One block of the pool."""

    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and registered in the prefix cache

    @property
    def hash(self) -> int:
        return hash(self.key)


class KVCacheManager:
    """Allocates cache blocks to requests; the only owner of block reference counts."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with no reference, oldest first; cached ones among them can still be revived.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}
        # Per request: how many of its blocks are registered in the prefix cache.
        self._num_hashed: dict[int, int] = {}
        self.hits = 0  # prompt tokens served from the cache, for metrics

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (unreferenced, cached or not)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def _keys(self, token_ids: list[int], num_full_blocks: int, start: int = 0,
              parent_hash: int = 0) -> list[BlockKey]:
        keys = []
        bs = self.block_size
        for i in range(start, num_full_blocks):
            key = (parent_hash, tuple(token_ids[i * bs:(i + 1) * bs]))
            keys.append(key)
            parent_hash = hash(key)
        return keys

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids that already hold a prefix of the request's tokens.

        At least one token is always left to compute, since the model must run on the last token to
        produce the next one's logits.
        """
        if not self.enable_prefix_caching:
            return []
        token_ids = request.all_token_ids
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        for key in self._keys(token_ids, max_blocks):
            block_id = self._cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # -- changes -----------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Makes the request's blocks cover its computed tokens plus `num_new_tokens`.

        `cached_blocks` (from `find_cached_prefix`, for a request that has no blocks yet) are
        taken as its first blocks. Returns False and changes nothing when the pool is too small.
        """
        if not cached_blocks:
            # The common case (every decode step): the request only grows, often within its last block.
            need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
            if need <= 0:
                return True
            if need > len(self._free):
                return False
            request.block_ids.extend(self._take_free_block() for _ in range(need))
            return True
        if request.block_ids:
            raise RuntimeError(f"request {request.request_id} already has blocks")
        have = len(cached_blocks)
        covered = request.num_computed_tokens + len(cached_blocks) * self.block_size
        need = self.blocks_needed(covered + num_new_tokens) - have
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if max(need, 0) + revived > len(self._free):
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        request.block_ids = list(cached_blocks)
        self._num_hashed[id(request)] = len(cached_blocks)
        self.hits += len(cached_blocks) * self.block_size
        for _ in range(max(need, 0)):
            request.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's newly filled blocks in the prefix cache (after a step)."""
        if not self.enable_prefix_caching:
            return
        # A pending token (sampled, not yet read back) is computed but cannot be hashed yet: its
        # block is registered at a later step.
        known = min(request.num_computed_tokens, request.num_known_tokens)
        full = min(known // self.block_size, len(request.block_ids))
        done = self._num_hashed.get(id(request), 0)
        if full <= done:
            return
        parent = self.blocks[request.block_ids[done - 1]].hash if done else 0
        keys = self._keys(request.all_token_ids, full, start=done, parent_hash=parent)
        for block_id, key in zip(request.block_ids[done:full], keys):
            block = self.blocks[block_id]
            block.key = key
            # An identical block computed by another request stays the canonical one.
            self._cached.setdefault(key, block_id)
        self._num_hashed[id(request)] = full

    def free(self, request: Request) -> None:
        """Releases the request's blocks. The tail goes back first, so it is also reused first."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id} by {request.request_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None or self._cached.get(block.key) != block_id:
                    block.key = None
                self._free[block_id] = None
        request.block_ids = []
        self._num_hashed.pop(id(request), None)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use keep their contents)."""
        self._cached.clear()
        for block in self.blocks:
            block.key = None
        self._num_hashed.clear()

    def check_invariants(self, requests: list[Request]) -> None:
        """Asserts the pool's bookkeeping is consistent with the live requests (for tests)."""
        counts = [0] * self.num_blocks
        for r in requests:
            for b in r.block_ids:
                counts[b] += 1
        for block, expected in zip(self.blocks, counts):
            assert block.ref_count == expected, (block.block_id, block.ref_count, expected)
            assert (block.block_id in self._free) == (expected == 0), block.block_id
        for key, block_id in self._cached.items():
            assert self.blocks[block_id].key == key
