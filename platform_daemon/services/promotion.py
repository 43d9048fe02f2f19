"""2M promotion: a 2 MB guest region whose 512 pages are all backed and private is copied into
one aligned 2 MiB run of frames, so the VMM can map it with one large mapping.

The talk lists "2M-region promotion" as the last low-priority class; the rest is taken from
Linux's khugepaged (``mm/khugepaged.c``):

- **a scan in bounded steps** (``khugepaged_scan_mm_slot`` looks at ``pages_to_scan`` PTEs
  per wake-up, then sleeps ``scan_sleep_millisecs``): a background task walks a hand over
  each VM's regions, ``SCAN_REGIONS`` of them per step every ``SCAN_SECONDS``, and queues
  those fit to collapse (at most ``MAX_QUEUE`` per VM). A step's cost does not grow with
  the guest;
- **what may collapse** (``hpage_collapse_scan_pmd``): every page present, none shared
  (``max_ptes_shared``), none swapped (``max_ptes_swap``) and none empty: this service is
  stricter than Linux's defaults (which fill up to 511 empty PTEs with zeroed pages) because
  the issue asks for regions "all backed and private", and a promotion that fills empty
  pages costs frames the guest never asked for. Pages in flight, on failing frames or in
  regions already large are skipped;
- **a huge page first, or no collapse** (``alloc_charge_folio``: when no huge page can be
  allocated, khugepaged backs off ``alloc_sleep_millisecs`` and kcompactd is woken): the run
  is taken with ``FrameAllocator.allocate_run`` on the VM's home node, else on another node
  (``hpage_collapse_find_target_node`` falls back too); while no node has one the VM's
  queue waits ``NO_RUN_SECONDS`` and 2M defrag is asked for one on the home node;
- **isolate, copy, install** (``collapse_huge_page``: the PTEs are cleared under the mmap
  lock, the pages copied into the huge page, the PMD installed): the VMM releases a whole
  region in a PROMOTION_2M batch (its filter refuses the whole region when one page is
  pinned, as khugepaged fails on a page with extra references), the platform copies the 512
  frames into the run with one NumPy gather, repoints the p2m (``FLAG_LARGE`` on every page)
  and frees the old frames; the second half, the VMM installing the new frames, is a
  VALIDATION batch, after which the VMM maps the region large (``vmm_agent/exposure.py``);
- **the copy off the event loop** (khugepaged is a kernel thread of its own: the copy never
  runs in the faulting task): a batch's regions are collapsed ``STEP_REGIONS`` at a time,
  their runs taken together and the copy handed to the daemon's copier thread
  (``MachineMemory.copier``; NumPy lets go of the GIL while it gathers), so the loop serves
  faults, other VMs and the next batch meanwhile on the other core. After the copy the
  p2m is repointed only for regions still in flight since their release, and whose run
  has no frame page retire marked failing meanwhile; the others' runs are freed;
- **already in place** (``collapse_pte_mapped_thp``: pages that already sit in one huge
  folio, mapped by PTEs, get the PMD without a copy): a region whose 512 frames already are
  one aligned run in guest order is promoted without a copy or a new run: the same release
  and install, FLAG_LARGE set on the frames it has. Defrag's moves and a fresh VM's first
  touches often leave regions so;
- **a fault waits for the collapse** (a fault during ``collapse_huge_page`` waits on the mmap
  lock, then finds the huge page): a fault on a page of a region in flight completes the
  region's copy at once, on the loop, and maps the new frame (COMPLETE); only when no run
  can be had does the region keep its old frames (CANCEL). If the copier was copying that
  region, its copy is thrown away when it lands (``copies_discarded``): the fault does not
  wait for another thread. Content is never lost: the old frames are freed only after the
  run holds the copy and the p2m names it.

A unit of work for the low-priority scheduler is one region (512 pages). A slot with room
for fewer than 512 pages cannot carry a region: promotion then never offers work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import PAGES_PER_2M, PageState, ServiceType
from shared.distinct import distinct, distinct_counts
from shared.messages import FaultReply

from ..hugepages import FLAG_LARGE, region_pages, region_rows
from . import page_move
from .base import LowPriorityService, Pages, Selection

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

#: Regions the scanner looks at per VM and step, and the step's period (khugepaged: 4096
#: PTEs, i.e. 8 regions, every 10 s; faster here, since a scenario lasts seconds).
SCAN_REGIONS = 64
SCAN_SECONDS = 0.1
#: How often a background loop of a service switched off looks whether it was switched on.
OFF_SLEEP_SECONDS = 1.0
#: Regions queued per VM at most.
MAX_QUEUE = 16
#: After no run was free on the home node, the VM's queue waits this long.
NO_RUN_SECONDS = 0.5
#: Runs ``allocate_run`` looks at per call (a window: bounded cost on any host).
RUN_WINDOW = 1024
#: Regions collapsed together per step of a batch's collapse: one copy in the copier
#: thread, one p2m update and one free for all of them (8 MiB: ~1 ms of copying, which the
#: event loop does not wait for).
STEP_REGIONS = 4

_EXPOSED, _RESIDENT = int(PageState.EXPOSED), int(PageState.RESIDENT)
_IN_FLIGHT = int(PageState.IN_FLIGHT)
_PROMO = int(ServiceType.PROMOTION_2M)


@dataclass
class PromotionStats:
    """Per-VM figures of 2M promotion (``vmmem-ctl status``)."""

    promoted: int = 0  # regions copied into a run
    fault_completions: int = 0  # faults that completed a region's copy
    aborted: int = 0  # regions given up after their release (no run, a page faulted)
    refused: int = 0  # regions the VMM kept (a pinned page)
    in_place: int = 0  # of ``promoted``: regions already on their run, mapped large uncopied
    no_run: int = 0  # times no free run was found on the home node
    copies_discarded: int = 0  # regions a fault collapsed while the copier copied them


@dataclass
class _VMPromo:
    vm: VM
    hand: int = 0  # next region the scan looks at
    queue: list[int] = field(default_factory=list)
    next_scan: float = 0.0
    wait_until: float = 0.0  # no run was free: the queue waits
    stats: PromotionStats = field(default_factory=PromotionStats)


class PromotionService(LowPriorityService):
    """Collapses fully backed private 2 MB regions into one aligned run each."""

    service = ServiceType.PROMOTION_2M

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.vms: dict[int, _VMPromo] = {}
        #: ``--hugepages``: off, nothing is scanned or offered (``vmmem-ctl set-lowprio``).
        self.enabled = ctx.config.hugepages
        #: Called with (vm, pages) once a region is copied (RESIDENT on the run): remap
        #: validation hands the new frames to the VMM.
        self.on_moved: Callable[[VM, Pages], None] = lambda vm, bpns: None
        #: Called with a node that had no free run for a promotion (2M defrag makes one).
        self.want_run: Callable[[int], None] = lambda node: None
        #: Runs the copier thread is filling, by id: used frames no p2m names yet.
        self._copying: dict[int, npt.NDArray[np.int64]] = {}

    def stats(self, vm: VM) -> PromotionStats:
        st = self.vms.get(vm.vm_id)
        return PromotionStats() if st is None else st.stats

    def queued(self, vm: VM) -> int:
        st = self.vms.get(vm.vm_id)
        return 0 if st is None else len(st.queue)

    def _state(self, vm: VM) -> _VMPromo:
        st = self.vms.get(vm.vm_id)
        if st is None:
            st = self.vms[vm.vm_id] = _VMPromo(vm)
        return st

    # ---- scanning -------------------------------------------------------------------------

    def background(self) -> Coroutine[Any, Any, None]:
        return self.scanner()

    async def scanner(self) -> None:
        """Every SCAN_SECONDS, one step of the scan of each VM."""
        while True:
            now = self.ctx.clock()
            for st in list(self.vms.values()):
                if self.enabled and st.vm.alive and now >= st.next_scan:
                    self.scan(st.vm, SCAN_REGIONS, now)
            # Off (no --hugepages, or switched off): look again only now and then, so an idle
            # daemon does not wake ten times a second for nothing.
            await asyncio.sleep(SCAN_SECONDS if self.enabled else OFF_SLEEP_SECONDS)

    def scan(self, vm: VM, budget: int, now: float) -> int:
        """Look at ``budget`` regions under the hand and queue those fit to collapse;
        returns the regions looked at."""
        st = self._state(vm)
        st.next_scan = now + SCAN_SECONDS
        regions = vm.guest_pages // PAGES_PER_2M
        room = MAX_QUEUE - len(st.queue)
        if regions == 0 or room <= 0:
            return 0
        window = (st.hand + np.arange(min(regions, budget), dtype=np.int64)) % regions
        fit = window[self._collapsible(vm, window)]
        fit = fit[~np.isin(fit, st.queue)][:room]
        st.queue.extend(fit.tolist())
        st.hand = int((window[-1] + 1) % regions)
        return len(window)

    def _collapsible(self, vm: VM, regions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Per region: all 512 pages mapped by the VMM on private healthy frames, no flag
        (shared, merged, large: a region mapped large is done)."""
        p2m = vm.p2m
        ok: npt.NDArray[np.bool_] = (region_rows(p2m.state, regions) == _EXPOSED).all(axis=1)
        ok &= (region_rows(p2m.flags, regions) == 0).all(axis=1)
        if not ok.any():
            return ok
        # Frames only for the regions still fit (exposed pages have frames; checked anyway).
        fit = np.flatnonzero(ok)
        frame = region_rows(p2m.frame, regions[fit])
        good = (frame >= 0).all(axis=1)
        good &= ~self.ctx.machine.failing[np.where(frame >= 0, frame, 0)].any(axis=1)
        ok[fit] = good
        return ok

    @staticmethod
    def _in_place(vm: VM, regions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Per region: its 512 frames already are one aligned run in guest order."""
        frame = region_rows(vm.p2m.frame, regions)
        base = frame[:, :1].astype(np.int64)
        in_place: npt.NDArray[np.bool_] = (base[:, 0] % PAGES_PER_2M == 0) & (
            frame == base + np.arange(PAGES_PER_2M)
        ).all(axis=1)
        return in_place

    # ---- rounds ---------------------------------------------------------------------------

    def pending_work(self, vm: VM, now: float) -> int:
        """Queued regions, while a run may be had and a slot can carry a region."""
        st = self.vms.get(vm.vm_id)
        if st is None:
            self._state(vm)  # the scanner starts on this VM
            return 0
        if not self.enabled or not st.queue or now < st.wait_until:
            return 0
        if vm.region.slot_capacity < PAGES_PER_2M:
            return 0
        return len(st.queue)

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """Up to ``units`` queued regions still fit to collapse, whole, in one batch (mpn:
        the frames the VMM maps now)."""
        st = self._state(vm)
        take = min(units, capacity // PAGES_PER_2M, len(st.queue))
        if take <= 0 or now < st.wait_until:
            return Selection.empty()
        if self._run_node(vm) is None:
            # No run to copy into: only regions already in place can be promoted.
            queued = np.array(st.queue, dtype=np.int64)
            placed = queued[self._in_place(vm, queued)][:take]
            if len(placed) == 0:
                self._no_run(st, now)
                return Selection.empty()
            taken = set(placed.tolist())
            st.queue = [r for r in st.queue if r not in taken]
            popped = placed
        else:
            popped = np.array(st.queue[:take], dtype=np.int64)
            del st.queue[:take]
        regions = popped[self._collapsible(vm, popped)]
        bpns = region_pages(regions)
        return Selection(bpns, vm.p2m.frame[bpns].astype(np.int64), len(popped))

    def _run_node(self, vm: VM) -> int | None:
        """The node to take a run from: the home node, else another one that has a free run
        (khugepaged too falls back to another node unless told not to)."""
        alloc = self.ctx.machine.allocator
        for node in [vm.home_node, *(n for n in range(alloc.nodes) if n != vm.home_node)]:
            if alloc.find_run(node, RUN_WINDOW) is not None:
                return node
        return None

    def _no_run(self, st: _VMPromo, now: float) -> None:
        st.stats.no_run += 1
        st.wait_until = now + NO_RUN_SECONDS
        self.want_run(st.vm.home_node)

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:
        """Regions with a page the VMM kept (pinned): not collapsed this time."""
        self._state(vm).stats.refused += len(distinct(refused // PAGES_PER_2M))

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """Whole regions released: copy them asynchronously (``_collapse_in_steps``). A
        region with a page the VMM kept (it faulted while selected) cannot be copied: its
        released pages go back. (A batch holds whole regions in order: a count per region
        suffices.)"""
        regions = accepted // PAGES_PER_2M
        lo = int(regions.min()) if len(regions) else 0
        counts = np.bincount(regions - lo)
        present = np.flatnonzero(counts)
        if (counts[present] == PAGES_PER_2M).all():  # the common case: no sort needed
            whole = region_pages(present + lo)
        else:
            firsts, counts = distinct_counts(regions)
            full = np.isin(regions, firsts[counts == PAGES_PER_2M])
            whole = region_pages(firsts[counts == PAGES_PER_2M])
            self._abort(vm, accepted[~full])
        if len(whole):
            epochs = vm.p2m.epoch[whole]  # (a copy) as the release left them
            self.ctx.spawn(self._collapse_in_steps(vm, whole, epochs))

    async def _collapse_in_steps(
        self, vm: VM, pages: Pages, epochs: npt.NDArray[np.uint32]
    ) -> None:
        """``STEP_REGIONS`` regions a step (``_collapse_regions``), yielding between steps."""
        step = STEP_REGIONS * PAGES_PER_2M
        for start in range(0, len(pages), step):
            await asyncio.sleep(0)  # faults and other VMs go first
            end = start + step
            try:
                await self._collapse_regions(vm, pages[start:end], epochs[start:end])
            except Exception:
                # A copy failed (its regions were given back): the batch's regions not
                # reached would otherwise stay in flight until the guest faults on them.
                if vm.alive:
                    rest, rest_epochs = pages[start:], epochs[start:]
                    self._abort(vm, rest[page_move.still_ours(vm, rest, rest_epochs, _PROMO)])
                raise

    async def _collapse_regions(self, vm: VM, pages: Pages, epochs: npt.NDArray[np.uint32]) -> None:
        """Collapse the whole regions ``pages`` (released with ``epochs``): those already in
        place at once, the others copied into runs by the copier thread, as many at a time
        as runs are free, the p2m repointed after each copy. Each turn first drops what is
        no longer ours since the release: a fault collapsed or gave up a region while an
        earlier copy ran, or the VM went."""
        while len(pages):
            if not vm.alive:
                return
            ours = page_move.still_ours(vm, pages, epochs, _PROMO)
            whole = np.repeat(ours.reshape(-1, PAGES_PER_2M).all(axis=1), PAGES_PER_2M)
            # Not reachable (a fault takes a whole region): pages of a region partly taken
            # would otherwise stay in flight for ever.
            self._abort(vm, pages[ours & ~whole])
            pages, epochs = pages[whole], epochs[whole]
            regions = pages[::PAGES_PER_2M] // PAGES_PER_2M
            placed = self._in_place(vm, regions)
            if placed.any():
                self._promote_in_place(vm, regions[placed])
                moving = ~np.repeat(placed, PAGES_PER_2M)
                pages, epochs, regions = pages[moving], epochs[moving], regions[~placed]
            if len(regions) == 0:
                return
            runs = self._take_runs(vm, len(regions))
            if not runs:
                self._no_run(self._state(vm), self.ctx.clock())
                self._abort(vm, pages)
                return
            n = len(runs) * PAGES_PER_2M
            await self._copy_and_repoint(vm, pages[:n], epochs[:n], np.concatenate(runs))
            pages, epochs = pages[n:], epochs[n:]

    async def _copy_and_repoint(
        self, vm: VM, pages: Pages, epochs: npt.NDArray[np.uint32], new: Pages
    ) -> None:
        """Copy the whole regions ``pages`` (released with ``epochs``) into the runs ``new``
        off the event loop, then repoint those still ours. While the copy runs a fault may
        collapse a region itself, or give it up (its pages are then no longer in flight for
        this release): that region's run is freed."""
        machine = self.ctx.machine
        p2m = vm.p2m
        old = p2m.frame[pages].astype(np.int64)
        copying = self._copying
        copying[id(new)] = new
        try:
            await page_move.copy_off_loop(machine, new, old)
        except asyncio.CancelledError:
            # Only a shutdown cancels: the copier may still be writing the runs, so they are
            # not freed (another allocation could get them); the daemon's end frees all.
            raise
        except Exception:
            # The copy failed: the runs were never named; the pages keep their frames, which
            # hold their content, and go back to validation.
            del copying[id(new)]
            machine.release_or_retire(new)
            if vm.alive:
                self._abort(vm, pages[page_move.still_ours(vm, pages, epochs, _PROMO)])
            raise
        del copying[id(new)]
        if not vm.alive:  # its frames went with it; the runs were never named
            machine.release_or_retire(new)
            return
        ours = page_move.still_ours(vm, pages, epochs, _PROMO)
        whole = ours.reshape(-1, PAGES_PER_2M).all(axis=1)
        # A frame of a run marked failing while the copy ran (page retire found no owner:
        # "in transit", retired once freed): that region keeps its old frames.
        healthy = ~machine.failing[new].reshape(-1, PAGES_PER_2M).any(axis=1)
        done = np.repeat(whole & healthy, PAGES_PER_2M)
        machine.release_or_retire(new[~done])  # the failing frames are retired here
        self._state(vm).stats.copies_discarded += int((~whole).sum())
        self._abort(vm, pages[ours & ~done])  # (a partly taken region: not reachable)
        if done.any():
            self._repoint(vm, pages[done], new[done], old[done])

    def collapse(self, vm: VM, region: int) -> bool:
        """The fault path's collapse of one region (its pages in flight), on the event loop:
        into a free run of the home node (else of another node); without a run the pages
        keep their frames. Either way they end RESIDENT and go to validation."""
        regions = np.array([region], dtype=np.int64)
        if self._in_place(vm, regions)[0]:
            self._promote_in_place(vm, regions)
            return True
        runs = self._take_runs(vm, 1)
        pages = region_pages(regions)
        if not runs:
            self._no_run(self._state(vm), self.ctx.clock())
            self._abort(vm, pages)
            return False
        old = vm.p2m.frame[pages].astype(np.int64)
        page_move.copy_frames(self.ctx.machine.frames, self.ctx.machine.source, runs[0], old)
        self._repoint(vm, pages, runs[0], old)
        return True

    def held_frames(self) -> list[int]:
        """The runs being copied into: used, named by no p2m yet (the invariant check)."""
        return [f for run in self._copying.values() for f in run.tolist()]

    def _take_runs(self, vm: VM, want: int) -> list[npt.NDArray[np.int64]]:
        """Up to ``want`` free runs, each from the home node, else from another node, while
        the host limit leaves room for one more. A step holds its runs and the regions' old
        frames together until its copy lands, so runs after the first are taken only while
        the host keeps its high free threshold beside them (faults first); the regions
        left wait for the step's next turn, when the old frames are free again."""
        machine = self.ctx.machine
        alloc = machine.allocator
        nodes = [vm.home_node, *(n for n in range(alloc.nodes) if n != vm.home_node)]
        reserve = int(np.ceil(self.ctx.config.free_high_pct / 100 * machine.limit_pages))
        runs: list[npt.NDArray[np.int64]] = []
        while len(runs) < want and machine.available() >= PAGES_PER_2M + (reserve if runs else 0):
            run = None
            for node in nodes:
                run = alloc.allocate_run(node, RUN_WINDOW)
                if run is not None:
                    break
            if run is None:
                break
            runs.append(run)
        return runs

    def _repoint(self, vm: VM, pages: Pages, new: Pages, old: Pages) -> None:
        """Regions copied into their runs: the p2m names the runs, mapped large; the old
        frames are freed; validation maps the regions."""
        machine = self.ctx.machine
        page_move.repoint(machine, vm, pages, new, FLAG_LARGE)
        machine.release_or_retire(old)
        n = len(pages) // PAGES_PER_2M
        self._state(vm).stats.promoted += n
        self.ctx.metrics.hugepage_promoted.inc(len(pages))
        self.on_moved(vm, pages)

    def _promote_in_place(self, vm: VM, regions: Pages) -> None:
        """Regions already one aligned run each, in order: no copy, no new run; mapped
        large as they are."""
        pages = region_pages(regions)
        vm.p2m.flags[pages] |= FLAG_LARGE
        page_move.keep(vm, pages)
        st = self._state(vm)
        st.stats.promoted += len(regions)
        st.stats.in_place += len(regions)
        self.ctx.metrics.hugepage_promoted.inc(len(pages))
        self.on_moved(vm, pages)

    def _abort(self, vm: VM, pages: Pages) -> None:
        """Released pages not collapsed keep their frames; validation maps them again."""
        if len(pages) == 0:
            return
        page_move.keep(vm, pages)
        self._state(vm).stats.aborted += len(distinct(pages // PAGES_PER_2M))
        self.on_moved(vm, pages)

    # ---- faults ---------------------------------------------------------------------------

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Complete the region's copy now (one 2 MiB copy), then map the page's new frame;
        without a run the region keeps its frames (CANCEL)."""
        done = self.collapse(vm, bpn // PAGES_PER_2M)
        if done:
            self._state(vm).stats.fault_completions += 1
        return page_move.fault_reply(self.ctx, vm, bpn, done)

    def on_vm_gone(self, vm: VM) -> None:
        self.vms.pop(vm.vm_id, None)
