"""The agent's page-fault path: a guest touch of a page that is not exposed asks the platform.

Many vCPUs may fault at once; each BPN has at most one fault on the wire and every vCPU
touching it waits for that one. The number of faults outstanding is bounded (backpressure
agreed with the daemon). When a vCPU faults on the page right after its previous fault, the
guest is walking memory: the fault asks for fault-around, so one message maps many pages.
Replies are installed in the exposure table by the read callback itself, before any task
wakes, so a batch processed later always sees them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Container

import numpy as np

from shared.constants import MAX_FAULT_AROUND, NO_FRAME, FaultReason
from shared.messages import FAULT_FLAG_WRITABLE, Fault, FaultReply, Message

from .exposure import ExposureTable
from .link import Link, PlatformLink
from .rpc import ConnectionClosed

LATENCY_SAMPLES = 1 << 16
_REASONS = [r.name.lower() for r in FaultReason]


class FaultPath:
    """Sends faults, dedups them per BPN, installs replies, records latency."""

    def __init__(
        self, link: Link, exposure: ExposureTable, max_outstanding: int, around: int
    ) -> None:
        self.link = link
        self.exposure = exposure
        self.around = around
        self.slots = Slots(max_outstanding)
        #: BPNs with a fault out; the future, once a second vCPU waits for the same page.
        self.pending: dict[int, asyncio.Future[None] | None] = {}
        #: The BPNs of ``pending`` whose fault asked for fault-around (see ``may_map``).
        self.walking: set[int] = set()
        #: Pages the reply of a fault out may map: what the balloon must not give.
        self.may_map = MayMap(self.pending, self.walking)
        self.by_reason: Counter[str] = Counter()
        self.latencies = np.zeros(LATENCY_SAMPLES, dtype=np.float64)
        self.samples = 0
        self.faults = 0
        self.pages_mapped = 0
        #: Touches the monitor resolved itself: hidden mappings given back, no message.
        self.soft_faults = 0
        #: Called with the BPN of the first touch of a watched (sampled) page.
        self.on_watched_touch: Callable[[int], None] = lambda bpn: None
        # Callbacks (reason, seconds) after each fault: metrics, allocation-driven poll.
        self.on_fault_done: list[Callable[[str, float], None]] = []
        link.on_reply = self._on_reply

    def _on_reply(self, request_id: int, msg: Message) -> None:
        if type(msg) is not FaultReply:
            return
        exposure = self.exposure
        bpn = msg.bpn
        if msg.count == 1 and not exposure.watched.item(bpn):
            # The common case, with the reply's plain ints (no arrays). A page that is not
            # watched has no hidden mapping (exposure.py: hidden pages are watched), so there
            # is none to drop: a hidden mapping from before this fault (the sample hid the
            # old frame while it was on the wire) belongs to a watched page, installed below.
            exposure.frame[bpn] = msg.mpn
            exposure.writable[bpn] = msg.flag & FAULT_FLAG_WRITABLE != 0
        else:  # several pages, or a page armed by the sample while its fault was out
            writable = (msg.flags & FAULT_FLAG_WRITABLE) != 0
            self.exposure.install(msg.bpns, msg.mpns, writable)
        self.pages_mapped += msg.count

    def is_ready(self, bpn: int, write: bool) -> bool:
        return bool(self.exposure.frame[bpn] >= 0 and (not write or self.exposure.writable[bpn]))

    async def ensure(
        self, bpn: int, write: bool, sequential: bool = False, around: int | None = None
    ) -> None:
        """Return once ``bpn`` is exposed (and writable for a write).

        ``sequential``: the guest walks memory, so the fault asks for ``around`` neighbours
        (default: this path's own fault-around).

        The first vCPU to need a page sends the fault itself (no extra task); the others
        wait for it and look again, because its fault may not be enough for them (a read
        fault maps a page read-only, this vCPU may want to write) or may have failed.

        Every guest touch of a page it cannot use passes here first, so this is where a
        watched (sampled) page's first touch is counted and a hidden mapping is given back
        without a message.
        """
        exposure = self.exposure
        while True:
            # Checked on every pass: the sample may arm the page while a fault is out, and
            # then the reply is installed hidden, for this touch to count and unhide it.
            # ``.item()``: Python values, cheaper to test than NumPy scalars.
            if exposure.watched.item(bpn):
                self.on_watched_touch(bpn)
            if bpn in exposure.hidden and exposure.unhide(bpn):
                self.soft_faults += 1
            frame = exposure.frame.item(bpn)
            if frame >= 0 and (not write or exposure.writable.item(bpn)):
                return
            pending = self.pending
            if bpn in pending:
                # Another vCPU's fault is out: wait for it. Its future is made only now, by
                # the first waiter (most faults have none). asyncio.wait, not await: a
                # cancelled waiter must not cancel the future the others wait on.
                fut = pending[bpn]
                if fut is None:
                    fut = pending[bpn] = asyncio.get_running_loop().create_future()
                await asyncio.wait((fut,))
                continue
            pending[bpn] = None
            if write and frame >= 0:
                # A write to a read-only (shared) page: its reply maps a copy, and the daemon
                # may hand the old frame to its last other sharer, who writes it. Dropped now,
                # so no vCPU reads through the old mapping meanwhile: they fault and wait for
                # this one (the monitor's TLB shootdown).
                self.unmap(bpn)
            ahead = (self.around if around is None else around) if sequential else 0
            if ahead:
                self.walking.add(bpn)
            try:
                await self._fault(bpn, write, ahead)
            finally:
                if ahead:  # one fault per BPN at a time: only this one put it there
                    self.walking.discard(bpn)  # after the reply is installed (``_on_reply``)
                fut = pending.pop(bpn)
                if fut is not None:
                    fut.set_result(None)

    async def _fault(self, bpn: int, write: bool, around: int) -> None:
        slots = self.slots
        if slots.free:  # ``take_nowait`` inline: every fault but under backpressure
            slots.free -= 1
        else:
            await slots.take()
        try:
            t0 = time.perf_counter()
            try:
                reply: FaultReply = await self.link.request(Fault(bpn, write, around))
            except ConnectionClosed:
                # The daemon is gone. Its successor answers the fault anew: wait for it
                # (the agent resumes, or exits when none comes); the caller looks again.
                if isinstance(self.link, PlatformLink):
                    await self.link.wait_up()
                    return
                raise
            seconds = time.perf_counter() - t0
        finally:
            slots.give()
        self.faults += 1
        self.latencies[self.samples % LATENCY_SAMPLES] = seconds
        self.samples += 1
        reason = _REASONS[reply.reason]
        self.by_reason[reason] += 1
        for callback in self.on_fault_done:
            callback(reason, seconds)

    def unmap(self, bpn: int) -> None:
        exposure = self.exposure
        exposure.frame[bpn] = NO_FRAME
        exposure.writable[bpn] = False
        exposure.hidden.pop(bpn, None)  # none expected (a visible page is not hidden): cheap

    def latency_quantiles(self) -> dict[str, float]:
        n = min(self.samples, LATENCY_SAMPLES)
        if n == 0:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        sample = self.latencies[:n]
        p50, p99 = np.quantile(sample, [0.5, 0.99])
        return {"p50": float(p50), "p99": float(p99), "max": float(sample.max())}

    def reset_latencies(self) -> None:
        self.samples = 0


class Slots:
    """At most ``n`` faults out at once, first come first served.

    ``asyncio.Semaphore`` does this at a cost paid on every fault: its ``acquire`` is a
    coroutine and ``locked()`` scans the waiters with a generator (~0.8 µs per fault). Here a
    free slot is taken by a decrement of ``free``; a slot given back goes straight to the
    first waiter, so ``free`` is never above zero while anyone waits.
    """

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_nowait(self) -> bool:
        """Take a slot if one is free."""
        if self.free:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot, in turn (``take_nowait`` first: this always waits)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give()  # handed a slot, then cancelled before it ran: pass it on
            raise  # a cancelled future stays queued: ``give`` skips it

    def give(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to ``free``."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class MayMap(Container[int]):
    """The pages a reply still on the way may map: each fault's own page and, for a fault
    with fault-around, the ``MAX_FAULT_AROUND`` pages after it (a swap-in reads ahead up to
    the daemon's ``swap_readahead_max`` whatever fault-around was asked).

    Why the balloon must not give them: the daemon resolves a fault when it arrives, so it
    may have mapped a neighbour already (a fresh frame, a read-ahead page) when the balloon
    gives that page; the BALLOON completion then frees the frame, and the reply, which
    arrives after, maps the page to a frame that is free, soon another page's or another
    VM's (a data mismatch in both). Kept out until the reply is installed, a page goes in a
    later batch: mapped then, so the balloon drops the mapping it gives.
    """

    def __init__(self, pending: Container[int], walking: set[int]) -> None:
        self.pending = pending
        self.walking = walking

    def __contains__(self, page: object) -> bool:
        if page in self.pending:
            return True
        # A few faults out at most (the outstanding bound): a scan per page asked about.
        if not isinstance(page, int | np.integer):
            return False
        p = int(page)
        return any(0 < p - b <= MAX_FAULT_AROUND for b in self.walking)
