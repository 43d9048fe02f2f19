"""2M defrag: free whole 2 MiB runs of frames by moving the few pages left in them.

2M promotion needs a whole aligned free run of 512 frames on the VM's home node; after a
while of faults, swaps and exits, free frames are scattered and no run is whole. The talk
lists "2M defragmentation" as a low-priority invalidation; the rest is taken from Linux's
compaction (``mm/compaction.c``) as kcompactd runs it:

- **one worker per node, woken or proactive** (``kcompactd``: woken when a high-order
  allocation fails, ``wakeup_kcompactd``; and every ``HPAGE_FRAG_CHECK_INTERVAL_MSEC``
  (500 ms) when the node's fragmentation score is above its high watermark): each node is
  looked at every ``CHECK_SECONDS``; it compacts while 2M promotion found no free run there
  (``want_run``), or while its fragmentation score (the percentage of its free frames that
  are not in whole free runs, ``fragmentation_score_node``) is above ``100 - proactiveness
  + 10``, until it is at most ``100 - proactiveness`` (Linux's default proactiveness, 20);
- **a bounded scan of pageblocks** (``isolate_migratepages`` walks pageblocks from a cached
  position, ``compact_cached_migrate_pfn``, and ``fast_find_migrateblock`` prefers blocks
  with few pages in use): each look scans ``SCAN_RUNS`` runs from the node's hand and picks
  the run with the fewest used frames, if it has at most ``MAX_USED`` (the design table's
  "nearly free 2 MB regions"): moving 64 pages frees 512 frames;
- **isolation** (``MIGRATE_ISOLATE``: no allocation lands in a pageblock being emptied): the
  run's free frames are claimed (``FrameAllocator.claim_free``), and so are the frames its
  pages leave; once every frame of the run is claimed, the run is released whole;
- **what cannot move makes the run unsuitable** (``isolate_migratepages_block`` skips pinned
  pages, and the pageblock then is not freed; ``isolation_suitable`` and the skip bits keep
  compaction off such blocks for a while): a run holding a zero frame, a merged frame
  (moving either means repointing every sharer: retire's rare path, not a background one),
  a frame in transit (a swap-in buffer), a failing or retired frame, or a page in flight or
  of a large region is not chosen; a page the VMM refuses (pinned) or a run that is not
  empty after ``ISOLATION_SECONDS`` ends the isolation, and the run is skipped for
  ``SKIP_SECONDS``;
- **migration** (``migrate_pages``): as NUMA migration moves a page (``numa_migration.py``):
  the VMM releases the page in a DEFRAG_2M batch (pinned pages refused), the platform copies
  it to a frame of the same node outside the run, repoints the p2m, and remap validation
  gives the VMM the new frame; a page no VMM maps moves at once; a fault on a page in
  flight completes its move (COMPLETE), or without a free frame keeps it (CANCEL).

Bounded work: a look costs ``SCAN_RUNS`` counts; a step of an isolated run costs one run's
512 frame states; batches are sized by the low-priority scheduler. Nothing scans the host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import PAGES_PER_2M, PageState, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from ..allocator import FrameState
from ..hugepages import FLAG_LARGE
from ..p2m import FLAG_SHARED
from . import page_move
from .base import LowPriorityService, Pages, Selection

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

log = structlog.get_logger("vmmem.platform.defrag")

#: How often each node is looked at (kcompactd's HPAGE_FRAG_CHECK_INTERVAL_MSEC).
CHECK_SECONDS = 0.5
#: How often the worker of a switched-off defrag looks whether it was switched on.
OFF_SLEEP_SECONDS = 1.0
#: Runs looked at per look, and the most used frames a run may hold to be emptied.
SCAN_RUNS = 256
MAX_USED = 64
#: An isolated run not emptied in this long is given back; a given-up run is skipped so long.
ISOLATION_SECONDS = 5.0
SKIP_SECONDS = 30.0
#: Linux's ``vm.compaction_proactiveness`` default.
PROACTIVENESS = 20
#: Pages copied per step of an asynchronous move before it yields to the event loop.
MOVE_CHUNK = 128

_EXPOSED, _RESIDENT = int(PageState.EXPOSED), int(PageState.RESIDENT)
_USED = int(FrameState.USED)
_RETIRED, _FREE = int(FrameState.RETIRED), int(FrameState.FREE)
_DEFRAG = int(ServiceType.DEFRAG_2M)


@dataclass
class DefragStats:
    """Host-wide figures of 2M defrag (``vmmem-ctl status``)."""

    moved: int = 0  # pages moved out of isolated runs
    runs_freed: int = 0  # runs made whole and free
    runs_aborted: int = 0  # isolations given up
    fault_completions: int = 0
    refused: int = 0  # pages the VMM kept (pinned)


@dataclass
class _Isolated:
    """A run being emptied: its claimed frames (a mask over the run) and since when."""

    run: int
    claimed: npt.NDArray[np.bool_]
    since: float

    @property
    def first(self) -> int:
        return self.run * PAGES_PER_2M


@dataclass
class _Node:
    hand: int
    next_check: float = 0.0
    wanted: bool = False  # promotion found no free run here
    compacting: bool = False  # proactive: above the high watermark, not yet at the low
    isolated: _Isolated | None = None
    skip: dict[int, float] = field(default_factory=dict)  # run -> skipped until


class DefragService(LowPriorityService):
    """Per node, empties one nearly free run at a time so 2M promotion finds whole runs."""

    service = ServiceType.DEFRAG_2M

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        alloc = ctx.machine.allocator
        self.nodes = [_Node(alloc.node_runs(n)[0]) for n in range(alloc.nodes)]
        self.vms: dict[int, VM] = {}
        self.queues: dict[int, list[int]] = {}
        self.stats = DefragStats()
        self.proactiveness = PROACTIVENESS
        #: ``--hugepages`` (defrag serves 2M promotion): off, no run is isolated.
        self.enabled = ctx.config.hugepages
        #: Called with (vm, pages) moved and RESIDENT: remap validation re-exposes them.
        self.on_moved: Callable[[VM, Pages], None] = lambda vm, bpns: None

    # ---- figures ------------------------------------------------------------------------

    def held_frames(self) -> list[int]:
        """Frames claimed by isolated runs: used, owned by nobody (the invariant check)."""
        out: list[int] = []
        for st in self.nodes:
            if st.isolated is not None:
                out += (np.flatnonzero(st.isolated.claimed) + st.isolated.first).tolist()
        return out

    def fragmentation_score(self, node: int) -> int:
        """Percent of the node's free frames not in whole free runs (0 when none is free)."""
        alloc = self.ctx.machine.allocator
        free = alloc.free_on(node)
        if free == 0:
            return 0
        return round(100 * (free - PAGES_PER_2M * alloc.free_runs(node)) / free)

    def want_run(self, node: int) -> None:
        """2M promotion found no free run on ``node``: look at it at the next check."""
        self.nodes[node].wanted = True

    # ---- the per-node worker --------------------------------------------------------------

    def background(self) -> Coroutine[Any, Any, None]:
        return self.worker()

    async def worker(self) -> None:
        while True:
            self.step(self.ctx.clock())
            # Off: look again only now and then (an idle daemon need not wake 10 times a
            # second); a run being isolated is followed to its end at the usual pace.
            idle = not self.enabled and all(st.isolated is None for st in self.nodes)
            await asyncio.sleep(OFF_SLEEP_SECONDS if idle else CHECK_SECONDS / 5)

    def step(self, now: float) -> None:
        """Each node: follow its isolated run, or at its check time maybe isolate one."""
        for node, st in enumerate(self.nodes):
            if st.isolated is not None:
                self._follow(node, st, now)
            elif now >= st.next_check:
                st.next_check = now + CHECK_SECONDS
                if self._wants(node, st):
                    self._isolate(node, st, now)

    def _wants(self, node: int, st: _Node) -> bool:
        alloc = self.ctx.machine.allocator
        if not self.enabled:
            return False
        if alloc.free_on(node) < PAGES_PER_2M + self._reserve(node):
            st.wanted = st.compacting = False  # no room to make a run from
            return False
        if st.wanted and alloc.free_runs(node) > 0:
            st.wanted = False  # a run is free: promotion takes it
        score = self.fragmentation_score(node)
        low = max(100 - self.proactiveness, 5)
        if score > min(low + 10, 100):
            st.compacting = True
        elif score <= low:
            st.compacting = False
        return st.wanted or (st.compacting and self.proactiveness > 0)

    def _reserve(self, node: int) -> int:
        """Free frames the node keeps for faults while a run is claimed: its high threshold."""
        first, last = self.ctx.machine.allocator.node_bounds[node]
        return max(1, int(np.ceil(self.ctx.config.free_high_pct / 100 * (last - first))))

    def _isolate(self, node: int, st: _Node, now: float) -> None:
        """Scan SCAN_RUNS runs from the hand; isolate the one with the fewest used frames
        whose pages can all move."""
        alloc = self.ctx.machine.allocator
        first, last = alloc.node_runs(node)
        n = last - first
        if n <= 0:
            return
        start = min(max(st.hand, first), last - 1) - first
        idx = first + (start + np.arange(min(SCAN_RUNS, n))) % n
        st.hand = int(first + (start + len(idx)) % n)
        used = PAGES_PER_2M - alloc.run_free[idx].astype(np.int64)
        ok = (used > 0) & (used <= MAX_USED)
        for run in idx[ok][np.argsort(used[ok], kind="stable")].tolist():
            if st.skip.get(run, 0.0) > now:
                continue
            pages = self._run_pages(run)
            if pages is None:
                st.skip[run] = now + SKIP_SECONDS
                continue
            moving = sum(len(b) for b in pages.values())
            if alloc.free_on(node) - int(alloc.run_free[run]) < moving + self._reserve(node):
                return  # not enough room outside the run for its pages
            claimed = np.zeros(PAGES_PER_2M, dtype=bool)
            claimed[alloc.claim_free(run) - run * PAGES_PER_2M] = True
            st.isolated = _Isolated(run, claimed, now)
            for vm_id, bpns in pages.items():
                self.queues.setdefault(vm_id, []).extend(bpns.tolist())
            log.info("defrag_isolated", node=node, run=run, pages=int((~claimed).sum()))
            return

    def _run_pages(self, run: int) -> dict[int, Pages] | None:
        """The pages on the run's used frames, by VM, if every one of them can move now;
        None if one cannot (see the module docstring)."""
        machine = self.ctx.machine
        frames = np.arange(run * PAGES_PER_2M, (run + 1) * PAGES_PER_2M, dtype=np.int64)
        fs = machine.allocator.frame_state[frames]
        if (fs == _RETIRED).any():
            return None
        used = frames[fs == _USED]
        if machine.failing[used].any():
            return None
        owners = machine.owner_vm[used]
        out: dict[int, Pages] = {}
        for vm_id in distinct(owners).tolist():
            vm = self.vms.get(vm_id)
            if vm is None or not vm.alive:
                return None  # the host's (zero, merged, in transit) or an unknown VM's
            mine = used[owners == vm_id]
            bpns = machine.owner_bpn[mine]
            if not self._movable(vm, bpns, mine).all():
                return None
            out[vm_id] = bpns
        return out

    def _movable(self, vm: VM, bpns: Pages, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Pages still on ``frames``, mapped or resident, private, not large, not in flight."""
        p2m = vm.p2m
        ok: npt.NDArray[np.bool_] = p2m.frame[bpns] == frames
        state = p2m.state[bpns]
        ok &= (state == _EXPOSED) | (state == _RESIDENT)
        ok &= (p2m.flags[bpns] & (FLAG_SHARED | FLAG_LARGE)) == 0
        return ok

    def _follow(self, node: int, st: _Node, now: float) -> None:
        """Claim what became free in the isolated run; release it whole once all of it is
        claimed; give it up when it takes too long or holds something that cannot move."""
        iso = st.isolated
        assert iso is not None
        alloc = self.ctx.machine.allocator
        more = alloc.claim_free(iso.run)
        iso.claimed[more - iso.first] = True
        if iso.claimed.all():
            alloc.release(np.arange(iso.first, iso.first + PAGES_PER_2M, dtype=np.int64))
            st.isolated = None
            st.wanted = False
            self.stats.runs_freed += 1
            self.ctx.metrics.defrag_runs.labels("freed").inc()
            log.info("defrag_run_freed", node=node, run=iso.run)
            return
        frames = iso.first + np.flatnonzero(~iso.claimed)
        if now - iso.since > ISOLATION_SECONDS or (alloc.frame_state[frames] == _RETIRED).any():
            self._give_up(node, st, now, "timeout")
            return
        # Pages that landed in the run before it was claimed, or moved back: queue them.
        owners = self.ctx.machine.owner_vm[frames]
        for vm_id in distinct(owners).tolist():
            vm = self.vms.get(vm_id)
            if vm is None:
                continue
            mine = frames[owners == vm_id]
            bpns = self.ctx.machine.owner_bpn[mine]
            q = self.queues.setdefault(vm_id, [])
            fresh = bpns[self._movable(vm, bpns, mine) & ~np.isin(bpns, q)]
            q.extend(fresh.tolist())

    def _give_up(self, node: int, st: _Node, now: float, why: str) -> None:
        iso = st.isolated
        if iso is None:
            return
        claimed = iso.first + np.flatnonzero(iso.claimed)
        self.ctx.machine.allocator.release(claimed)
        st.isolated = None
        st.skip[iso.run] = now + SKIP_SECONDS
        self.stats.runs_aborted += 1
        self.ctx.metrics.defrag_runs.labels("aborted").inc()
        log.info("defrag_run_aborted", node=node, run=iso.run, reason=why)

    def _isolated_run_of(self, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Whether each frame lies in an isolated run."""
        runs = frames // PAGES_PER_2M
        inside = np.zeros(len(frames), dtype=bool)
        for st in self.nodes:
            if st.isolated is not None:
                inside |= runs == st.isolated.run
        return inside

    # ---- rounds ---------------------------------------------------------------------------

    def pending_work(self, vm: VM, now: float) -> int:
        """Queued pages of ``vm`` in isolated runs."""
        self.vms[vm.vm_id] = vm
        return len(self.queues.get(vm.vm_id, ()))

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """Queued pages still in an isolated run: the ones no VMM maps move at once, the
        mapped ones form the batch (mpn: the frame the VMM maps now)."""
        q = self.queues.get(vm.vm_id)
        take = min(capacity, units, len(q) if q else 0)
        if not q or take <= 0:
            return Selection.empty()
        popped = distinct(np.array(q[:take], dtype=np.int64))
        del q[:take]
        frames = vm.p2m.frame[popped].astype(np.int64)
        keep = self._movable(vm, popped, frames) & self._isolated_run_of(frames)
        bpns = popped[keep]
        resident = bpns[vm.p2m.state[bpns] == _RESIDENT]
        batch = bpns[vm.p2m.state[bpns] == _EXPOSED]
        if len(resident):
            self.move(vm, resident)
        return Selection(batch, vm.p2m.frame[batch].astype(np.int64), take)

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:
        """A page the VMM keeps (pinned) cannot leave its run: give that run up now."""
        self.stats.refused += len(refused)
        runs = distinct(vm.p2m.frame[refused] // PAGES_PER_2M)
        now = self.ctx.clock()
        for node, st in enumerate(self.nodes):
            if st.isolated is not None and st.isolated.run in runs:
                self._give_up(node, st, now, "refused")

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """The VMM released ``accepted`` (IN_FLIGHT): move them asynchronously, in chunks
        that yield so faults (and other VMs) go first (``page_move.py``)."""
        page_move.spawn_moves(self.ctx, vm, accepted, _DEFRAG, MOVE_CHUNK, self._finish)

    def _finish(self, vm: VM, bpns: Pages) -> int:
        """Move in-flight pages; those without a free frame keep theirs. All end RESIDENT
        and go to remap validation."""
        moved = self.move(vm, bpns)
        rest = bpns[~moved]
        page_move.keep(vm, rest)
        if len(rest):
            self.on_moved(vm, rest)
        return int(np.count_nonzero(moved))

    def move(self, vm: VM, bpns: Pages) -> npt.NDArray[np.bool_]:
        """Copy pages of ``bpns`` to free frames outside the run, each on its own frame's node
        (a batch may hold pages of runs isolated on several nodes), as many per node as it
        has free frames, and repoint the p2m; the frames they leave stay claimed by their run
        (a failing one is retired). Returns which pages moved; those end RESIDENT."""
        moved = np.zeros(len(bpns), dtype=bool)
        if len(bpns) == 0:
            return moved
        machine = self.ctx.machine
        alloc = machine.allocator
        nodes = alloc.node_of(vm.p2m.frame[bpns])
        room = machine.available()
        new = np.empty(len(bpns), dtype=np.int64)
        for node in distinct(nodes).tolist():  # (a loop over nodes, not pages)
            idx = np.flatnonzero(nodes == node)[: max(0, min(alloc.free_on(node), room))]
            if len(idx):
                new[idx] = alloc.allocate(len(idx), node)  # <= free_on(node): all on it
                moved[idx] = True
                room -= len(idx)
        k = int(np.count_nonzero(moved))
        if k == 0:
            return moved
        moving = bpns[moved]
        self.split_large(vm, moving)  # (never large when chosen; kept for any later path)
        self._leave(page_move.move(machine, vm, moving, new[moved]))
        self.stats.moved += k
        self.ctx.metrics.defrag_moved.inc(k)
        self.on_moved(vm, moving)
        return moved

    def _leave(self, old: npt.NDArray[np.int64]) -> None:
        """Frames pages left: claimed by their isolated run, or freed when none is."""
        machine = self.ctx.machine
        machine.owner_vm[old] = -1
        machine.owner_bpn[old] = -1
        keep = self._isolated_run_of(old) & ~machine.failing[old]
        for st in self.nodes:
            iso = st.isolated
            if iso is not None:
                mine = old[keep & (old // PAGES_PER_2M == iso.run)]
                iso.claimed[mine - iso.first] = True
        rest = old[~keep]
        if len(rest):
            # Back to the pool: a run given up meanwhile, or a failing frame (retired).
            machine.release_or_retire(rest)

    # ---- faults ---------------------------------------------------------------------------

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Complete the page's move now (one page copied), then map it; without a free frame
        it keeps its old one (CANCEL)."""
        moved = self._finish(vm, np.array([bpn], dtype=np.int64))
        if moved:
            self.stats.fault_completions += 1
        return page_move.fault_reply(self.ctx, vm, bpn, moved > 0)

    def on_vm_gone(self, vm: VM) -> None:
        self.vms.pop(vm.vm_id, None)
        self.queues.pop(vm.vm_id, None)
