"""A first-in first-out queue of page numbers kept as the NumPy arrays they came in.

Services queue whole PageLists (a batch's moved pages, a scan's finds) and pop a batch's
worth later. A Python list of ints cost a ``tolist()`` per push and an ``np.array`` of a list
per pop: for remap validation after a 2M promotion (2,048 pages a batch) that was 0.26 ms of
the round's 1 ms per batch pair (``benchmarks/hugepages.py``, 2026-12-03). Here a push keeps
the array (a copy: the caller's array may be a view it reuses) and a pop concatenates at most
the chunks it spans: no per-page Python either way.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

Pages = npt.NDArray[np.int64]


class PageFifo:
    """Page numbers in the order they were pushed; the oldest go first, and beyond
    ``capacity`` the oldest are dropped."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._chunks: deque[Pages] = deque()
        self._head = 0  # entries of the first chunk already popped
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, pages: npt.ArrayLike) -> int:
        """Append ``pages``; returns how many of the oldest were dropped for room."""
        chunk = np.array(pages, dtype=np.int64).reshape(-1)  # a copy, always
        if len(chunk) == 0:
            return 0
        self._chunks.append(chunk)
        self._len += len(chunk)
        over = self._len - self.capacity
        if over > 0:
            self._drop(over)
        return max(0, over)

    def pop(self, n: int) -> Pages:
        """The ``n`` oldest pages (fewer if fewer are queued), removed."""
        n = min(max(n, 0), self._len)
        parts: list[Pages] = []
        left = n
        while left:
            first = self._chunks[0]
            take = min(left, len(first) - self._head)
            parts.append(first[self._head : self._head + take])
            self._advance(take)
            left -= take
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def to_array(self) -> Pages:
        """Every queued page, oldest first (a copy; for status and tests)."""
        if not self._chunks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([self._chunks[0][self._head :], *list(self._chunks)[1:]])

    def _drop(self, n: int) -> None:
        while n:
            take = min(n, len(self._chunks[0]) - self._head)
            self._advance(take)
            n -= take

    def _advance(self, n: int) -> None:
        """``n`` entries of the first chunk leave the queue."""
        self._head += n
        self._len -= n
        if self._head == len(self._chunks[0]):
            self._chunks.popleft()
            self._head = 0
