"""Content-based page sharing (as ESX and Linux's KSM): identical pages share one frame.

**Scanning** is the platform's own background work, like Linux's ksmd: a scanner task walks a
clock hand over each VM's pages at a rate that covers the whole guest once per
``share_scan_period`` (an allowance that accrues with time, never more than a short burst),
and hashes (xxh3-64) the private pages where they are, while the guest runs on, in chunks
that yield to the event loop. Only likely duplicates become candidates:

- a zero page, or a page whose hash is in the table of merged frames;
- a page whose hash was the same at its previous scan (stable content: KSM's volatility
  check) and equals that of another such page seen earlier (the "unstable" table).

Unique pages are never invalidated, so the guest pays no fault for them. Candidates wait in
a bounded queue per VM; the VM's low-priority rounds hand them to the VMM in PAGE_SHARING
batches sized to the time bound (that exchange, and the VMM's invalidations, are what the
guest's time pays for). A candidate no VMM maps is merged by the scanner at once.

**Merging** (asynchronously, after the VMM released the pages, in chunks that yield to the
event loop): each page is hashed again (its frame is stable now) and compared byte for byte
with the frame it would share; a zero page merges into the node's zero frame, a page matching
a merged frame maps it (one more reference) and frees its own frame, and a page that had an
unstable partner becomes a new merged frame itself, which the partner joins when the hand
reaches it. A page that changed or collided stays private. Merged pages are RESIDENT: the
next touch maps the shared frame read-only (REMAP), a write copies it (COW).

**Faults while in flight:** a write cancels that page's merge and gets its own frame back at
once; a read completes that page's merge first, then maps the result.

**Singletons:** a merged frame left with one sharer (the others wrote to their copies) goes
back to being that page's private frame when the hand passes it, so swap can take it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.constants import PAGE_SIZE, FaultReason, PageState, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from ..p2m import FLAG_MERGED, FLAG_SHARED, NO_OP
from .base import LowPriorityService, Pages, Selection

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

ZERO_BYTES = bytes(PAGE_SIZE)
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_BYTES)
#: Seconds of scanning allowance a VM may bank (two 10 Hz ticks): no flood after a stall.
BURST_SECONDS = 0.2
#: A scan looks at no more than this many p2m entries per page it may hash.
SCAN_FACTOR = 8
#: Pages hashed per step of the scanner before it yields to the event loop: ~0.4 ms here, a
#: fault's wait at worst; smaller steps pay the step's fixed NumPy work on fewer pages.
SCAN_CHUNK = 256
#: Bounds of the scanner's sleep while no VM has a step's allowance: it sleeps until the
#: first VM has one. Why not a fixed short tick: at the default rate a VM earns a few pages
#: per 20 ms, and a step's fixed cost on a few pages kept an idle host's daemon busy
#: (1.2 % of a CPU per idle VM); a whole step at a time costs the same per page, ~50x rarer.
SCAN_IDLE_SECONDS = 0.02
SCAN_MAX_SLEEP = 1.0
#: Candidates queued per VM, at most, before its scan pauses for the rounds to catch up.
MAX_CANDIDATES = 4096
#: The scan rate shown in status is measured over at least this many seconds.
RATE_SECONDS = 1.0
#: Pages merged per step of an asynchronous merge before it yields to the event loop.
MERGE_CHUNK = 64
#: Entries of the unstable table (hint -> a page seen with it) before it is flushed.
UNSTABLE_LIMIT = 1 << 20
#: Bits of a page's scan ``marks``: ``hint`` holds its content at its last scan ...
_HINTED = 1
#: ... and the page is the unstable table's entry for that (unchanged) hint: nothing to look up.
_REGISTERED = 2
_NOT_REGISTERED = ~_REGISTERED & 0xFF
_HINT_BITS = 0xFFFFFFFF
_EXPOSED, _RESIDENT = int(PageState.EXPOSED), int(PageState.RESIDENT)
_IN_FLIGHT = int(PageState.IN_FLIGHT)
_SHARING = int(ServiceType.PAGE_SHARING)


@dataclass
class _VMScan:
    vm: VM
    #: Each page's hint: the low 32 bits of its xxh3-64 at its last scan (5 bytes per page
    #: with ``marks``, the scan's whole per-page cost). Why 32 bits are enough: the hint only
    #: picks candidates (stable content, a likely partner); a false match (one in 2**32 per
    #: comparison) costs one candidate's round trip, never a wrong merge: ``merge`` hashes
    #: the page again in full (64 bits, the shared table's key) and compares it byte for
    #: byte with the frame it would map. Such a page becomes a merged frame of its own with
    #: no partner, which ``_unshare_singletons`` hands back after two passes; while both
    #: pages stay unchanged this recurs every few passes. The cost, bounded: N distinct
    #: stable pages hold about N**2 / 2**33 such pairs (~130 at UNSTABLE_LIMIT entries),
    #: each a candidate every few passes and a copy-on-write if the guest writes it then.
    hint: npt.NDArray[np.uint32]
    marks: npt.NDArray[np.uint8]  # _HINTED | _REGISTERED
    hand: int = 0
    passes: int = 0  # times the hand went round
    scan_rate: float = 0.0  # pages hashed per second, over the last RATE_SECONDS or more
    _rate_mark: tuple[float, int] | None = None
    tokens: float = 0.0
    last: float | None = None
    candidates: list[int] = field(default_factory=list)  # BPNs to hand to the VMM


class PageSharingService(LowPriorityService):
    """Finds duplicate pages by scanning, merges them, and breaks merges on write faults."""

    service = ServiceType.PAGE_SHARING

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.scan_period = ctx.config.share_scan_period
        self.scans: dict[int, _VMScan] = {}
        self.unstable: dict[int, int] = {}
        self.mm = ctx.machine.file.mm
        self.view = memoryview(self.mm)

    def configure(self, scan_period: float | None = None) -> None:
        if scan_period is not None:
            self.scan_period = scan_period

    # ---- scanning -------------------------------------------------------------------------

    def _scan_state(self, vm: VM) -> _VMScan:
        st = self.scans.get(vm.vm_id)
        if st is None:
            n = vm.guest_pages
            st = _VMScan(vm, np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.uint8))
            self.scans[vm.vm_id] = st
        return st

    @staticmethod
    def _step(vm: VM) -> int:
        """Pages one scanner step hashes (a whole guest when it is smaller than a step)."""
        return min(SCAN_CHUNK, vm.guest_pages)

    def _accrue(self, vm: VM, st: _VMScan, now: float) -> None:
        rate = vm.guest_pages / self.scan_period
        if st.last is not None:
            burst = max(float(self._step(vm)), rate * BURST_SECONDS)
            st.tokens = min(burst, st.tokens + rate * max(0.0, now - st.last))
        st.last = now

    def _seconds_to_step(self, st: _VMScan) -> float:
        """Seconds until ``st``'s VM has earned a whole step."""
        rate = st.vm.guest_pages / self.scan_period
        return max(0.0, self._step(st.vm) - st.tokens) / rate

    async def scanner(self) -> None:
        """The background scan: each VM's allowance a whole step at a time, yielding between
        steps, sleeping until the first VM has earned its next step."""
        while True:
            now = self.ctx.clock()
            hashed = 0
            sleep = SCAN_MAX_SLEEP
            for st in list(self.scans.values()):
                if st.vm.alive:
                    self._measure_rate(st, now)
                    self._accrue(st.vm, st, now)
                    if st.tokens >= self._step(st.vm) and len(st.candidates) < MAX_CANDIDATES:
                        hashed += self.scan(st.vm, self._step(st.vm))
                        await asyncio.sleep(0)
                    sleep = min(sleep, self._seconds_to_step(st))
            if hashed == 0:
                await asyncio.sleep(min(SCAN_MAX_SLEEP, max(SCAN_IDLE_SECONDS, sleep)))

    @staticmethod
    def _measure_rate(st: _VMScan, now: float) -> None:
        scanned = st.vm.stats.sharing_scanned
        if st._rate_mark is None:
            st._rate_mark = (now, scanned)
        elif now - st._rate_mark[0] >= RATE_SECONDS:
            st.scan_rate = (scanned - st._rate_mark[1]) / (now - st._rate_mark[0])
            st._rate_mark = (now, scanned)

    def scan_rate(self, vm: VM) -> float:
        """Pages of ``vm`` hashed per second lately (0 before the first second)."""
        st = self.scans.get(vm.vm_id)
        return 0.0 if st is None else st.scan_rate

    def background(self) -> Coroutine[Any, Any, None]:
        return self.scanner()

    def scan(self, vm: VM, budget: int) -> int:
        """Hash up to ``budget`` private pages under the hand; queue likely duplicates.

        Returns the pages hashed.
        """
        st = self._scan_state(vm)
        p2m, n = vm.p2m, vm.guest_pages
        window = (st.hand + np.arange(min(n, budget * SCAN_FACTOR), dtype=np.int64)) % n
        state, flags = p2m.state[window], p2m.flags[window]
        self._unshare_singletons(vm, window[(flags & FLAG_MERGED) != 0])
        eligible = window[((state == _EXPOSED) | (state == _RESIDENT)) & (flags == 0)][:budget]
        frames = p2m.frame[eligible].astype(np.int64)  # byte offsets follow: no int32
        t0 = time.perf_counter()
        room = MAX_CANDIDATES - len(st.candidates)
        hashes, picked = self._classify(vm, st, eligible, frames, room)
        hashed = len(hashes)
        if hashed:
            st.hint[eligible[:hashed]] = _hints(hashes)
            st.marks[eligible[:hashed]] |= _HINTED
        # Continue after the last page hashed, or after the window when it ran out.
        old_hand = st.hand
        if hashed == len(eligible) and len(eligible) < budget:
            st.hand = int((window[-1] + 1) % n)
        elif hashed:
            st.hand = int((eligible[hashed - 1] + 1) % n)
        if st.hand <= old_hand and (hashed or len(window)):
            st.passes += 1
        # Looking costs allowance too: a window with nothing to hash (memory the guest never
        # touched) is charged as the pages it could have held, so an idle VM's scan sleeps
        # like a busy one's instead of sweeping its window 50 times a second.
        st.tokens -= max(hashed, len(window) // SCAN_FACTOR, 1)
        vm.stats.sharing_scanned += hashed
        self.ctx.metrics.sharing_scanned.inc(hashed)
        self.ctx.metrics.sharing_scan_seconds.inc(time.perf_counter() - t0)
        bpns = eligible[picked]
        resident = p2m.state[bpns] == _RESIDENT
        if resident.any():  # no VMM maps these: merge them now, without a batch
            self.merge(vm, bpns[resident])
        st.candidates.extend(bpns[~resident].tolist())
        return hashed

    def pending_work(self, vm: VM, now: float) -> int:
        st = self.scans.get(vm.vm_id)
        if st is None:
            self._scan_state(vm)  # the scanner starts on this VM
            return 0
        return len(st.candidates)

    def select_work(self, vm: VM, capacity: int, units: int, now: float) -> Selection:
        """Hand out up to ``units`` queued candidates that are still mapped and private."""
        st = self._scan_state(vm)
        take = min(capacity, units, len(st.candidates))
        if take <= 0:
            return Selection.empty()
        bpns = np.array(st.candidates[:take], dtype=np.int64)
        del st.candidates[:take]
        p2m = vm.p2m
        bpns = distinct(bpns[(p2m.state[bpns] == _EXPOSED) & (p2m.flags[bpns] == 0)])
        return Selection(bpns, p2m.frame[bpns].astype(np.int64), take)

    def _classify(
        self,
        vm: VM,
        st: _VMScan,
        bpns: Pages,
        frames: npt.NDArray[np.int64],
        capacity: int,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """Hash the pages and pick likely duplicates, at most ``capacity`` of them.

        Returns the hashes of the pages looked at (those up to the last candidate when
        ``capacity`` cut the scan short) and the indices of the candidates.
        """
        view = self.view
        # One tight loop of hashes; everything else on whole arrays, or on Python lists:
        # indexing NumPy arrays one element at a time costs more than the hash itself.
        hashed = [
            xxhash.xxh3_64_intdigest(view[o : o + PAGE_SIZE]) for o in (frames * PAGE_SIZE).tolist()
        ]
        hashes = np.array(hashed, dtype=np.uint64)
        usable = ~self.ctx.machine.failing[frames]  # a failing frame is page-retire's
        zero = usable & (hashes == np.uint64(ZERO_HASH))
        known = usable & ~zero & self.ctx.shared.in_table(hashes)
        # Same content as at its last scan (KSM's volatility check): may pair with another.
        hints = _hints(hashes)
        marks = st.marks[bpns]
        hinted = (marks & _HINTED) != 0
        steady = usable & ~zero & ~known & hinted & (st.hint[bpns] == hints)
        unstable, base = self.unstable, vm.vm_id << 32
        was = (marks & _REGISTERED) != 0
        registered = was & steady  # a page whose content changed lost it
        # ... and its entry, under the hash of its last scan (st.hint, updated after this):
        # left in the table, entries of changed pages pile up without bound (the soak grew
        # the daemon by ~10 kB/s with them).
        lost = np.flatnonzero(was & ~registered)
        for bpn, old in zip(bpns[lost].tolist(), st.hint[bpns[lost]].tolist(), strict=True):
            if unstable.get(old) == base | bpn:
                del unstable[old]
        st.marks[bpns] = (marks & _NOT_REGISTERED) | (registered.astype(np.uint8) * _REGISTERED)
        found = np.flatnonzero(zero | known).tolist()
        todo = np.flatnonzero(steady & ~registered)
        newly: list[int] = []  # pages that become (again) their content's unstable entry
        if len(unstable) + len(todo) > UNSTABLE_LIMIT:
            self._flush_unstable()
        for i, bpn in zip(todo.tolist(), bpns[todo].tolist(), strict=True):
            h = hashed[i] & _HINT_BITS  # the unstable table is keyed by hints
            key = base | bpn
            other = unstable.get(h)
            if other is None or other == key:  # new content, or its own entry from before
                unstable[h] = key
                newly.append(bpn)
            elif self._still_there(other, h):
                found.append(i)
                self._queue_partner(other)  # both merge soon: this one first, then it joins
            else:  # the entry's page changed or left: this one takes over
                self._unregister(other)
                unstable[h] = key
                newly.append(bpn)
        st.marks[newly] |= _REGISTERED
        picked = np.array(sorted(found), dtype=np.int64)
        if len(picked) > capacity:  # the rest is hashed again when the hand comes back
            picked = picked[:capacity]
            hashes = hashes[: picked[-1] + 1]
        return hashes, picked

    def _queue_partner(self, key: int) -> None:
        """Make the unstable entry's page a candidate of its own VM, to join the new frame."""
        st = self.scans.get(key >> 32)
        if st is not None and len(st.candidates) < MAX_CANDIDATES:
            st.candidates.append(key & 0xFFFFFFFF)

    def _unregister(self, key: int) -> None:
        st = self.scans.get(key >> 32)
        if st is not None:
            st.marks[key & 0xFFFFFFFF] &= _NOT_REGISTERED

    def _flush_unstable(self) -> None:
        """KSM rebuilds its unstable tree every pass; here it is dropped when it is full."""
        self.unstable.clear()
        for st in self.scans.values():
            st.marks &= _NOT_REGISTERED

    def _still_there(self, key: int, hint: int) -> bool:
        """Whether the unstable entry's page is still private with that hint."""
        st = self.scans.get(key >> 32)
        if st is None or not st.vm.alive:
            return False
        bpn = key & 0xFFFFFFFF
        p2m = st.vm.p2m
        return bool(
            p2m.flags[bpn] == 0
            and p2m.state[bpn] in (_EXPOSED, _RESIDENT)
            and st.marks[bpn] & _HINTED
            and int(st.hint[bpn]) == hint
        )

    def _unshare_singletons(self, vm: VM, merged: Pages) -> None:
        """Merged frames left with one sharer become that page's private frame again."""
        if len(merged) == 0:
            return
        shared, p2m = self.ctx.shared, vm.p2m
        frames = p2m.frame[merged]
        # A frame that had company, or a new one whose partner did not join within a whole
        # pass: a new frame gets that long, since its partner joins when its round comes.
        st = self._scan_state(vm)
        waited = st.passes - shared.born[frames] >= 2
        alone = merged[(shared.refs[frames] == 1) & (shared.joined[frames] | waited)]
        for bpn in alone.tolist():
            shared.make_private(int(p2m.frame[bpn]), vm.vm_id, bpn)
        p2m.flags[alone] = 0

    # ---- merging --------------------------------------------------------------------------

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        epochs = vm.p2m.epoch[accepted].copy()
        self.ctx.spawn(self._merge_later(vm, accepted, epochs))

    async def _merge_later(self, vm: VM, bpns: Pages, epochs: npt.NDArray[np.uint32]) -> None:
        """Merge in chunks, yielding between them so faults (and other VMs) go first."""
        p2m = vm.p2m
        for start in range(0, len(bpns), MERGE_CHUNK):
            await asyncio.sleep(0)
            if not vm.alive:
                return
            chunk, ep = bpns[start : start + MERGE_CHUNK], epochs[start : start + MERGE_CHUNK]
            ours = (p2m.state[chunk] == _IN_FLIGHT) & (p2m.op[chunk] == _SHARING)
            ours &= p2m.epoch[chunk] == ep
            self.merge(vm, chunk[ours])

    def merge(self, vm: VM, bpns: Pages) -> None:
        """Merge pages no VMM maps (in flight or resident); all end up RESIDENT."""
        if len(bpns) == 0:
            return
        machine, shared, p2m = self.ctx.machine, self.ctx.shared, vm.p2m
        st = self._scan_state(vm)
        zero = machine.zero_frame[vm.home_node]
        view, mm, failing = self.view, self.mm, machine.failing
        frames = p2m.frame[bpns]
        targets = np.full(len(bpns), -1, dtype=np.int64)  # frame to map, -1: keep own
        created = np.zeros(len(bpns), dtype=bool)
        for i, (bpn, mpn) in enumerate(zip(bpns.tolist(), frames.tolist(), strict=True)):
            if failing[mpn]:
                continue
            off = mpn * PAGE_SIZE
            h = xxhash.xxh3_64_intdigest(view[off : off + PAGE_SIZE])
            if h == ZERO_HASH and mm[off : off + PAGE_SIZE] == ZERO_BYTES:
                targets[i] = zero
                continue
            other = shared.lookup(h)
            if other is not None:
                toff = other * PAGE_SIZE
                if mm[off : off + PAGE_SIZE] == mm[toff : toff + PAGE_SIZE]:
                    targets[i] = other
                    shared.ref(other)
            elif st.marks[bpn] & _HINTED and int(st.hint[bpn]) == h & _HINT_BITS:
                shared.create(mpn, h, 1)  # the first of its content: the partner joins it
                shared.born[mpn] = st.passes
                created[i] = True
        joined = targets >= 0
        p2m.frame[bpns[joined]] = targets[joined]
        merged = bpns[joined | created]
        p2m.flags[merged] |= FLAG_SHARED | FLAG_MERGED
        p2m.state[bpns] = _RESIDENT
        p2m.op[bpns] = NO_OP
        machine.release_or_retire(frames[joined])  # the duplicates' own frames
        vm.stats.pages_merged += len(merged)
        metrics = self.ctx.metrics.sharing_merges
        is_zero = targets == zero
        for kind, count in (
            ("zero", int(np.count_nonzero(is_zero))),
            ("shared", int(np.count_nonzero(joined & ~is_zero))),
            ("new", int(np.count_nonzero(created))),
            ("unchanged", len(bpns) - int(np.count_nonzero(joined | created))),
        ):
            if count:
                metrics.labels(kind).inc(count)

    # ---- faults ---------------------------------------------------------------------------

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """A write cancels the page's merge (own frame back at once); a read completes it."""
        p2m, one = vm.p2m, np.array([bpn], dtype=np.int64)
        if write:
            vm.stats.sharing_aborted += 1
            self.ctx.metrics.sharing_aborted.inc()
            reason = FaultReason.CANCEL
        else:
            self.merge(vm, one)
            reason = FaultReason.COMPLETE
        p2m.state[bpn] = _EXPOSED
        p2m.op[bpn] = NO_OP
        p2m.epoch[bpn] += 1  # the pending merge chunk skips it
        return self.ctx.mapper.reply(vm, reason, one)

    def on_vm_gone(self, vm: VM) -> None:
        self.scans.pop(vm.vm_id, None)
        # Its entries would pair with nobody (``_still_there``) but stay for ever: VM ids
        # are never reused. One pass over the table, once per VM gone.
        self.unstable = {h: k for h, k in self.unstable.items() if k >> 32 != vm.vm_id}


def _hints(hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint32]:
    """The hint of each content hash: its low 32 bits."""
    return (hashes & np.uint64(_HINT_BITS)).astype(np.uint32)
