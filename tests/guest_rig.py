"""A fake platform daemon for the agent's guest model and balloon driver, and the real agent
parts around it (no socket, no process).

``FakeDaemon`` is what the agent's FaultPath and BatchProcessor use of the link, with a
daemon's page states behind it: a page is ZERO (never touched, or freed by the balloon) or
backed by its own frame (frame = BPN, in a NumPy array standing in for machine memory). A
fault on a ZERO page zeroes its frame, as a first touch does. A completed BALLOON batch is
checked as the daemon checks it (count within what was offered, pages in range, distinct,
status OK, the balloon's size already reported in the control region) and frees its pages:
they are ZERO again and their frames are *poisoned*, so a read through a mapping the agent
should have dropped would mismatch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import PAGE_SIZE, PageStatus, ServiceType
from shared.layout import ControlRegion, SlotState, region_size
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    CompleteRequest,
    Fault,
    FaultReply,
    Message,
    Request,
)
from shared.workload import Phase
from vmm_agent.balloon import BalloonDriver
from vmm_agent.batches import BatchProcessor
from vmm_agent.exposure import ExposureTable
from vmm_agent.fault_path import FaultPath
from vmm_agent.guest import GuestMemory
from vmm_agent.guest_os import GuestOS
from vmm_agent.guest_time import GuestGate, GuestProgress
from vmm_agent.runner import WorkloadRunner
from vmm_agent.sampler import Sampler
from vmm_agent.touches import TouchLog

POISON = 0xA5


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDaemon:
    """The link of FaultPath and BatchProcessor, and the daemon's view of every page."""

    def __init__(self, region: ControlRegion, frames: npt.NDArray[np.uint8]) -> None:
        self.region = region
        self.frames = frames
        self.backed = np.zeros(len(frames), dtype=bool)
        self.on_reply: Callable[[int, Message], None] | None = None
        self.sent: list[Message] = []
        self.faults: list[Fault] = []
        self.offered: dict[int, int] = {}  # slot -> pages offered
        self.seq = 0
        #: Pages freed by BALLOON batches, in order.
        self.ballooned: list[int] = []
        #: When set, faults wait for it (a fault in flight).
        self.hold: asyncio.Event | None = None
        #: Fault-around: neighbours after the faulting page a fault also maps (ZERO ones).
        self.around = 0

    # ---- faults (FaultPath's link) ---------------------------------------------------------

    async def request(self, msg: Message) -> FaultReply:
        assert isinstance(msg, Fault)
        self.faults.append(msg)
        if self.hold is not None:
            await self.hold.wait()
        pages = [msg.bpn]
        if self.around:
            nxt = range(msg.bpn + 1, min(len(self.frames), msg.bpn + 1 + self.around))
            pages += [b for b in nxt if not self.backed[b]]
        bpns = np.asarray(pages, dtype=np.int64)
        fresh = bpns[~self.backed[bpns]]
        self.frames[fresh] = 0  # first touch: a zeroed frame
        self.backed[fresh] = True
        reply = FaultReply(
            0,
            bpns.astype(np.uint64),
            bpns.copy(),
            np.full(len(bpns), FAULT_FLAG_WRITABLE, dtype=np.uint8),
        )
        assert self.on_reply is not None
        self.on_reply(len(self.faults), reply)
        return reply

    # ---- batches (BatchProcessor's link) ---------------------------------------------------

    def offer_balloon(self, wanted: int, slot: int = 0) -> Request:
        """A BALLOON batch as the daemon hands it out: room for ``wanted``, no pages."""
        self.seq += 1
        zeros = np.zeros(wanted, dtype=np.int64)
        self.region.slot(slot).fill(ServiceType.BALLOON, self.seq, zeros, zeros)
        self.offered[slot] = wanted
        return Request(int(ServiceType.BALLOON), slot, wanted, self.seq)

    def send(self, msg: Message) -> None:
        self.sent.append(msg)
        assert isinstance(msg, CompleteRequest)
        slot = self.region.slot(msg.slot)
        stype, state, count, seq = slot.read_header()
        assert state == SlotState.ISSUED and seq == msg.seq
        if stype != ServiceType.BALLOON:
            return
        assert msg.count <= self.offered.pop(msg.slot), "more pages than offered"
        pages = slot.bpn[: msg.count].astype(np.int64)
        assert (pages < len(self.frames)).all(), "a page out of range"
        assert len(np.unique(pages)) == len(pages), "a page listed twice"
        assert (slot.status[: msg.count] == PageStatus.OK).all(), "a page not OK"
        # The agent reports the balloon's size before it completes the batch.
        assert self.region.balloon_pages >= msg.count
        self.backed[pages] = False
        self.frames[pages] = POISON  # whatever read this frame for the page would mismatch
        self.ballooned.extend(pages.tolist())
        slot.write_header(ServiceType.BALLOON, SlotState.FREE, count, seq)

    def completes(self) -> list[CompleteRequest]:
        return [m for m in self.sent if isinstance(m, CompleteRequest)]


class Rig:
    """The agent's guest model, fault path, batches and balloon over a FakeDaemon."""

    def __init__(
        self,
        pages: int = 256,
        vcpus: int = 2,
        rate: float = 1e6,
        deflate_rate: float = 1e6,
        max_fraction: float = 0.65,
        capacity: int = 512,
    ) -> None:
        self.pages = pages
        buf = bytearray(region_size(2, capacity))
        self.region = ControlRegion.initialize(
            buf, vm_id=1, generation=1, slot_count=2, capacity=capacity, guest_pages=pages
        )
        self.frames = np.full((pages, PAGE_SIZE), POISON, dtype=np.uint8)
        self.daemon = FakeDaemon(self.region, self.frames)
        self.exposure = ExposureTable(pages)
        self.guest = GuestMemory(7, pages)
        self.os = GuestOS(pages)
        self.clock = FakeClock()
        self.progress = GuestProgress(time.monotonic)
        self.faults = FaultPath(
            self.daemon,  # type: ignore[arg-type]
            self.exposure,
            max_outstanding=16,
            around=0,
        )
        self.balloon = BalloonDriver(
            self.os,
            self.exposure,
            self.guest,
            self.faults.may_map,  # as the agent does
            self.region,
            self.progress,
            rate,
            deflate_rate,
            max_fraction,
            clock=self.clock,
        )
        self.touches = TouchLog(pages)
        self.sampler = Sampler(self.exposure, self.region, self.touches)
        self.batches = BatchProcessor(
            self.daemon,  # type: ignore[arg-type]
            self.region,
            self.exposure,
            self.sampler,
            self.balloon,
        )
        self.runner = WorkloadRunner(
            vcpus,
            1,
            self.frames,
            self.exposure,
            self.faults,
            self.guest,
            GuestGate(),
            self.progress,
            self.touches,
            self.os,
        )
        self.balloon.frozen = lambda: self.runner.verifying

    def target(self, pages: int) -> None:
        self.region.balloon_target_pages = pages

    def inflate(self, wanted: int) -> npt.NDArray[np.int64]:
        """One BALLOON batch of ``wanted``; the pages the agent gave."""
        before = len(self.daemon.ballooned)
        self.batches.process(self.daemon.offer_balloon(wanted))
        return np.asarray(self.daemon.ballooned[before:], dtype=np.int64)

    async def run(self, **phase: Any) -> None:
        """Run a phase to its end (real time: keep them short)."""
        await self.runner.start(Phase(**phase))
        await asyncio.wait(self.runner.tasks)
        await self.runner.halt()

    def check(self) -> None:
        assert self.os.check() == []
        ballooned = self.os.kind == 3
        # A page in the balloon is mapped nowhere and the daemon backs it with nothing.
        assert (self.exposure.mapped_frame(np.flatnonzero(ballooned)) < 0).all()
        assert not self.daemon.backed[ballooned].any()
