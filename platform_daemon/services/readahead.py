"""Swap read-ahead validation: keep the read-ahead pages the guest touches, drop the rest.

A swap-in fault from a walking guest reads its swapped neighbours too (``swap.py``) and the
fault reply maps them, so a walk costs one fault per run. Until the guest touches such a
page, it is a bet: it costs a frame and the guest may never want it. So a read-ahead page
is *held*: IN_FLIGHT with op VALIDATION, mapped by the VMM, its frame **and its swap slot**
kept (the slot holds the same content, checksum included, as long as the guest has not
touched the page). No other service takes a held page (they take EXPOSED or RESIDENT ones).

After ``window`` seconds the page is validated at low priority: it goes back to the VMM in
a VALIDATION batch (the same service and class as remap validation, a separate queue) and
the VMM answers from its accessed bit, which it cleared when the page was last released:

- REFERENCED: the guest touched it with no fault, a fault avoided. The page becomes an
  ordinary exposed page and its slot is freed (the guest may have written it).
- UNTOUCHED: the VMM let it go; its frame is freed and it is SWAPPED again in its own slot:
  a frame recovered, with no write (the slot is still valid).
- anything else (pinned: BUSY, a page the VMM does not know as read-ahead): kept as an
  ordinary page, slot freed. Never a drop the VMM did not agree to.

A fault on a held page (the VMM released it in a batch that crossed the fault, or the balloon
cancels it) maps the same frame at once and frees the slot, like any page given back.

Under memory pressure holds end at once, without asking the VMM (``release_under_pressure``,
driven by memsched's tick): a held page cannot be reclaimed before its verdict, and verdicts
come with the guest's low-priority rounds, which follow guest progress, which a guest
waiting for a frame does not make. So while the host is at HARD or below, or a fault waits
for a free frame, every held page of every VM becomes an ordinary exposed page and its slot
is freed, as a REFERENCED verdict does (it is mapped and the guest may have written it), and
the swap path may take it; read-ahead pages mapped meanwhile are not held at all. Linux's
reclaim likewise takes read-ahead pages first. A verdict still out for such a page finds it
no longer held and is ignored (its epoch), as after a fault.

The verdicts also size the next read-ahead (``window_cap``): per VM, the share of its
recent read-ahead pages that the guest wanted (touched: REFERENCED, or faulted while held)
against those it let go untouched scales ``swap_readahead_max`` down, rounded up to a power
of two and never below one page (so verdicts keep coming and a walk that resumes grows it back). A
guest that walks swapped memory keeps the whole window; one whose read-ahead is mostly
dropped stops paying a read, a frame and a validation for pages it does not want. Linux
sizes swap read-ahead from its hits the same way (``swapin_nr_pages``: the hits since the
last read-ahead, rounded up to a power of two, halved at most per step).

Why a time window: Linux marks pages read ahead (PG_readahead), counts a hit when a later
fault finds one in the swap cache (the flag cleared on the first hit) and sizes the next
read-ahead from the hits; untouched read-ahead pages sit on the inactive list and reclaim
drops them as clean swap-cache pages, slot kept. There the "window" is a trip down the
inactive list. Here read-ahead follows a walk whose next pages the guest touches within
milliseconds, so a page untouched after ``window`` (1 s, ten low-priority rounds) is not
part of the walk, and dropping it needs no write, only the VMM's word.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import FaultReason, PageState, PageStatus, ServiceType
from shared.distinct import distinct
from shared.messages import FaultReply

from ..p2m import NO_OP, NO_SLOT
from .base import Pages

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

#: Seconds a read-ahead page is held before it is validated (see the module docstring).
WINDOW = 1.0
#: Verdicts the hit ratio remembers: past this many, both counts are halved (older
#: verdicts weigh half as much each time), so it follows a guest that changes its ways.
HIT_MEMORY = 256
#: Held pages queued per VM at most (1 GiB of read-ahead): past it the oldest holds end at
#: once (kept as ordinary pages, slot freed: as under pressure) and are counted as dropped.
#: A guest whose validations never run (no guest progress, no low-priority rounds) cannot
#: grow the queue, nor the pages pinned with their slots, without bound.
MAX_QUEUED = 1 << 18
_IN_FLIGHT, _EXPOSED = int(PageState.IN_FLIGHT), int(PageState.EXPOSED)
_SWAPPED, _VALIDATION = int(PageState.SWAPPED), int(ServiceType.VALIDATION)
_EMPTY = np.empty(0, dtype=np.int64)

log = structlog.get_logger("vmmem.platform.readahead")


@dataclass
class ReadAheadStats:
    """Per VM: what became of its read-ahead pages."""

    held: int = 0  # read ahead and held with their slot
    faults_avoided: int = 0  # validated: the guest touched them with no fault
    frames_recovered: int = 0  # dropped untouched: frame freed, SWAPPED in the same slot
    kept: int = 0  # validated but neither (pinned, unknown to the VMM): kept, slot freed
    faulted: int = 0  # faulted while held (released meanwhile, or the balloon's cancel)
    released_under_pressure: int = 0  # held when the host needed frames: kept, slot freed
    dropped: int = 0  # hold ended unvalidated, the queue full (MAX_QUEUED): kept, slot freed
    #: Recent verdicts, halved past HIT_MEMORY: wanted (touched, or faulted while held) and
    #: let go untouched. Their ratio sizes the read-ahead window (``window_cap``).
    recent_wanted: float = 0.0
    recent_unwanted: float = 0.0

    def verdicts(self, wanted: int, unwanted: int) -> None:
        self.recent_wanted += wanted
        self.recent_unwanted += unwanted
        while self.recent_wanted + self.recent_unwanted > HIT_MEMORY:
            self.recent_wanted /= 2
            self.recent_unwanted /= 2

    def hit_ratio(self) -> float:
        """Share of recent read-ahead pages the guest wanted; 1 before any verdict."""
        total = self.recent_wanted + self.recent_unwanted
        return self.recent_wanted / total if total else 1.0


class _DueQueue:
    """Held pages in due order, in chunks: one per ``hold`` (its pages share a due time).

    Counting the due pages is a bisection over the chunks' due times and a difference of
    running counts, whatever the queue holds (``pending`` runs for every GetRequest of every
    low-priority round); popping and dropping work per chunk, with NumPy slices. Due times
    are non-decreasing (the daemon's clock is monotonic and the window fixed).
    """

    def __init__(self) -> None:
        self.dues: deque[float] = deque()
        self.bpns: deque[npt.NDArray[np.int64]] = deque()
        self.epochs: deque[npt.NDArray[np.int64]] = deque()
        #: Entries ever queued up to the end of each chunk, and ever taken off the front.
        self.ends: deque[int] = deque()
        self.taken = 0
        self.head = 0  # entries of the first chunk already taken

    def __len__(self) -> int:
        return self.ends[-1] - self.taken if self.ends else 0

    def push(self, due: float, bpns: Pages, epochs: npt.NDArray[np.integer[Any]]) -> None:
        end = (self.ends[-1] if self.ends else self.taken) + len(bpns)
        self.dues.append(due)
        self.bpns.append(bpns.astype(np.int64, copy=True))
        self.epochs.append(epochs.astype(np.int64, copy=True))
        self.ends.append(end)

    def due(self, now: float) -> int:
        """Entries due at ``now``."""
        k = bisect_right(self.dues, now)
        return self.ends[k - 1] - self.taken if k else 0

    def pop(self, n: int, now: float | None = None) -> tuple[Pages, npt.NDArray[np.int64]]:
        """Up to ``n`` entries off the front (only due ones, unless ``now`` is None)."""
        bs: list[Pages] = []
        es: list[npt.NDArray[np.int64]] = []
        while n > 0 and self.dues and (now is None or self.dues[0] <= now):
            b, e = self.bpns[0], self.epochs[0]
            take = min(n, len(b) - self.head)
            bs.append(b[self.head : self.head + take])
            es.append(e[self.head : self.head + take])
            self.head += take
            self.taken += take
            n -= take
            if self.head == len(b):
                self.dues.popleft()
                self.bpns.popleft()
                self.epochs.popleft()
                self.ends.popleft()
                self.head = 0
        if not bs:
            return _EMPTY, _EMPTY
        return np.concatenate(bs), np.concatenate(es)


@dataclass
class _VMQueue:
    vm: VM
    #: Held pages in due order (they are held in time order).
    due: _DueQueue = field(default_factory=_DueQueue)
    #: Pages out in a validation batch: bpn -> epoch when it was handed out.
    out: dict[int, int] = field(default_factory=dict)
    stats: ReadAheadStats = field(default_factory=ReadAheadStats)


class ReadAheadValidation:
    """Holds read-ahead pages and validates them; ``ValidationService`` drives it."""

    def __init__(
        self, ctx: ServiceContext, window: float = WINDOW, max_queued: int = MAX_QUEUED
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.ctx = ctx
        self.window = window
        self.max_queued = max_queued
        self.vms: dict[int, _VMQueue] = {}
        #: The host needs frames (memsched's tick says): no page is held.
        self.pressure = False
        # Looked up once, at the first hold (a child shows in the metrics from its creation):
        # a ``labels()`` call costs a few µs, and ``hold`` runs per swap-in.
        self._held_pages: Any = None

    def hold(self, vm: VM, bpns: Pages) -> None:
        """Read-ahead pages just mapped by a fault reply: held, slot kept, due after window;
        under pressure not held at all (ordinary exposed pages, slots freed)."""
        if len(bpns) == 0:
            return
        if self.pressure:
            q = self._queue(vm)
            self._keep(vm, bpns)
            self._count_released(q, len(bpns))
            return
        p2m = vm.p2m
        p2m.state[bpns] = _IN_FLIGHT
        p2m.op[bpns] = _VALIDATION
        epochs = p2m.epoch[bpns] + 1  # one fancy read, not two (``+=`` then the queue's)
        p2m.epoch[bpns] = epochs
        q = self._queue(vm)
        q.due.push(self.ctx.clock() + self.window, bpns, epochs)
        q.stats.held += len(bpns)
        if self._held_pages is None:
            self._held_pages = self.ctx.metrics.readahead_pages.labels("held")
        self._held_pages.inc(len(bpns))
        if len(q.due) > self.max_queued:
            self._drop_oldest(vm, q, len(q.due) - self.max_queued)

    def _drop_oldest(self, vm: VM, q: _VMQueue, n: int) -> None:
        """The queue is full: the oldest ``n`` entries' holds end unvalidated (kept)."""
        bpns, epochs = q.due.pop(n)
        held = bpns[self._held(vm, bpns, epochs)]
        self._keep(vm, held)
        q.stats.dropped += len(held)
        if len(held):
            self.ctx.metrics.readahead_pages.labels("dropped").inc(len(held))
            log.debug("readahead_queue_full", vm=vm.name, dropped=len(held))

    def _queue(self, vm: VM) -> _VMQueue:
        q = self.vms.get(vm.vm_id)
        if q is None:
            q = self.vms[vm.vm_id] = _VMQueue(vm)
        return q

    @staticmethod
    def _held(vm: VM, bpns: Pages, epochs: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``bpns`` are still the same hold (no fault, drop or new hold since)."""
        p2m = vm.p2m
        mask: npt.NDArray[np.bool_] = (
            (p2m.state[bpns] == _IN_FLIGHT) & (p2m.op[bpns] == _VALIDATION)
        ) & (p2m.epoch[bpns] == epochs)
        return mask

    def pending(self, vm: VM, now: float) -> int:
        """Held pages due for validation (stale entries included: popping them is work)."""
        q = self.vms.get(vm.vm_id)
        if q is None:
            return 0
        return q.due.due(now)

    def select(self, vm: VM, n: int, now: float) -> tuple[Pages, npt.NDArray[np.int64], int]:
        """Up to ``n`` due pages still held, with their frames; and the entries looked at."""
        q = self.vms.get(vm.vm_id)
        if q is None:
            return _EMPTY, _EMPTY, 0
        bpns, epochs = q.due.pop(n, now)
        if len(bpns) == 0:
            return _EMPTY, _EMPTY, 0
        looked = len(bpns)
        keep = self._held(vm, bpns, epochs)
        bpns, epochs = bpns[keep], epochs[keep]
        q.out.update(zip(bpns.tolist(), epochs.tolist(), strict=True))
        return bpns, vm.p2m.frame[bpns].astype(np.int64), looked

    def complete(self, vm: VM, bpns: Pages, status: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
        """The VMM's verdicts on the read-ahead pages of a batch; returns which pages of the
        batch were handed out as read-ahead (a page SELECTED now is remap validation's)."""
        ours = np.zeros(len(bpns), dtype=bool)
        q = self.vms.get(vm.vm_id)
        if q is None or not q.out:
            return ours
        epochs = np.full(len(bpns), -1, dtype=np.int64)
        selected = vm.p2m.state[bpns] == PageState.SELECTED
        for i, bpn in enumerate(bpns.tolist()):
            if not selected[i] and bpn in q.out:
                ours[i], epochs[i] = True, q.out.pop(bpn)
        if not ours.any():
            return ours
        held = ours & self._held(vm, bpns, epochs)
        touched = held & (status == PageStatus.REFERENCED)
        untouched = held & (status == PageStatus.UNTOUCHED)
        self._drop(vm, bpns[untouched])
        self._keep(vm, bpns[held & ~untouched])
        counts = {
            "fault_avoided": int(touched.sum()),
            "frame_recovered": int(untouched.sum()),
            "kept": int((held & ~touched & ~untouched).sum()),
        }
        q.stats.verdicts(counts["fault_avoided"], counts["frame_recovered"])
        q.stats.faults_avoided += counts["fault_avoided"]
        q.stats.frames_recovered += counts["frame_recovered"]
        q.stats.kept += counts["kept"]
        for outcome, count in counts.items():
            if count:
                self.ctx.metrics.readahead_pages.labels(outcome).inc(count)
        return ours

    def set_pressure(self, pressure: bool) -> int:
        """memsched's word, each tick: does the host need frames? If so every hold of every
        VM ends now (see the module docstring); returns the pages released."""
        self.pressure = pressure
        if not pressure:
            return 0
        released = 0
        for q in self.vms.values():
            if q.due or q.out:
                released += self._release_vm(q.vm, q)
        if released:
            log.debug("readahead_released_under_pressure", pages=released)
        return released

    def _release_vm(self, vm: VM, q: _VMQueue) -> int:
        """End the VM's holds: O(entries queued or out), whatever the guest's size."""
        n_out = len(q.out)
        due_bpns, due_epochs = q.due.pop(len(q.due))
        # Out entries stay: their verdict must still be recognised as ours.
        bpns = np.concatenate((due_bpns, np.fromiter(q.out.keys(), np.int64, n_out)))
        epochs = np.concatenate((due_epochs, np.fromiter(q.out.values(), np.int64, n_out)))
        held = distinct(bpns[self._held(vm, bpns, epochs)])
        self._keep(vm, held)
        self._count_released(q, len(held))
        return len(held)

    def _count_released(self, q: _VMQueue, n: int) -> None:
        if n:
            q.stats.released_under_pressure += n
            self.ctx.metrics.readahead_pages.labels("released_under_pressure").inc(n)

    def _keep(self, vm: VM, bpns: Pages) -> None:
        """An ordinary exposed page from now on: the guest may write it, so the slot goes."""
        p2m, swap = vm.p2m, self.ctx.swap
        slots = p2m.swap_slot[bpns].astype(np.int64)
        p2m.swap_slot[bpns] = NO_SLOT
        p2m.state[bpns] = _EXPOSED
        p2m.op[bpns] = NO_OP
        if swap is not None:
            swap.release(slots)

    def _drop(self, vm: VM, bpns: Pages) -> None:
        """The VMM let the pages go untouched: the slot still holds them, the frame goes."""
        if len(bpns) == 0:
            return
        p2m = vm.p2m
        frames = p2m.frame[bpns].astype(np.int64)
        p2m.state[bpns] = _SWAPPED
        p2m.frame[bpns] = -1
        p2m.op[bpns] = NO_OP
        self.ctx.machine.release_or_retire(frames)
        vm.stats.swapped_out += len(bpns)

    def on_fault(self, vm: VM, bpn: int) -> FaultReply:
        """A held page faulted: the same frame back at once, the slot freed."""
        one = np.array([bpn], dtype=np.int64)
        self._keep(vm, one)  # no longer held: a batch still out with it leaves it alone
        q = self._queue(vm)
        q.stats.faulted += 1
        q.stats.verdicts(1, 0)  # the guest wanted it (the read-ahead was right)
        self.ctx.metrics.readahead_pages.labels("faulted").inc()
        return self.ctx.mapper.reply(vm, FaultReason.REMAP, one)

    def window_cap(self, vm: VM, cap: int) -> int:
        """The most pages the VM's next swap-in may read ahead: ``cap`` scaled by the share of
        its recent read-ahead the guest wanted, rounded up to a power of two (as Linux rounds
        its hits), at least 1 while ``cap`` is (see the module docstring)."""
        q = self.vms.get(vm.vm_id)
        if q is None or cap <= 1:
            return cap
        scaled = max(1, math.ceil(cap * q.stats.hit_ratio()))
        return min(cap, 1 << (scaled - 1).bit_length())

    def stats(self, vm: VM) -> ReadAheadStats:
        q = self.vms.get(vm.vm_id)
        return q.stats if q is not None else ReadAheadStats()

    def status(self, vm: VM) -> dict[str, object]:
        """What ``vmmem-ctl status`` shows: pages held now (a p2m scan) and the payoff."""
        st, p2m = self.stats(vm), vm.p2m
        validated = st.faults_avoided + st.frames_recovered + st.kept
        counts = {k: v for k, v in vars(st).items() if not k.startswith("recent_")}
        return {
            "held_now": int(np.count_nonzero((p2m.state == _IN_FLIGHT) & (p2m.op == _VALIDATION))),
            **counts,
            "validated": validated,
            "hit_ratio": round(st.hit_ratio(), 3),
            "window_cap": self.window_cap(vm, self.ctx.config.swap_readahead_max),
            "faults_avoided_per_validation": (
                round(st.faults_avoided / validated, 3) if validated else None
            ),
        }

    def on_vm_gone(self, vm: VM) -> None:
        """The VM's frames and slots are freed with its p2m; only the queue goes here."""
        self.vms.pop(vm.vm_id, None)
