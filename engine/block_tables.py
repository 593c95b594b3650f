"""Every live request's KV block ids, kept in one persistent table for the runner."""

from __future__ import annotations

import numpy as np

from engine.request import Request


class BlockTables:
    """Every live request's block ids in one persistent numpy table, a row per request.

    A request's row is extended only by the blocks added since the last step, and rebuilt when its
    block list was replaced (freed, preempted, re-admitted with cached blocks). Rows of requests
    that were not in the latest step are reclaimed when the table runs out of rows.
    """

    def __init__(self, max_seqs: int, max_blocks: int) -> None:
        self.capacity = 2 * max_seqs + 16
        self.table = np.zeros((self.capacity, max_blocks), dtype=np.int32)
        # id(request) -> [request, its block list object, blocks copied, row, last step used]
        self._state: dict[int, list] = {}
        self._free_rows = list(range(self.capacity - 1, -1, -1))
        self._step = 0

    def rows(self, requests: list[Request]) -> tuple[np.ndarray, int]:
        """Rows of the requests' tables, and the widest table among them (in blocks)."""
        self._step += 1
        step = self._step
        out = np.empty(len(requests), dtype=np.int64)
        width = 1
        state, table = self._state, self.table
        for i, r in enumerate(requests):
            blocks = r.block_ids
            st = state.get(id(r))
            if st is None:
                st = [r, blocks, 0, self._take_row(), step]
                state[id(r)] = st
            elif st[1] is not blocks or len(blocks) < st[2]:
                st[1], st[2] = blocks, 0
            n = len(blocks)
            if n > st[2]:
                table[st[3], st[2]:n] = blocks[st[2]:]
                st[2] = n
            st[4] = step
            out[i] = st[3]
            width = max(width, n)
        return out, width

    def _take_row(self) -> int:
        if not self._free_rows:
            stale = [k for k, st in self._state.items() if st[4] != self._step]
            for k in stale:
                self._free_rows.append(self._state.pop(k)[3])
        return self._free_rows.pop()
