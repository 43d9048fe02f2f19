"""The pin check counts services that take pinned pages, not the guest's own writes.

A page pinned while mapped read-only (the shared zero frame of a page never written, a
merged frame) gets a frame of its own when the guest writes it: copy-on-write by the guest,
no service took it. When the host ran out of memory and swap, many pages were never written,
and these writes made a run report a pin violation ("FAILED") though no page was lost.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from shared.constants import PAGE_SIZE, ServiceType
from shared.workload import Phase
from vmm_agent.exposure import ExposureTable
from vmm_agent.guest import Content, GuestMemory
from vmm_agent.guest_time import GuestGate, GuestProgress
from vmm_agent.runner import WorkloadRunner
from vmm_agent.touches import TouchLog

PAGES = 64
ZERO_FRAME = 0


class MapFaults:
    """Fault path stand-in: a read maps the zero frame read-only, a write a frame of its own."""

    def __init__(self, exposure: ExposureTable) -> None:
        self.exposure = exposure
        self.next_frame = ZERO_FRAME + 1
        self.pending: dict[int, object] = {}  # faults on the wire: none, they resolve at once

    async def ensure(self, bpn: int, write: bool, sequential: bool = False) -> None:
        if write:
            self.exposure.frame[bpn] = self.next_frame
            self.exposure.writable[bpn] = True
            self.next_frame += 1
        elif self.exposure.frame[bpn] < 0:
            self.exposure.frame[bpn] = ZERO_FRAME
            self.exposure.writable[bpn] = False


@pytest.mark.timeout(20)
async def test_guest_write_to_a_page_pinned_read_only_is_not_a_violation() -> None:
    """While pages are pinned: the guest writes one that was mapped read-only (its frame
    changes: copy-on-write), and a service takes another (swap: its frame changes too). Only
    the second is a pin violation."""
    frames = np.zeros((PAGES * 2, PAGE_SIZE), dtype=np.uint8)
    exposure = ExposureTable(PAGES)
    faults = MapFaults(exposure)
    guest = GuestMemory(7, PAGES)
    progress = GuestProgress(time.monotonic)
    runner = WorkloadRunner(
        1,
        0,
        frames,
        exposure,
        faults,  # type: ignore[arg-type]
        guest,
        GuestGate(),
        progress,
        TouchLog(PAGES),
    )
    phase = Phase(duration=10, working_set=1.0, pinned_pages=8, pin_seconds=0.5)
    runner.phase, runner.started, runner.stop = phase, time.monotonic(), asyncio.Event()
    pinner = asyncio.create_task(runner._pinner(phase))
    deadline = time.monotonic() + 5
    while np.count_nonzero(exposure.pinned) < 2:
        assert time.monotonic() < deadline, "nothing was pinned"
        await asyncio.sleep(0.01)
    cow, taken = np.flatnonzero(exposure.pinned)[:2].tolist()
    assert exposure.frame[cow] == exposure.frame[taken] == ZERO_FRAME
    # The guest writes a read-only pinned page, as a vCPU does: write fault, then the write.
    await faults.ensure(cow, True)
    guest.write(frames, int(exposure.frame[cow]), cow, Content.UNIQUE, 0)
    # Swap takes the other one (it should not have), and a fault maps it elsewhere.
    exposure.released_by[taken] = ServiceType.SWAP
    exposure.frame[taken] = 99
    while runner.pin_cycles < 1 and not pinner.done():
        await asyncio.sleep(0.01)
    runner.stop.set()
    await pinner
    assert runner.pin_violations == 1
