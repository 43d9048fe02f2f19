"""The real agent's side on its own, no daemon: release filters, batch processing, guest memory.

A ControlRegion over a bytearray stands in for the shared control region, and a fake link
records what ``BatchProcessor.process`` sends. Each test fills a slot as the daemon would
(``PageListSlot.fill``) and hands the matching ``Request`` to ``process``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from shared.constants import NO_FRAME, PAGE_SIZE, PageStatus, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import ControlRegion, SlotState, region_size
from shared.messages import CompleteRequest, Message, Request
from vmm_agent.batches import BatchProcessor
from vmm_agent.exposure import NOT_RELEASED, ExposureTable
from vmm_agent.guest import CORPUS_PAGES, ZERO_HASH, Content, GuestMemory
from vmm_agent.sampler import Sampler
from vmm_agent.services import FILTERS
from vmm_agent.touches import TouchLog

GUEST_PAGES = 64
SLOT_COUNT = 2
CAPACITY = 16
FRAME_BASE = 1000  # page b is exposed on frame FRAME_BASE + b


class FakeLink:
    """What BatchProcessor.process uses of the RpcClient: ``send``, recorded."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)


class Agent:
    """A BatchProcessor over a bytearray control region and its exposure table."""

    def __init__(self) -> None:
        buf = bytearray(region_size(SLOT_COUNT, CAPACITY))
        self.region = ControlRegion.initialize(
            buf,
            vm_id=1,
            generation=1,
            slot_count=SLOT_COUNT,
            capacity=CAPACITY,
            guest_pages=GUEST_PAGES,
        )
        self.exposure = ExposureTable(GUEST_PAGES)
        self.link = FakeLink()
        self.touches = TouchLog(GUEST_PAGES)
        self.sampler = Sampler(self.exposure, self.region, self.touches)
        self.loop = BatchProcessor(
            self.link,  # type: ignore[arg-type]
            self.region,
            self.exposure,
            self.sampler,
        )
        self.seq = 0

    def expose(self, bpns: Any, writable: bool = True) -> None:
        idx = np.asarray(bpns, dtype=np.int64)
        self.exposure.install(idx, FRAME_BASE + idx, np.full(len(idx), writable))

    def issue(self, service: ServiceType, bpns: Any, mpns: Any = None, slot: int = 0) -> Request:
        """Fill ``slot`` like the daemon does and return the Request naming it."""
        idx = np.asarray(bpns, dtype=np.int64)
        frames = FRAME_BASE + idx if mpns is None else np.asarray(mpns, dtype=np.int64)
        self.seq += 1
        self.region.slot(slot).fill(service, self.seq, idx, frames)
        return Request(int(service), slot, len(idx), self.seq)

    def process(self, req: Request) -> npt.NDArray[np.uint8]:
        """Run the agent on ``req``; check the CompleteRequest; return the slot's statuses."""
        sent = len(self.link.sent)
        released = self.loop.process(req)
        assert len(self.link.sent) == sent + 1
        done = self.link.sent[-1]
        assert isinstance(done, CompleteRequest)
        assert (done.slot, done.count, done.seq) == (req.slot, req.count, req.seq)
        status = self.region.slot(req.slot).status[: req.count].copy()
        assert released == np.count_nonzero(status == PageStatus.OK)
        return status

    def assert_released(self, bpns: Any, service: ServiceType) -> None:
        idx = np.asarray(bpns, dtype=np.int64)
        assert (self.exposure.frame[idx] == NO_FRAME).all()
        assert not self.exposure.writable[idx].any()
        assert (self.exposure.released_by[idx] == service).all()

    def assert_kept(self, bpns: Any) -> None:
        idx = np.asarray(bpns, dtype=np.int64)
        assert (self.exposure.frame[idx] == FRAME_BASE + idx).all()
        assert (self.exposure.released_by[idx] == NOT_RELEASED).all()


def statuses(*names: str) -> list[int]:
    return [int(PageStatus[n]) for n in names]


# ---- swap filter ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_swap_refuses_pinned_pages_and_accepts_the_rest() -> None:
    """Swap refuses pinned pages (BUSY) and releases unpinned cold ones to SWAP."""
    agent = Agent()
    agent.expose(range(8))
    agent.exposure.pinned[[1, 5]] = 1
    status = agent.process(agent.issue(ServiceType.SWAP, range(8)))
    assert status.tolist() == statuses("OK", "BUSY", "OK", "OK", "OK", "BUSY", "OK", "OK")
    agent.assert_released([0, 2, 3, 4, 6, 7], ServiceType.SWAP)
    agent.assert_kept([1, 5])
    assert agent.exposure.pinned[[1, 5]].tolist() == [1, 1]
    assert agent.loop.released_while_pinned == {}
    assert agent.loop.pages[("swap", "busy")] == 2
    assert agent.loop.pages[("swap", "ok")] == 6
    # Still pinned: refused again; unpinned: released.
    agent.exposure.pinned[5] = 0
    status = agent.process(agent.issue(ServiceType.SWAP, [1, 5], slot=1))
    assert status.tolist() == statuses("BUSY", "OK")
    agent.assert_released([5], ServiceType.SWAP)
    agent.assert_kept([1])


@pytest.mark.timeout(10)
def test_swap_gives_recently_accessed_pages_a_second_chance() -> None:
    """Swap refuses recently accessed pages (REFERENCED) and clears their accessed bit, so a
    second pass releases them if they were not touched again."""
    agent = Agent()
    agent.expose(range(6))
    agent.exposure.accessed[[0, 3, 4]] = True
    agent.exposure.pinned[4] = 1  # pinned and accessed: BUSY wins
    status = agent.process(agent.issue(ServiceType.SWAP, range(6)))
    assert status.tolist() == statuses("REFERENCED", "OK", "OK", "REFERENCED", "BUSY", "OK")
    agent.assert_kept([0, 3, 4])
    agent.assert_released([1, 2, 5], ServiceType.SWAP)
    assert not agent.exposure.accessed[:6].any(), "accessed bits not cleared"

    agent.exposure.accessed[3] = True  # touched again since the first pass
    status = agent.process(agent.issue(ServiceType.SWAP, [0, 3, 4], slot=1))
    assert status.tolist() == statuses("OK", "REFERENCED", "BUSY")
    agent.assert_released([0], ServiceType.SWAP)
    agent.assert_kept([3, 4])
    status = agent.process(agent.issue(ServiceType.SWAP, [3]))
    assert status.tolist() == statuses("OK")
    agent.assert_released([3], ServiceType.SWAP)


# ---- checks common to every service ----------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "service",
    # 2M promotion releases a region whole or not at all (tests/test_promotion.py).
    sorted(s for s in FILTERS if s != ServiceType.PROMOTION_2M),
    ids=lambda s: s.name.lower(),
)
def test_stale_frame_and_not_exposed_are_refused_by_every_service(service: ServiceType) -> None:
    """Every service refuses a page whose slot MPN differs from the exposure table
    (STALE_FRAME) and a page the agent does not expose (NOT_EXPOSED), and keeps them as they
    were; pages that match are released."""
    agent = Agent()
    agent.expose([0, 1, 2], writable=service != ServiceType.P2M_UPDATE)
    mpns = [FRAME_BASE + 0, FRAME_BASE + 77, FRAME_BASE + 2, FRAME_BASE + 3]
    status = agent.process(agent.issue(service, [0, 1, 2, 3], mpns))
    assert status.tolist() == statuses("OK", "STALE_FRAME", "OK", "NOT_EXPOSED")
    agent.assert_released([0, 2], service)
    agent.assert_kept([1])
    assert agent.exposure.frame[3] == NO_FRAME
    assert agent.exposure.released_by[3] == NOT_RELEASED
    name = service.name.lower()
    assert agent.loop.batches[name] == 1
    assert agent.loop.pages[(name, "stale_frame")] == 1
    assert agent.loop.pages[(name, "not_exposed")] == 1


# ---- p2mUpdate and page retire ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_p2m_update_refuses_writable_pages_and_accepts_read_only_ones() -> None:
    """p2mUpdate refuses pages the agent maps writable (NOT_SHARED: no shared mapping to
    drop) and releases read-only ones, pinned or not."""
    agent = Agent()
    agent.expose([0, 1, 2], writable=True)
    agent.expose([3, 4, 5], writable=False)
    agent.exposure.pinned[[2, 5]] = 1
    agent.exposure.accessed[:6] = True
    status = agent.process(agent.issue(ServiceType.P2M_UPDATE, range(6)))
    assert status.tolist() == statuses("NOT_SHARED", "NOT_SHARED", "NOT_SHARED", "OK", "OK", "OK")
    agent.assert_kept([0, 1, 2])
    assert agent.exposure.writable[[0, 1, 2]].all()
    agent.assert_released([3, 4, 5], ServiceType.P2M_UPDATE)
    assert agent.exposure.accessed[:6].all(), "p2mUpdate must not touch accessed bits"
    assert agent.loop.released_while_pinned["p2m_update"] == 1


@pytest.mark.timeout(10)
def test_page_retire_accepts_pinned_and_accessed_pages() -> None:
    """Page retire has no filter: pinned and recently accessed pages are released too, their
    pin counts untouched, and the release is recorded as PAGE_RETIRE."""
    agent = Agent()
    agent.expose(range(4))
    agent.exposure.pinned[[0, 1]] = [1, 3]
    agent.exposure.accessed[[1, 2]] = True
    status = agent.process(agent.issue(ServiceType.PAGE_RETIRE, range(4)))
    assert status.tolist() == statuses("OK", "OK", "OK", "OK")
    agent.assert_released(range(4), ServiceType.PAGE_RETIRE)
    assert agent.exposure.pinned[:4].tolist() == [1, 3, 0, 0]
    assert agent.loop.released_while_pinned["page_retire"] == 2
    assert agent.exposure.exposed_count() == 0


@pytest.mark.timeout(10)
def test_install_after_release_resets_nothing_but_the_mapping() -> None:
    """A page released by one service and mapped again keeps ``released_by`` of that
    service until the runner resets it (what its pin check relies on)."""
    agent = Agent()
    agent.expose([7], writable=False)
    agent.process(agent.issue(ServiceType.P2M_UPDATE, [7]))
    agent.expose([7])
    assert agent.exposure.frame[7] == FRAME_BASE + 7
    assert agent.exposure.released_by[7] == ServiceType.P2M_UPDATE


@pytest.mark.timeout(10)
def test_on_batch_callbacks_get_service_and_counts() -> None:
    """Every processed batch is reported to ``on_batch`` with the service name and the
    count of pages per status."""
    agent = Agent()
    seen: list[tuple[str, float, list[int]]] = []
    agent.loop.on_batch.append(lambda name, sec, counts: seen.append((name, sec, counts.tolist())))
    agent.expose(range(3))
    agent.exposure.pinned[0] = 1
    agent.process(agent.issue(ServiceType.SWAP, range(4)))
    assert len(seen) == 1
    name, seconds, counts = seen[0]
    assert name == "swap" and seconds >= 0
    assert counts[PageStatus.OK] == 2
    assert counts[PageStatus.BUSY] == 1
    assert counts[PageStatus.NOT_EXPOSED] == 1


# ---- requests that do not match their slot ------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mismatch", ["seq", "count", "service", "slot_free", "other_slot"])
def test_request_not_matching_its_slot_raises_and_changes_nothing(mismatch: str) -> None:
    """A Request whose seq, count, service or slot does not match the slot header (or names
    a slot that is not ISSUED) raises RemoteProtocolError; nothing is released or sent."""
    agent = Agent()
    agent.expose(range(4))
    good = agent.issue(ServiceType.PAGE_RETIRE, range(4))
    bad = {
        "seq": Request(good.service, good.slot, good.count, good.seq + 1),
        "count": Request(good.service, good.slot, good.count - 1, good.seq),
        "service": Request(int(ServiceType.SWAP), good.slot, good.count, good.seq),
        "slot_free": Request(good.service, 1, good.count, good.seq),
        "other_slot": Request(good.service, 1, good.count, good.seq),
    }[mismatch]
    if mismatch == "other_slot":  # slot 1 is ISSUED, but with another batch
        agent.issue(ServiceType.PAGE_RETIRE, range(4), slot=1)
    with pytest.raises(RemoteProtocolError) as info:
        agent.loop.process(bad)
    assert info.value.code == ErrorCode.SLOT_NOT_ISSUED
    assert agent.link.sent == []
    agent.assert_kept(range(4))
    assert agent.region.slot(good.slot).read_header()[1] == SlotState.ISSUED
    # The matching request is still served.
    status = agent.process(good)
    assert status.tolist() == statuses("OK", "OK", "OK", "OK")


# ---- guest memory ----------------------------------------------------------------------------

KINDS = {"zero": Content.ZERO, "duplicate": Content.DUPLICATE, "unique": Content.UNIQUE}


def frames(n: int = 8) -> npt.NDArray[np.uint8]:
    return np.zeros((n, PAGE_SIZE), dtype=np.uint8)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_guest_write_then_check_passes(kind: str) -> None:
    """Content written for a BPN (zero, duplicate or unique) checks out in its frame, over
    several versions and frames."""
    mem = frames()
    gm = GuestMemory(vm_key=7, guest_pages=16)
    mem[:] = 0xAB  # recycled frames hold old bytes: a write must replace them all
    for version, (frame, bpn) in enumerate([(2, 5), (3, 5), (4, 9)], start=1):
        gm.write(mem, frame, bpn, KINDS[kind], pick=version)
        assert gm.check(mem, frame, bpn)
    assert gm.version[5] == 2 and gm.version[9] == 1
    assert gm.mismatches == 0 and gm.mismatch_log == []
    assert gm.verified == 3
    assert gm.written_pages().tolist() == [5, 9]
    if kind == "zero":
        assert not mem[[2, 3, 4]].any() and gm.expected[5] == ZERO_HASH
    if kind == "duplicate":
        assert np.array_equal(mem[4], gm.corpus[3 % CORPUS_PAGES])  # pick 3


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_guest_check_catches_one_flipped_byte(kind: str) -> None:
    """One flipped byte in a frame makes check() return False, counts a mismatch and logs
    the BPN and frame; the intact pages still check out."""
    mem = frames()
    gm = GuestMemory(vm_key=7, guest_pages=16)
    gm.write(mem, 3, 11, KINDS[kind], pick=2)
    gm.write(mem, 4, 12, KINDS[kind], pick=2)
    mem[3, 1234] ^= 0x01
    assert not gm.check(mem, 3, 11)
    assert gm.check(mem, 4, 12)
    assert gm.mismatches == 1
    assert gm.mismatch_log == [{"bpn": 11, "frame": 3, "version": 1}]
    assert gm.summary() == {"pages_verified": 2, "mismatches": 1, "accesses_failed": {}}
    mem[3, 1234] ^= 0x01
    assert gm.check(mem, 3, 11)
    assert gm.mismatches == 1


@pytest.mark.timeout(10)
def test_guest_check_catches_an_old_version() -> None:
    """A frame holding the page's previous version (a lost write) fails the check."""
    mem = frames()
    gm = GuestMemory(vm_key=7, guest_pages=16)
    gm.write(mem, 0, 3, Content.UNIQUE, pick=0)
    old = mem[0].copy()
    gm.write(mem, 0, 3, Content.UNIQUE, pick=0)
    assert gm.check(mem, 0, 3)
    mem[0] = old
    assert not gm.check(mem, 0, 3)
    assert gm.mismatch_log == [{"bpn": 3, "frame": 0, "version": 2}]


@pytest.mark.timeout(10)
def test_unique_content_differs_between_versions_bpns_and_vms() -> None:
    """Unique content is deterministic per (vm_key, BPN, version) and differs when any of them
    changes; duplicate content is the same in every VM."""
    mem = frames()
    a, b, a_again = (GuestMemory(k, 16) for k in (7, 8, 7))
    a.write(mem, 0, 5, Content.UNIQUE, pick=0)  # vm 7, BPN 5, version 1
    a.write(mem, 1, 5, Content.UNIQUE, pick=0)  # vm 7, BPN 5, version 2
    a.write(mem, 2, 6, Content.UNIQUE, pick=0)  # vm 7, BPN 6, version 1
    b.write(mem, 3, 5, Content.UNIQUE, pick=0)  # vm 8, BPN 5, version 1
    a_again.write(mem, 4, 5, Content.UNIQUE, pick=0)  # vm 7, BPN 5, version 1 again
    pages = [mem[i].tobytes() for i in range(4)]
    assert len(set(pages)) == 4, "unique pages collide"
    assert mem[4].tobytes() == pages[0]
    assert a.expected[5] != b.expected[5]
    assert a_again.expected[5] != a.expected[5]  # a is at version 2
    assert all(mem[i].any() for i in range(5))
    # b cannot pass a's page off as its own, and the other way round.
    assert not b.check(mem, 0, 5) and not a.check(mem, 3, 5)

    a.write(mem, 5, 9, Content.DUPLICATE, pick=4)
    b.write(mem, 6, 9, Content.DUPLICATE, pick=4)
    assert np.array_equal(mem[5], mem[6])
    assert a.expected[9] == b.expected[9]


@pytest.mark.timeout(10)
def test_content_profile_counts_every_backed_zero_page() -> None:
    """The sharing truth: zero pages are those written as zero and those read before any
    write (the platform backs them with zeros and page sharing merges them); a page given
    away is not backed until touched again; duplicates count per corpus page."""
    mem = frames()
    gm = GuestMemory(vm_key=7, guest_pages=16)
    gm.write(mem, 0, 1, Content.ZERO, pick=0)
    gm.write(mem, 1, 2, Content.DUPLICATE, pick=4)
    gm.write(mem, 2, 3, Content.UNIQUE, pick=0)
    assert gm.check(mem, 5, 9)  # never written: reads zeros
    assert gm.check(mem, 6, 10)
    profile = gm.content_profile()
    assert profile["zero"] == 3 and profile["unique"] == 1
    assert profile["corpus"][4] == 1 and sum(profile["corpus"]) == 1
    gm.forget(np.array([9, 1], dtype=np.int64))  # given to the balloon: not backed
    assert gm.content_profile()["zero"] == 1
    assert gm.check(mem, 5, 9)  # touched again: backed by a zero page again
    assert gm.content_profile()["zero"] == 2


@pytest.mark.timeout(10)
async def test_a_round_refused_only_as_referenced_counts_as_progress() -> None:
    """A round whose pages were all refused as recently referenced made progress (their bits
    are cleared: the next pass takes them), so the next round starts at once; a round whose
    pages were refused for good (pinned) made none, and waits for the next poll."""
    from shared.constants import Priority
    from shared.messages import GetRequest
    from vmm_agent.rounds import HighPriorityLoop

    agent = Agent()
    agent.expose(range(8))
    agent.exposure.accessed[:4] = True
    agent.exposure.pinned[4:8] = 1

    class Link:
        def __init__(self, batches: list[Request]) -> None:
            self.batches = batches

        async def request(self, msg: Message) -> Request:
            assert isinstance(msg, GetRequest) and msg.priority == Priority.HIGH
            return self.batches.pop(0) if self.batches else Request(0, 0xFFFF, 0, 0)

    referenced = agent.issue(ServiceType.SWAP, range(4))
    loop = HighPriorityLoop(Link([referenced]), agent.region, agent.loop, 0.05)  # type: ignore[arg-type]
    assert await loop.round() == 4
    assert agent.loop.last_referenced == 4
    pinned = agent.issue(ServiceType.SWAP, range(4, 8), slot=1)
    loop = HighPriorityLoop(Link([pinned]), agent.region, agent.loop, 0.05)  # type: ignore[arg-type]
    assert await loop.round() == 0


@pytest.mark.timeout(10)
async def test_the_poll_alone_starts_a_round_once_work_is_pending() -> None:
    """The periodic half: with no Kick, a poll that finds a high-priority bit in the pending
    word starts a round; polls of an empty word start none (they cost no round trip)."""
    from shared.constants import HIGH_PRIORITY_MASK, Priority
    from shared.messages import GetRequest
    from vmm_agent.rounds import HighPriorityLoop

    agent = Agent()

    class Link:
        requests = 0

        async def request(self, msg: Message) -> Request:
            assert isinstance(msg, GetRequest) and msg.priority == Priority.HIGH
            self.requests += 1
            agent.region.pending = 0  # the daemon closes the round and clears the word
            return Request(0, 0xFFFF, 0, 0)

    link = Link()
    loop = HighPriorityLoop(link, agent.region, agent.loop, 0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(loop.run())
    try:
        started = loop.rounds
        for _ in range(20):  # 20 polls of an empty word
            await asyncio.sleep(0.01)
        assert loop.rounds == started and link.requests == 0
        agent.region.pending = HIGH_PRIORITY_MASK & -HIGH_PRIORITY_MASK  # one service's bit
        while loop.rounds == started:  # no kick: the poll must notice
            await asyncio.sleep(0.01)
        assert link.requests == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
