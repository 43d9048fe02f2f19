"""The agent's fault path against a fake platform link: dedup, installs, no spinning."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from shared.constants import FaultReason
from shared.messages import FAULT_FLAG_WRITABLE, Fault, FaultReply
from vmm_agent.exposure import ExposureTable
from vmm_agent.fault_path import FaultPath, Slots


class FakeLink:
    """Answers each Fault after a short delay, installing through on_reply like RpcClient."""

    def __init__(self, writable_on_read: bool = False) -> None:
        self.sent: list[Fault] = []
        self.on_reply = None
        self.writable_on_read = writable_on_read
        self.frame = 100

    async def request(self, msg: Fault) -> FaultReply:
        self.sent.append(msg)
        await asyncio.sleep(0.01)
        self.frame += 1
        writable = msg.write or self.writable_on_read
        reply = FaultReply(
            int(FaultReason.FIRST_TOUCH),
            np.array([msg.bpn], dtype=np.uint64),
            np.array([self.frame]),
            np.array([FAULT_FLAG_WRITABLE if writable else 0], np.uint8),
        )
        assert self.on_reply is not None
        self.on_reply(1, reply)
        return reply


@pytest.mark.timeout(10)
async def test_many_vcpus_one_page_send_one_fault() -> None:
    """Sixteen vCPUs touching the same missing page cause one Fault, and all are served."""
    link, exposure = FakeLink(), ExposureTable(64)
    path = FaultPath(link, exposure, max_outstanding=8, around=16)  # type: ignore[arg-type]
    await asyncio.gather(*(path.ensure(7, write=False) for _ in range(16)))
    assert len(link.sent) == 1
    assert exposure.frame[7] == 101
    assert path.faults == 1 and path.by_reason["first_touch"] == 1


@pytest.mark.timeout(10)
async def test_writer_waiting_on_a_read_fault_faults_again_instead_of_spinning() -> None:
    """A write waiting on a read fault that mapped the page read-only sends a write fault."""
    link, exposure = FakeLink(), ExposureTable(64)
    path = FaultPath(link, exposure, max_outstanding=8, around=16)  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(path.ensure(3, False), path.ensure(3, True)), 5)
    assert [m.write for m in link.sent] == [False, True]
    assert exposure.writable[3]


@pytest.mark.timeout(10)
async def test_outstanding_faults_are_bounded() -> None:
    """No more than max_outstanding faults are on the wire at once (backpressure)."""
    link, exposure = FakeLink(), ExposureTable(256)
    in_flight, peak = 0, 0
    original = link.request

    async def counting(msg: Fault) -> FaultReply:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(msg)
        finally:
            in_flight -= 1

    link.request = counting  # type: ignore[method-assign]
    path = FaultPath(link, exposure, max_outstanding=4, around=0)  # type: ignore[arg-type]
    await asyncio.gather(*(path.ensure(b, True) for b in range(40)))
    assert peak == 4
    assert np.all(exposure.frame[:40] > 100)


@pytest.mark.timeout(10)
async def test_sequential_faults_ask_for_fault_around() -> None:
    """A fault right after the previous page asks the platform to map neighbours too."""
    link, exposure = FakeLink(writable_on_read=True), ExposureTable(64)
    path = FaultPath(link, exposure, max_outstanding=8, around=16)  # type: ignore[arg-type]
    await path.ensure(10, True, sequential=False)
    await path.ensure(11, True, sequential=True)
    assert [m.around for m in link.sent] == [0, 16]


@pytest.mark.timeout(10)
async def test_a_write_fault_drops_the_read_only_mapping_until_its_reply() -> None:
    """While a write fault on a read-only (shared) page is on the wire, the old frame may
    go to another sharer, who writes it: no reader may use the old mapping meanwhile. A
    read of the page waits for the write fault and then sees the new mapping."""
    link, exposure = FakeLink(), ExposureTable(64)
    path = FaultPath(link, exposure, max_outstanding=8, around=16)  # type: ignore[arg-type]
    exposure.frame[5], exposure.writable[5] = 50, False  # mapped read-only on frame 50
    writer = asyncio.ensure_future(path.ensure(5, write=True))
    await asyncio.sleep(0)  # the write fault is on the wire now
    assert 5 in path.pending
    assert exposure.frame[5] < 0  # the old mapping is gone
    assert not path.is_ready(5, write=False)  # a reader faults, and waits on the writer
    await path.ensure(5, write=False)
    assert exposure.frame[5] == 101 and exposure.writable[5]
    await writer
    assert [m.write for m in link.sent] == [True]  # the reader sent nothing of its own


@pytest.mark.timeout(10)
async def test_a_slot_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    """The outstanding bound's slots: a waiter cancelled after a slot was handed to it (but
    before it ran) passes the slot on, and one cancelled while waiting takes none; no slot is
    lost either way, so later faults are not stuck behind a bound that never frees."""
    slots = Slots(1)
    assert slots.take_nowait()
    first = asyncio.ensure_future(slots.take())
    second = asyncio.ensure_future(slots.take())
    third = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)  # all three queued, in order
    slots.give()  # handed to ``first``, which has not run yet
    first.cancel()
    third.cancel()  # cancelled while waiting
    await asyncio.wait_for(second, 5)  # the slot went on to ``second``
    assert first.cancelled() and third.cancelled()
    assert not slots.take_nowait()  # ``second`` holds the only slot
    slots.give()
    assert slots.take_nowait()  # and it came back whole
    assert not slots.take_nowait()


@pytest.mark.timeout(10)
async def test_slots_serve_waiters_first_come_first_served() -> None:
    """A slot given back goes to the longest waiter, never to a newcomer."""
    slots, order = Slots(1), []
    assert slots.take_nowait()

    async def waiter(k: int) -> None:
        await slots.take()
        order.append(k)

    tasks = [asyncio.ensure_future(waiter(k)) for k in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        slots.give()
        assert not slots.take_nowait()  # handed over, not free for a newcomer
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2]
