"""NUMA migration: pages a VM holds on another node than its home node move home.

A page lands off its home node when its first touch (or a swap-in, or a copy-on-write) found
the home node full: the allocator then takes a frame from another node. Once the home node
has room again, this service moves such pages home, at low priority and at a bounded rate.
From Linux (``mm/migrate.c``, ``kernel/sched/fair.c`` ``task_numa_work``) it takes:

- **a scan in chunks, paced by a period** (``task_numa_work`` scans 256 MB of a task's
  address space per scan period, at least a second apart, the period growing while nothing
  is found): the platform's own background task walks a hand over each VM's p2m in chunks
  of ``SCAN_CHUNK`` entries, queueing private pages whose frame is on another node; after a
  full pass that found none, that VM waits ``RESCAN_SECONDS`` before the next, doubling up
  to ``MAX_RESCAN_SECONDS``, and at once again once its home node was full (the only time
  pages land elsewhere) and has room again. Unlike Linux no hinting fault is needed to decide
  where a page belongs: the VM's home node says it (as ESX's NUMA scheduler does);
- **room on the target node** (``migrate_balanced_pgdat``: a node takes migrated pages only
  while it stays above its high watermark after them): pages move only while the home node
  keeps ``free_high_pct`` % of its frames free (a reserve of at least one frame), counting
  the moves already promised, so migration never pushes the home node into a low free state;
- **a rate limit** (the kernel's ``ratelimit_pages`` per 100 ms window, now
  ``numa_balancing_promote_rate_limit_MBps``): token buckets in pages per second, one per
  VM and one for the host, on the injected clock, settable at run time (0 stops migration);
- **unmap, copy, remap** (``migrate_pages``: migration entries replace the PTEs, the page is
  copied, the entries are replaced by the new page): the VMM releases the pages in a
  NUMA_MIGRATION batch (it skips pinned ones: Linux does not migrate pages with extra
  references either), the platform copies the whole batch with NumPy into frames of the
  home node in chunks that yield to the event loop, repoints the p2m and frees the old
  frames. The second half of the remap, the VMM installing the new frames, is a VALIDATION
  batch carrying the new MPNs (``validation.py``);
- **a fault waits for the copy** (``migration_entry_wait``): a fault on a page whose move is
  in flight completes that page's move (one page copied at once) and maps the new frame;
  it never cancels it, since a write does not make the move useless. Only when the home node
  has no room left does the page keep its old frame (reason CANCEL). Content is never lost:
  the old frame is freed only after the new one holds the copy and the p2m names it.

Only private pages move: a shared frame (a node's zero frame, a merged frame) serves pages of
several VMs, whose home nodes differ. Pages no VMM maps (RESIDENT) are moved without a
batch, as page retire and page sharing do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import PageState, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from ..p2m import FLAG_SHARED
from . import page_move
from .base import LowPriorityService, Pages, Selection

if TYPE_CHECKING:
    from ..allocator import FrameAllocator
    from ..context import ServiceContext
    from ..vm import VM

#: A token bucket banks this many seconds of its rate at most: no flood after a quiet spell.
BURST_SECONDS = 0.25
#: p2m entries the scanner looks at per step before it yields (~0.2 ms of NumPy here).
SCAN_CHUNK = 16384
#: After a full pass over a VM that found no page to move, its next pass waits this long
#: (Linux's ``numa_balancing_scan_period_min_ms``), doubling after each such pass up to
#: MAX_RESCAN_SECONDS (Linux: up to 60 s), so a large VM that is all local costs little.
RESCAN_SECONDS = 1.0
MAX_RESCAN_SECONDS = 16.0
#: Seconds the scanner sleeps while a VM waits for room on its home node or for its queue
#: to drain (other VMs and the rounds change those, and they do not wake the scanner).
SCAN_IDLE_SECONDS = 0.05
#: Longest it sleeps otherwise: until the first VM's next pass is due, at most this long;
#: a new VM or a new rate wakes it at once. (Polling at SCAN_IDLE_SECONDS cost an idle
#: two-node daemon ~0.5 % of a CPU.)
SCAN_IDLE_MAX_SECONDS = 1.0
#: Candidates queued per VM at most; the scan pauses until the rounds take them.
MAX_QUEUE = 8192
#: Pages copied per step of an asynchronous move before it yields to the event loop.
MOVE_CHUNK = 128

_EXPOSED, _RESIDENT = int(PageState.EXPOSED), int(PageState.RESIDENT)
_NUMA = int(ServiceType.NUMA_MIGRATION)


class TokenBucket:
    """Pages per second on the injected clock, banking at most ``BURST_SECONDS`` of it."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = self.burst
        self.last = now

    @property
    def burst(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS) if self.rate > 0 else 0.0

    def available(self, now: float) -> int:
        """Whole pages the rate allows now (nothing is taken)."""
        self.tokens = min(self.burst, self.tokens + self.rate * max(0.0, now - self.last))
        self.last = max(self.last, now)
        return int(self.tokens + 1e-9)  # float dust is no page

    def take(self, pages: int) -> None:
        self.tokens = max(0.0, self.tokens - pages)

    def give_back(self, pages: int) -> None:
        """Pages charged but not moved (refused, gone) do not use up the rate."""
        self.tokens = min(self.burst, self.tokens + pages)

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.tokens = min(self.tokens, self.burst)


@dataclass
class NumaStats:
    """Per-VM figures of NUMA migration (``vmmem-ctl status``, metrics)."""

    migrated: int = 0  # pages moved home
    fault_completions: int = 0  # faults that completed a page's move
    aborted: int = 0  # moves given up for lack of room (the page kept its frame)
    refused: int = 0  # pages the VMM kept (pinned, not mapped any more)


@dataclass
class _VMNuma:
    vm: VM
    bucket: TokenBucket
    #: Pages found off node, to move. No per-page "queued" array beside it: the queue is
    #: short (MAX_QUEUE) and a scan checks its finds against it (``_not_queued``), so NUMA
    #: migration keeps nothing per guest page.
    queue: list[int] = field(default_factory=list)
    hand: int = 0
    found_in_pass: int = 0
    next_scan: float = 0.0
    rescan: float = RESCAN_SECONDS
    moving: int = 0  # pages selected or in flight, not moved yet: promised home frames
    stats: NumaStats = field(default_factory=NumaStats)


class NumaMigrationService(LowPriorityService):
    """Moves each VM's private pages that live off its home node back home, rate-bounded."""

    service = ServiceType.NUMA_MIGRATION

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        cfg, now = ctx.config, ctx.clock()
        self.vm_rate = cfg.numa_migrate_rate
        self.host_bucket = TokenBucket(cfg.numa_host_migrate_rate, now)
        self.vms: dict[int, _VMNuma] = {}
        #: Home frames promised to moves not done yet, per node.
        self.promised = [0] * ctx.machine.nodes
        #: Called with (vm, pages) a batch released and the copy left RESIDENT: the second
        #: half of the remap (remap validation) re-exposes them.
        self.on_moved: Callable[[VM, Pages], None] = lambda vm, bpns: None
        #: Set when the scanner should look now: a new VM, a new rate.
        self._wake = asyncio.Event()

    # ---- settings and figures -------------------------------------------------------------

    def configure(self, vm_rate: float | None = None, host_rate: float | None = None) -> None:
        """Change the per-VM or host rate (pages/s; 0 stops migration) from now on."""
        if vm_rate is not None:
            self.vm_rate = vm_rate
            for st in self.vms.values():
                st.bucket.set_rate(vm_rate)
        if host_rate is not None:
            self.host_bucket.set_rate(host_rate)
        self._wake.set()

    @property
    def host_rate(self) -> float:
        return self.host_bucket.rate

    def reserve(self, node: int) -> int:
        """Free frames the node keeps for itself: its high threshold, at least one frame."""
        first, last = self.ctx.machine.allocator.node_bounds[node]
        return max(1, int(np.ceil(self.ctx.config.free_high_pct / 100 * (last - first))))

    def room(self, node: int) -> int:
        """Frames of ``node`` moves may still take: free, less the reserve and promises."""
        free = self.ctx.machine.allocator.free_on(node)
        return max(
            0, min(free - self.reserve(node), self.ctx.machine.available()) - self.promised[node]
        )

    def stats(self, vm: VM) -> NumaStats:
        st = self.vms.get(vm.vm_id)
        return NumaStats() if st is None else st.stats

    def queued(self, vm: VM) -> int:
        st = self.vms.get(vm.vm_id)
        return 0 if st is None else len(st.queue)

    def _state(self, vm: VM) -> _VMNuma:
        st = self.vms.get(vm.vm_id)
        if st is None:
            bucket = TokenBucket(self.vm_rate, self.ctx.clock())
            st = _VMNuma(vm, bucket)
            self.vms[vm.vm_id] = st
            self._wake.set()  # its first pass is due now
        return st

    # ---- scanning -------------------------------------------------------------------------

    def background(self) -> Coroutine[Any, Any, None] | None:
        # One node: no page is ever remote, nothing to scan (and no wake-ups for it).
        return self.scanner() if self.ctx.machine.nodes > 1 else None

    async def scanner(self) -> None:
        """The background scan: a chunk of each VM that wants one, yielding between them."""
        while True:
            looked = 0
            for st in list(self.vms.values()):
                if self._wants_scan(st, self.ctx.clock()):
                    looked += self.scan(st.vm, SCAN_CHUNK, self.ctx.clock())
                    await asyncio.sleep(0)
            if looked == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_sleep(self.ctx.clock()))

    def _idle_sleep(self, now: float) -> float:
        """Seconds the scanner may sleep when it found nothing to look at: until the first
        VM's next pass, or SCAN_IDLE_SECONDS while a VM is due but waits (no room at home,
        a full queue), within [SCAN_IDLE_SECONDS, SCAN_IDLE_MAX_SECONDS]."""
        wait = SCAN_IDLE_MAX_SECONDS
        if self.vm_rate <= 0 or self.host_rate <= 0:
            return wait  # configure() wakes it
        for st in self.vms.values():
            if st.vm.alive:
                wait = min(wait, st.next_scan - now)
        return max(SCAN_IDLE_SECONDS, wait)

    def _wants_scan(self, st: _VMNuma, now: float) -> bool:
        if not st.vm.alive or self.vm_rate <= 0 or self.host_rate <= 0:
            return False
        if self.room(st.vm.home_node) == 0:
            # Pages land off node only while the home node is full (the allocator falls
            # back then): once it has room again, look at once, whatever the backoff.
            st.rescan, st.next_scan = RESCAN_SECONDS, 0.0
            return False
        return now >= st.next_scan and len(st.queue) < MAX_QUEUE // 2

    def scan(self, vm: VM, budget: int, now: float) -> int:
        """Look at ``budget`` p2m entries under the hand; queue private pages off the home
        node. Returns the entries looked at."""
        st = self._state(vm)
        n = vm.guest_pages
        window = (st.hand + np.arange(min(n, budget), dtype=np.int64)) % n
        found = self._movable(vm, window)
        found = _not_queued(found, st.queue)[: MAX_QUEUE - len(st.queue)]
        st.queue.extend(found.tolist())
        st.found_in_pass += len(found)
        st.hand = int((window[-1] + 1) % n)
        if st.hand <= int(window[0]):  # a pass ended in this window
            if st.found_in_pass == 0:
                st.next_scan = now + st.rescan
                st.rescan = min(MAX_RESCAN_SECONDS, 2 * st.rescan)
            else:
                st.rescan = RESCAN_SECONDS
            st.found_in_pass = 0
        return len(window)

    def _movable(self, vm: VM, bpns: Pages) -> Pages:
        """Of ``bpns``: private pages, mapped or resident, on a healthy frame off the home
        node (the filter of both the scan and the selection)."""
        p2m, machine = vm.p2m, self.ctx.machine
        state, frame = p2m.state[bpns], p2m.frame[bpns]
        ok = ((state == _EXPOSED) | (state == _RESIDENT)) & (frame >= 0)
        ok &= (p2m.flags[bpns] & FLAG_SHARED) == 0
        safe = np.where(ok, frame, 0)
        ok &= (machine.allocator.node_of(safe) != vm.home_node) & ~machine.failing[safe]
        movable: Pages = bpns[ok]
        return movable

    # ---- rounds ---------------------------------------------------------------------------

    def pending_work(self, vm: VM, now: float) -> int:
        """Queued pages, as many as the rates and the home node's room allow now."""
        st = self.vms.get(vm.vm_id)
        if st is None:
            self._state(vm)  # the scanner starts on this VM
            return 0
        if not st.queue:
            return 0
        allowed = min(st.bucket.available(now), self.host_bucket.available(now))
        return max(0, min(len(st.queue), allowed, self.room(vm.home_node)))

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """Up to ``units`` queued pages that still need moving; those no VMM maps are moved
        at once, the mapped ones form the batch (mpn: the frame the VMM maps now)."""
        st = self._state(vm)
        limit = min(capacity, units, self.pending_work(vm, now))
        if limit <= 0:
            return Selection.empty()
        popped = np.array(st.queue[:limit], dtype=np.int64)
        del st.queue[:limit]
        bpns = self._movable(vm, distinct(popped))
        resident = bpns[vm.p2m.state[bpns] == _RESIDENT]
        batch = bpns[vm.p2m.state[bpns] == _EXPOSED]
        self._charge(st, len(bpns))
        self._promise(st, len(batch))
        if len(resident):  # nobody maps these: no need to ask the VMM
            self._promise(st, len(resident))
            self._finish(vm, resident)
        return Selection(batch, vm.p2m.frame[batch].astype(np.int64), len(popped))

    def _charge(self, st: _VMNuma, pages: int) -> None:
        st.bucket.take(pages)
        self.host_bucket.take(pages)

    def _promise(self, st: _VMNuma, pages: int) -> None:
        st.moving += pages
        self.promised[st.vm.home_node] += pages

    def _unpromise(self, st: _VMNuma, pages: int) -> None:
        pages = min(pages, st.moving)
        st.moving -= pages
        self.promised[st.vm.home_node] -= pages

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:
        """Pages the VMM kept (pinned, faulted meanwhile): no frame and no rate spent."""
        st = self._state(vm)
        self._unpromise(st, len(refused))
        st.bucket.give_back(len(refused))
        self.host_bucket.give_back(len(refused))
        st.stats.refused += len(refused)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """The VMM released ``accepted`` (now IN_FLIGHT): copy them home asynchronously, in
        chunks that yield so faults (and other VMs) go first (``page_move.py``)."""
        page_move.spawn_moves(self.ctx, vm, accepted, _NUMA, MOVE_CHUNK, self._finish_chunk)

    def _finish_chunk(self, vm: VM, bpns: Pages) -> None:
        """A chunk's pages still in flight (a fault took the others meanwhile)."""
        self._finish(vm, bpns)
        self.on_moved(vm, bpns)

    def _finish(self, vm: VM, bpns: Pages) -> int:
        """Move promised pages (they end RESIDENT, moved or not); returns how many moved."""
        st = self._state(vm)
        moved = self.move(vm, bpns)
        self._unpromise(st, len(bpns))
        rest = bpns[moved:]
        page_move.keep(vm, rest)  # no room after all: the old frame, content intact
        st.stats.aborted += len(rest)
        return moved

    def move(self, vm: VM, bpns: Pages) -> int:
        """Copy the first pages of ``bpns`` that the home node has room for into home frames,
        repoint the p2m and free the old frames; returns how many moved. The moved pages end
        RESIDENT (no VMM maps them)."""
        machine, home = self.ctx.machine, vm.home_node
        room = machine.allocator.free_on(home) - self.reserve(home)
        k = max(0, min(len(bpns), room, machine.available()))
        if k == 0:
            return 0
        moving = bpns[:k]
        self.split_large(vm, moving)  # unmapped pages move without a batch: split here
        new = machine.allocator.allocate(k, home)  # k <= free_on(home): all on the home node
        machine.release_or_retire(page_move.move(machine, vm, moving, new))
        self._state(vm).stats.migrated += k
        self.ctx.metrics.numa_migrated.inc(k)
        return k

    # ---- faults ---------------------------------------------------------------------------

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Complete the page's move now (Linux waits for the migration: here its copy is one
        page), then map the page; without room it keeps its old frame (CANCEL)."""
        moved = self._finish(vm, np.array([bpn], dtype=np.int64))
        if moved:
            self._state(vm).stats.fault_completions += 1
        return page_move.fault_reply(self.ctx, vm, bpn, bool(moved))

    def on_vm_gone(self, vm: VM) -> None:
        st = self.vms.pop(vm.vm_id, None)
        if st is not None:
            self.promised[vm.home_node] -= st.moving


def locality(vm: VM, allocator: FrameAllocator) -> tuple[int, int]:
    """(local, remote): the VM's pages backed by a private frame on / off its home node.

    A scan of the p2m: for status and scrapes, not for rounds.
    """
    p2m = vm.p2m
    frames = p2m.frame[(p2m.frame >= 0) & ((p2m.flags & FLAG_SHARED) == 0)]
    local = int(np.count_nonzero(allocator.node_of(frames) == vm.home_node))
    return local, len(frames) - local


def _not_queued(found: Pages, queue: list[int]) -> Pages:
    """The pages of ``found`` not in ``queue`` already (a page stays queued across passes
    until a round takes it: it must not be queued twice)."""
    if not queue or len(found) == 0:
        return found
    fresh: Pages = found[~np.isin(found, np.array(queue, dtype=np.int64))]
    return fresh
