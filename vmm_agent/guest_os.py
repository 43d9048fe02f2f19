"""The guest operating system's view of its memory: free pool, page cache, anonymous pages,
and the pages its balloon driver holds.

Every guest page (BPN) is of one kind:

- FREE: in the guest's free pool: never used (or given back by the balloon: the platform
  backs it with nothing), or *once used*: freed by the workload (``free_anon``, a process
  exiting) or by the page cache, its old content still in its frame. The guest knows which
  of its free pages it once used (``used``); the host cannot tell a free page from a cold
  one;
- ANON: anonymous memory of the workload (the working set's pages); the guest never drops
  them, but a phase may free part of them when it ends (``Phase.anon_freed``);
- CACHE: the page cache, holding one file block; the guest may drop it (to reuse the page
  for another block, or to give it to the balloon), and a later read of that block is a
  *refault*: a simulated disk read;
- BALLOON: held by the balloon driver (``balloon.py``); the platform freed what backed it,
  and the guest neither reads nor writes it while it is there.

An anonymous access to a page that is not ANON first takes it for the workload (``claim``):
from the free pool, from the page cache (its block is dropped), or back from the balloon.
The balloon never takes ANON pages, so after the claim a vCPU can await a fault on its page
without the balloon taking it meanwhile.

This module is pure bookkeeping (no I/O, no awaits): the vCPUs (``vcpu.py``) do the faults
and the disk reads, the balloon driver the batches. Scalar reads of a page's kind go through
a bytearray (a few tens of ns, the vCPU's inner loop does one per access); vectorised ones
through a NumPy view of the same bytes.

The free pool (two stacks: once-used pages, never-used pages) and the balloon are stacks
with lazy deletion: a page leaves the pool or the balloon by changing kind, and its stack
entry is dropped when it comes up. A page is on each stack at most once (``_on_freed``,
``_on_free``, ``_on_balloon``), so an entry that comes up is valid iff the page is of that
kind now (and, on the pool's stacks, once used or not as that stack holds). The pool gives
once-used pages first (last freed, first given: as a guest's allocator hands out its
recently freed pages), then never-used ones.

The page cache evicts by recency, CLOCK-style, as Linux's active/inactive lists
approximate: every cache hit sets its block's referenced bit (``referenced``); eviction
walks the blocks oldest first, gives a referenced block a second chance (clears its bit and
moves it to the young end) and drops the first unreferenced one. A block read in is
unreferenced until it is hit again, so a block read once goes before one read often.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

FREE, ANON, CACHE, BALLOON = 0, 1, 2, 3
KIND_NAMES = ("free", "anon", "cache", "balloon")
_NONE = np.empty(0, dtype=np.int64)


class GuestOS:
    """Kinds of every guest page, the page cache's block map, the free pool and the balloon."""

    def __init__(self, guest_pages: int) -> None:
        self.guest_pages = guest_pages
        #: One byte per BPN: its kind. ``kind`` is a NumPy view of the same memory.
        self.kind_bytes = bytearray(guest_pages)  # all FREE
        self.kind: npt.NDArray[np.uint8] = np.frombuffer(self.kind_bytes, dtype=np.uint8)
        self.counts = [guest_pages, 0, 0, 0]  # pages of each kind
        # Page cache: block -> page and page -> block (-1: none); blocks are < guest_pages.
        self.block_page = np.full(guest_pages, -1, dtype=np.int64)
        self.page_block = np.full(guest_pages, -1, dtype=np.int64)
        #: Per block: hit since it was read in or last given a second chance (CLOCK).
        #: The vCPUs set it on every cache hit (a bytearray: scalar writes are cheap).
        self.referenced = bytearray(guest_pages)
        self._fill_stamp = np.zeros(guest_pages, dtype=np.int64)  # per block
        self._stamps = 0
        # (stamp, block), oldest first: the CLOCK's order (a second chance re-stamps).
        self._fifo: deque[tuple[int, int]] = deque()
        #: Pages the page cache may hold now (the running phase's ``cache``).
        self.cache_limit = 0
        #: Per page: the guest wrote it since it was last given to the balloon (or since
        #: boot). A FREE page that is ``used`` still has a frame behind it (a ballooned one
        #: does not): it is what the balloon takes first, and what the guest clears (writes)
        #: before it uses it again.
        self.used = np.zeros(guest_pages, dtype=bool)
        # The free pool: never-used pages popped from the end, so the highest BPNs go first
        # (anonymous working sets usually start low); once-used pages before them.
        self._free: list[int] = list(range(guest_pages))
        self._on_free = np.ones(guest_pages, dtype=bool)
        self._freed: list[int] = []
        self._on_freed = np.zeros(guest_pages, dtype=bool)
        self._balloon: list[int] = []
        self._on_balloon = np.zeros(guest_pages, dtype=bool)
        #: Blocks being read from disk now (a vCPU waits for another's read of the same block).
        self.reading: dict[int, Any] = {}
        self.refaults = 0
        self.cache_hits = 0
        #: Cache reads that found no page to cache the block in (everything anonymous,
        #: ballooned or pinned): read from disk each time.
        self.uncached_reads = 0
        #: Blocks the guest dropped to make room for another (not counting the balloon's).
        self.cache_evictions = 0
        #: vCPU-seconds spent waiting for refaults' disk reads.
        self.refault_seconds = 0.0
        #: Pages an anonymous access took back from the balloon (the platform sees a first
        #: touch), and from the page cache.
        self.balloon_returns = 0
        self.cache_claims = 0
        #: vCPU accesses to a page that was in the balloon at the moment of the access. The
        #: take-back makes this impossible; it is counted to prove it stays 0.
        self.balloon_touches = 0
        #: Anonymous pages freed by phases that ended (``free_anon``); once-used free pages
        #: the workload took again (each written before it is read: ``vcpu.py``).
        self.anon_freed = 0
        self.reused = 0

    # ---- kinds ----------------------------------------------------------------------------

    def _set(self, page: int, kind: int) -> None:
        self.counts[self.kind_bytes[page]] -= 1
        self.counts[kind] += 1
        self.kind_bytes[page] = kind
        if kind in (ANON, CACHE):
            self.used[page] = True
        elif kind == BALLOON:
            self.used[page] = False  # the platform frees what backs it

    @property
    def balloon_size(self) -> int:
        return self.counts[BALLOON]

    def sizes(self) -> dict[str, int]:
        return dict(zip(KIND_NAMES, self.counts, strict=True))

    # ---- anonymous memory -----------------------------------------------------------------

    def claim(self, page: int) -> None:
        """An anonymous access to ``page``: take it for the workload, whatever holds it."""
        kind = self.kind_bytes[page]
        if kind == ANON:
            return
        if kind == BALLOON:
            # Back from the balloon: the platform freed it, the next touch is a first touch.
            self.balloon_returns += 1
        elif kind == FREE and self.used[page]:
            self.reused += 1
        elif kind == CACHE:
            self._drop_block(page)
            self.cache_claims += 1
        self._set(page, ANON)

    def claim_many(self, pages: npt.NDArray[np.int64]) -> None:
        """``claim`` for each page (few pages: a pinner's, not the whole memory)."""
        for page in pages[self.kind[pages] != ANON].tolist():
            self.claim(page)

    def free_anon(self, pages: npt.NDArray[np.int64]) -> int:
        """The workload frees these pages (those still ANON): back to the free pool, once
        used (their frames keep their content: the platform is not told). How many."""
        freed = 0
        for page in pages[self.kind[pages] == ANON].tolist():
            self._set(page, FREE)
            self._push_free(page)
            freed += 1
        self.anon_freed += freed
        return freed

    # ---- the page cache -------------------------------------------------------------------

    def _drop_block(self, page: int) -> None:
        block = int(self.page_block[page])
        self.block_page[block] = -1
        self.page_block[page] = -1

    def cached_page(self, block: int) -> int:
        """The page holding ``block``, or -1."""
        return int(self.block_page[block])

    def cache_page_for(self, block: int, unavailable: Callable[[int], bool]) -> int:
        """A page to read ``block`` into (now of kind CACHE, mapped to the block), or -1.

        From the free pool while the cache is below its size; otherwise (or with the pool
        empty) the CLOCK's first unreferenced block is dropped and its page reused.
        ``unavailable`` pages (pinned, a fault in flight) are left where they are. A block
        already cached keeps its page."""
        if self.block_page[block] >= 0:
            return int(self.block_page[block])
        free = self._pop_free(unavailable) if self.counts[CACHE] < self.cache_limit else []
        page = free[0] if free else -1
        if page < 0:
            page = self._evict(unavailable)
            if page < 0:
                return -1
            self.cache_evictions += 1
        else:
            self._set(page, CACHE)
        self.block_page[block] = page
        self.page_block[page] = block
        self.referenced[block] = 0  # read once: the first to go, unless it is hit again
        self._young(block)
        if len(self._fifo) > 2 * self.guest_pages + 1024:
            self._compact_fifo()
        return page

    def _young(self, block: int) -> None:
        """Put ``block`` at the young end of the CLOCK (its older entry goes stale)."""
        self._stamps += 1
        self._fill_stamp[block] = self._stamps
        self._fifo.append((self._stamps, block))

    def _compact_fifo(self) -> None:
        """Drop stale FIFO entries (blocks dropped by claims or the balloon, refilled since),
        keeping the order: the FIFO stays within a few times the cache's size."""
        self._fifo = deque(
            (stamp, block)
            for stamp, block in self._fifo
            if self.block_page[block] >= 0 and self._fill_stamp[block] == stamp
        )

    def drop_block(self, block: int) -> None:
        """Forget that ``block`` is cached (its read failed): its page goes back to the pool."""
        page = int(self.block_page[block])
        if page >= 0:
            self._drop_block(page)
            self._set(page, FREE)
            self._push_free(page)

    def _clock(self, n: int, unavailable: Callable[[int], bool]) -> list[int]:
        """Drop up to ``n`` cached blocks, coldest first; their pages (still CACHE).

        Oldest first; a referenced block gets a second chance (its bit cleared, moved to
        the young end), an ``unavailable`` page is passed over where it is. Each block comes
        up at most twice (its bit is clear after the first time), so this ends."""
        fifo, referenced = self._fifo, self.referenced
        skipped: list[tuple[int, int]] = []
        pages: list[int] = []
        while fifo and len(pages) < n:
            entry = fifo.popleft()
            stamp, block = entry
            page = int(self.block_page[block])
            if page < 0 or self._fill_stamp[block] != stamp:
                continue  # stale: dropped (claim, balloon) or moved since
            if unavailable(page):
                skipped.append(entry)
            elif referenced[block]:
                referenced[block] = 0
                self._young(block)
            else:
                self._drop_block(page)
                pages.append(page)
        fifo.extendleft(reversed(skipped))
        return pages

    def _evict(self, unavailable: Callable[[int], bool]) -> int:
        """Drop the coldest cached block whose page is available; its page, still CACHE."""
        pages = self._clock(1, unavailable)
        return pages[0] if pages else -1

    # ---- the free pool --------------------------------------------------------------------

    def _push_free(self, page: int) -> None:
        """Onto the pool's stack for its kind of free page: once used or never used."""
        stack, on = (
            (self._freed, self._on_freed) if self.used[page] else (self._free, self._on_free)
        )
        if not on[page]:
            on[page] = True
            stack.append(page)

    def _pop_free(self, unavailable: Callable[[int], bool], n: int = 1) -> list[int]:
        """Up to ``n`` available FREE pages, once-used ones first, taken off the pool
        (still FREE)."""
        pages = self._pop_stack(self._freed, self._on_freed, True, unavailable, n)
        if len(pages) < n:
            pages += self._pop_stack(self._free, self._on_free, False, unavailable, n - len(pages))
        return pages

    def _pop_stack(
        self,
        stack: list[int],
        on: npt.NDArray[np.bool_],
        used: bool,
        unavailable: Callable[[int], bool],
        n: int,
    ) -> list[int]:
        skipped: list[int] = []
        pages: list[int] = []
        while stack and len(pages) < n:
            candidate = stack.pop()
            if self.kind_bytes[candidate] != FREE or self.used[candidate] != used:
                on[candidate] = False  # a stale entry: it left the pool (or this stack)
                continue
            if unavailable(candidate):
                skipped.append(candidate)
                continue
            on[candidate] = False
            pages.append(candidate)
        stack.extend(reversed(skipped))
        return pages

    # ---- the balloon ----------------------------------------------------------------------

    def inflate(self, n: int, unavailable: Callable[[int], bool]) -> npt.NDArray[np.int64]:
        """Up to ``n`` pages for the balloon, as the guest's allocator would give them: free
        pages first (once-used ones, whose frames the platform frees at no cost to the
        guest; then never-used ones, which free no frame but, left in the pool, would be the
        page cache's next pages: a first touch each, a frame), then the page cache's
        coldest blocks, by the CLOCK that evicts them (dropped); never anonymous or
        ``unavailable`` pages. They are BALLOON now."""
        taken = self._pop_free(unavailable, n) if n > 0 else []
        if len(taken) < n:
            taken += self._clock(n - len(taken), unavailable)
        for page in taken:
            self._set(page, BALLOON)
            if not self._on_balloon[page]:
                self._on_balloon[page] = True
                self._balloon.append(page)
        return np.array(taken, dtype=np.int64) if taken else _NONE

    def deflate(self, n: int) -> npt.NDArray[np.int64]:
        """Give up to ``n`` pages of the balloon back to the free pool (last in, first out)."""
        given: list[int] = []
        balloon = self._balloon
        while balloon and len(given) < n:
            page = balloon.pop()
            self._on_balloon[page] = False
            if self.kind_bytes[page] != BALLOON:
                continue  # taken back by an anonymous access meanwhile
            self._set(page, FREE)
            self._push_free(page)
            given.append(page)
        return np.array(given, dtype=np.int64) if given else _NONE

    def release(self, pages: npt.NDArray[np.int64]) -> None:
        """Return these BALLOON pages to the free pool at once (not rate-limited: see
        ``BalloonDriver.tick``, mappings the balloon must not have)."""
        for page in pages.tolist():
            if self.kind_bytes[page] == BALLOON:
                self._set(page, FREE)
                self._push_free(page)

    # ---- reporting and checking -----------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "pages": self.sizes(),
            "cache_limit": self.cache_limit,
            "refaults": self.refaults,
            "cache_hits": self.cache_hits,
            "uncached_reads": self.uncached_reads,
            "cache_evictions": self.cache_evictions,
            "cache_claims": self.cache_claims,
            "refault_seconds": round(self.refault_seconds, 6),
            "balloon_returns": self.balloon_returns,
            "balloon_touches": self.balloon_touches,
            "anon_freed": self.anon_freed,
            "reused": self.reused,
            "free_once_used": int(np.count_nonzero(self.used[self.kind == FREE])),
        }

    def check(self) -> list[str]:
        """Broken invariants of the bookkeeping, by name (tests call it after every step)."""
        problems = []
        counts = np.bincount(self.kind, minlength=4).tolist()
        if counts != self.counts:
            problems.append(f"counts {self.counts} != pages by kind {counts}")
        cached = np.flatnonzero(self.page_block >= 0)
        if not (self.kind[cached] == CACHE).all():
            problems.append("a page that holds a block is not CACHE")
        if not (self.block_page[self.page_block[cached]] == cached).all():
            problems.append("block and page maps disagree")
        if len(np.flatnonzero(self.block_page >= 0)) != len(cached):
            problems.append("a block maps to a page that does not hold it")
        if self.counts[CACHE] != len(cached):
            problems.append("a CACHE page holds no block")
        free = np.flatnonzero(self.kind == FREE)
        once = self.used[free]
        if not (self._on_freed[free[once]].all() and self._on_free[free[~once]].all()):
            problems.append("a FREE page is not on its free pool's stack")
        if self.used[self.kind == BALLOON].any():
            problems.append("a BALLOON page counts as used")
        if not self.used[(self.kind == ANON) | (self.kind == CACHE)].all():
            problems.append("an ANON or CACHE page does not count as used")
        ballooned = np.flatnonzero(self.kind == BALLOON)
        if not self._on_balloon[ballooned].all():
            problems.append("a BALLOON page is not on the balloon's stack")
        if len(self._free) != int(self._on_free.sum()):
            problems.append("the free pool's stack holds a page twice")
        if len(self._freed) != int(self._on_freed.sum()):
            problems.append("the once-used free pool's stack holds a page twice")
        if len(self._balloon) != int(self._on_balloon.sum()):
            problems.append("the balloon's stack holds a page twice")
        return problems
