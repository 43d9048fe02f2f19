"""The balloon never gives a page that the reply of a fault in flight may map.

The race (seen as a cross-VM data mismatch in the overcommit recipe, 2 Dec): a vCPU walking
memory faults on page ``b`` with fault-around. The daemon resolves the fault when it
arrives and maps ``b``'s untouched neighbours too (fresh frames; a swap-in's read-ahead
maps swapped ones the same way). Before that reply reaches the agent, a BALLOON batch asks
for pages and the driver gives some of those neighbours: never-used free pages, unmapped as
far as the agent knows. The daemon then frees what backs them (the frames it just mapped),
and the reply, arriving after, installs mappings to frames that now belong to nobody, soon
to another page or another VM. The guest takes the pages back from the balloon, writes and
reads them through those mappings: lost writes in both VMs.

The fake daemon here resolves each fault on arrival, as the real one does, and sends the
reply only when the test lets it go; the rest is the agent's real fault path, guest model
and balloon driver (``guest_rig.py``).
"""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest

from shared.constants import MAX_FAULT_AROUND
from shared.messages import FAULT_FLAG_WRITABLE, Fault, FaultReply, Message
from vmm_agent.guest_os import BALLOON

from .guest_rig import FakeDaemon, Rig

FAULT, AROUND = 43, 8
NEIGHBOURS = list(range(FAULT + 1, FAULT + 1 + AROUND))


async def _resolve_on_arrival(self: FakeDaemon, msg: Message) -> FaultReply:
    """``FakeDaemon.request``, but the pages are mapped when the fault arrives (the
    neighbours the fault-around takes are decided then); the reply goes after ``hold``."""
    assert isinstance(msg, Fault)
    self.faults.append(msg)
    pages = [msg.bpn]
    if msg.around:
        nxt = range(msg.bpn + 1, min(len(self.frames), msg.bpn + 1 + self.around))
        pages += [b for b in nxt if not self.backed[b]]
    bpns = np.asarray(pages, dtype=np.int64)
    fresh = bpns[~self.backed[bpns]]
    self.frames[fresh] = 0
    self.backed[fresh] = True
    reply = FaultReply(
        0,
        bpns.astype(np.uint64),
        bpns.copy(),
        np.full(len(bpns), FAULT_FLAG_WRITABLE, dtype=np.uint8),
    )
    if self.hold is not None:
        await self.hold.wait()  # the reply is on the wire
    assert self.on_reply is not None
    self.on_reply(len(self.faults), reply)
    return reply


async def _fault_out(rig: Rig, around: int) -> asyncio.Task[None]:
    """A write fault on FAULT with ``around`` neighbours, resolved, its reply not yet in."""
    rig.daemon.request = types.MethodType(_resolve_on_arrival, rig.daemon)  # type: ignore[method-assign]
    rig.daemon.hold = asyncio.Event()
    task = asyncio.create_task(rig.faults.ensure(FAULT, write=True, sequential=True, around=around))
    while not rig.daemon.faults:  # the fault reached the daemon
        await asyncio.sleep(0)
    return task


@pytest.mark.timeout(10)
async def test_a_balloon_batch_skips_the_pages_a_fault_around_in_flight_may_map() -> None:
    rig = Rig(pages=64)
    rig.target(64)
    rig.daemon.around = AROUND
    task = await _fault_out(rig, AROUND)
    assert rig.daemon.backed[NEIGHBOURS].all()  # the daemon mapped them already
    given = rig.inflate(30)
    assert len(given) > 0  # the balloon still gives what may go: pages before the fault
    # Every page after the fault that its reply may map stays out of the balloon (a swap-in
    # reads ahead up to MAX_FAULT_AROUND pages, whatever fault-around was asked).
    assert not set(given.tolist()) & set(range(FAULT, FAULT + 1 + MAX_FAULT_AROUND))
    rig.daemon.hold.set()  # type: ignore[union-attr]
    await task
    mapped = np.flatnonzero(rig.exposure.frame >= 0)
    assert set(NEIGHBOURS) <= set(mapped.tolist())
    # What the agent maps, the daemon backs: no mapping to a frame the balloon freed.
    assert rig.daemon.backed[mapped].all()
    assert not (rig.os.kind[NEIGHBOURS] == BALLOON).any()
    rig.check()


@pytest.mark.timeout(10)
async def test_without_fault_around_only_the_faulting_page_is_kept_out() -> None:
    """A fault without fault-around maps its own page only: the balloon may give the rest."""
    rig = Rig(pages=64)
    rig.target(64)
    task = await _fault_out(rig, 0)
    given = rig.inflate(8)
    assert given.tolist() == list(range(63, 55, -1))
    assert FAULT not in given.tolist()
    rig.daemon.hold.set()  # type: ignore[union-attr]
    await task
    rig.check()
