"""The agent's high-priority loop, as in the talk::

    while (req := await platform.get_request()) is not None:
        services[req.type].process(req)
        await platform.complete_request(req)

A round starts on a Kick from the daemon (action-driven), when a poll of the pending word
finds work (periodic), and after first-touch faults (the VMM allocated pages). Processing
a batch is synchronous from reading the slot to sending CompleteRequest, so no vCPU can
touch a page between the filter's decision and the daemon learning of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import structlog

from shared.constants import HIGH_PRIORITY_MASK, PageStatus, Priority, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import ControlRegion, SlotState
from shared.messages import CompleteRequest, GetRequest, Request

from .exposure import ExposureTable
from .rpc import RpcClient
from .services import FILTERS

log = structlog.get_logger("vmmem.vmm.rounds")


class HighPriorityLoop:
    """Runs rounds of release requests against the daemon."""

    def __init__(
        self, link: RpcClient, region: ControlRegion, exposure: ExposureTable, poll_interval: float
    ) -> None:
        self.link = link
        self.region = region
        self.exposure = exposure
        self.poll_interval = poll_interval
        self.services = {stype: cls(exposure) for stype, cls in FILTERS.items()}
        self.wake = asyncio.Event()
        self.rounds = 0
        self.batches: Counter[str] = Counter()
        self.pages: Counter[tuple[str, str]] = Counter()
        self.released_while_pinned: Counter[str] = Counter()
        self.on_batch: list[Callable[[str, float, np.ndarray], None]] = []

    def kick(self) -> None:
        """Action-driven wake-up (a Kick message, or pages just allocated)."""
        self.wake.set()

    def poll(self) -> None:
        """Allocation-driven check of the pending word: cheap, no message."""
        if self.region.pending & HIGH_PRIORITY_MASK:
            self.wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_interval)
            except TimeoutError:
                if not self.region.pending & HIGH_PRIORITY_MASK:
                    continue
            self.wake.clear()
            # A round serves a bounded number of batches per type; when work is still
            # pending after it, the next round starts at once instead of at the next poll.
            # A round in which nothing was released waits (everything refused, or nothing
            # offered), so a bit that stays set cannot make the two processes spin.
            while await self.round() and self.region.pending & HIGH_PRIORITY_MASK:
                await asyncio.sleep(0)  # let the vCPUs run between rounds

    async def round(self) -> int:
        """One round: batches until the daemon says the round is over; returns pages released."""
        self.rounds += 1
        released = 0
        while True:
            req: Request = await self.link.request(GetRequest(Priority.HIGH))
            if not req.has_work:
                return released
            released += self.process(req)

    def process(self, req: Request) -> int:
        """Filter, invalidate, write statuses and complete one batch (no await inside)."""
        t0 = time.perf_counter()
        slot = self.region.slot(req.slot)
        stype, state, count, seq = slot.read_header()
        if (
            state != SlotState.ISSUED
            or count != req.count
            or seq != req.seq
            or stype != req.service
        ):
            raise RemoteProtocolError(
                f"slot {req.slot} does not match Request {req}", ErrorCode.SLOT_NOT_ISSUED
            )
        bpns, status, mpns = slot.batch(count)
        service = ServiceType(stype)
        svc = self.services[service]
        accepted = svc.process(bpns, mpns, status)
        name = service.name.lower()
        pinned = int(np.count_nonzero(self.exposure.pinned[accepted]))
        if pinned:
            self.released_while_pinned[name] += pinned
        elapsed = time.perf_counter() - t0
        self.link.send(CompleteRequest(req.slot, count, seq, int(elapsed * 1e6)))
        self.batches[name] += 1
        counts = np.bincount(status, minlength=len(PageStatus))
        for st in PageStatus:
            if counts[st]:
                self.pages[(name, st.name.lower())] += int(counts[st])
        for callback in self.on_batch:
            callback(name, elapsed, counts)
        return len(accepted)
