"""The agent's balloon driver against a fake daemon (``guest_rig.py``): what a BALLOON batch
gives and in which order, the rate limits, the cap, deflation, the guest report in the
control region, and the proof that the guest never reads or writes a ballooned page.

The fake daemon checks every completed batch as the real one does and poisons the frames
of the pages it frees, so a read through a mapping the agent should have dropped would
mismatch; the guest model's ``balloon_touches`` counts accesses to a page while it is in
the balloon.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from shared.constants import NO_FRAME, PageStatus, ServiceType
from shared.messages import CompleteRequest
from vmm_agent.guest_os import ANON, BALLOON, CACHE, FREE, GuestOS

from .guest_rig import Rig


def never(_page: int) -> bool:
    return False


def expose(rig: Rig, pages: Iterable[int]) -> None:
    """Pages the guest has touched: backed by the daemon, mapped writable by the agent."""
    idx = np.fromiter(pages, dtype=np.int64)
    rig.daemon.backed[idx] = True
    rig.exposure.install(idx, idx, np.ones(len(idx), dtype=bool))


# ---- what a batch gives, and in which order --------------------------------------------------


@pytest.mark.timeout(10)
def test_inflate_gives_free_pages_then_the_oldest_cache_never_anonymous_pinned_or_busy() -> None:
    rig = Rig(pages=32)
    os = rig.os
    os.cache_limit = 8
    for page in range(16):
        os.claim(page)  # the workload's pages: 0..15
    cache = [os.cache_page_for(block, never) for block in range(8)]  # pages 31..24
    expose(rig, [*range(16), *cache, 22])
    rig.exposure.pinned[23] = 1  # a free page pinned for I/O
    rig.exposure.pinned[30] = 1  # block 1's page, pinned
    rig.faults.pending[21] = None  # type: ignore[assignment]  # a fault in flight on 21
    rig.target(32)
    given = rig.inflate(15)
    # Free pages from the top, skipping 23 (pinned) and 21 (busy); then the cache's oldest
    # blocks, skipping block 1's pinned page 30. Never an anonymous page.
    assert given.tolist() == [22, 20, 19, 18, 17, 16, 31, 29, 28, 27, 26, 25, 24]
    assert len(given) == 13  # all that may go: 15 were wanted
    assert rig.balloon.not_given == {"no_page": 2}
    del rig.faults.pending[21]
    assert (os.kind[:16] == ANON).all()
    assert os.kind[[21, 23]].tolist() == [FREE, FREE]
    assert os.kind[30] == CACHE and os.cached_page(1) == 30
    assert os.cached_page(0) == -1 and os.cached_page(2) == -1  # their blocks dropped
    done = rig.daemon.completes()[-1]
    assert done.count == 13
    rig.check()


@pytest.mark.timeout(10)
def test_a_given_page_is_out_of_the_guest_before_the_batch_completes() -> None:
    """Mapping (and hidden mapping) gone, no longer watched, content forgotten, released to
    BALLOON, and the balloon's size in the control region: all before CompleteRequest (the
    fake daemon checks the size when the completion arrives)."""
    rig = Rig(pages=16)
    for page in range(16):
        rig.guest.write(rig.frames, page, page, 2, 0)  # content the guest wrote earlier
    expose(rig, range(16))
    rig.os.cache_limit = 4
    for block in range(4):
        rig.os.cache_page_for(block, never)  # 15..12 hold blocks
    rig.exposure.watched[[15, 14]] = True
    rig.exposure.hide(np.array([15], dtype=np.int64))  # sampled: hidden
    for page in range(4):
        rig.os.claim(page)
    rig.target(6)
    given = rig.inflate(6)
    assert sorted(given.tolist()) == [6, 7, 8, 9, 10, 11]  # the free pool: 11..4, top first
    given = rig.inflate(6)
    assert given.tolist() == []  # the target is reached
    rig.target(8)
    given = rig.inflate(6)
    assert given.tolist() == [5, 4]
    rig.target(10)
    given = rig.inflate(6)
    assert given.tolist() == [15, 14]  # the cache's oldest blocks
    ballooned = np.flatnonzero(rig.os.kind == BALLOON)
    assert len(ballooned) == 10 == rig.region.balloon_pages
    assert (rig.exposure.frame[ballooned] == NO_FRAME).all()
    assert not set(ballooned.tolist()) & set(rig.exposure.hidden)
    assert not rig.exposure.watched[ballooned].any()
    assert (rig.exposure.released_by[ballooned] == ServiceType.BALLOON).all()
    assert not np.isin(ballooned, rig.guest.written_pages()).any()
    assert rig.batches.batches["balloon"] == 4
    assert rig.batches.pages[("balloon", "ok")] == 10
    # The slot says what was given; statuses OK.
    slot = rig.region.slot(0)
    assert slot.bpn[:2].tolist() == [15, 14]
    assert (slot.status[:2] == PageStatus.OK).all()
    rig.check()


@pytest.mark.timeout(10)
def test_a_batch_with_nothing_to_give_completes_with_count_zero() -> None:
    rig = Rig(pages=8)
    for page in range(8):
        rig.os.claim(page)
    rig.target(8)
    assert rig.inflate(4).tolist() == []
    done = rig.daemon.completes()[-1]
    assert isinstance(done, CompleteRequest) and done.count == 0
    assert rig.balloon.not_given == {"no_page": 4}
    # The control region tells the daemon: memsched swaps the balloon's share at once.
    assert rig.region.balloon_refused_pages == 4


# ---- rate limits and the cap -------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_inflation_is_rate_limited() -> None:
    """1000 pages/s with a quarter second of burst: 250 at once, then 100 per 0.1 s."""
    rig = Rig(pages=2048, rate=1000.0, max_fraction=1.0)
    rig.target(2048)
    assert len(rig.inflate(512)) == 250
    assert len(rig.inflate(512)) == 0  # no time has passed
    rig.clock.now += 0.1
    assert len(rig.inflate(512)) == 100
    rig.clock.now += 10.0  # a long pause refills the burst, no more
    assert len(rig.inflate(512)) == 250
    assert rig.balloon.not_given["rate"] == 4 * 512 - 600
    rig.check()


@pytest.mark.timeout(10)
def test_the_balloon_never_holds_more_than_its_share_of_guest_memory() -> None:
    rig = Rig(pages=100, max_fraction=0.3)
    rig.target(100)
    assert len(rig.inflate(50)) == 30
    assert len(rig.inflate(50)) == 0
    assert rig.balloon.size == 30 == rig.balloon.cap
    assert rig.balloon.not_given["cap"] == 20 + 50
    # Deflating makes room again.
    rig.target(20)
    rig.balloon.tick(rig.clock())
    assert rig.balloon.size == 20
    rig.target(100)
    assert len(rig.inflate(50)) == 10


@pytest.mark.timeout(10)
def test_deflation_gives_pages_back_to_the_pool_rate_limited_without_a_message() -> None:
    rig = Rig(pages=1024, deflate_rate=400.0, max_fraction=1.0)
    rig.target(600)
    rig.inflate(512)
    rig.inflate(88)
    assert rig.balloon.size == 600
    sent = len(rig.daemon.sent)
    rig.target(100)
    rig.balloon.tick(rig.clock())
    assert rig.balloon.size == 500  # the burst: 400 pages/s x 0.25 s
    assert rig.region.balloon_pages == 500
    rig.clock.now += 0.5
    rig.balloon.tick(rig.clock())
    assert rig.balloon.size == 400  # no more than the burst at once
    for _ in range(3):
        rig.clock.now += 0.25
        rig.balloon.tick(rig.clock())
    assert rig.balloon.size == 100  # the target, not below
    rig.clock.now += 1
    rig.balloon.tick(rig.clock())
    assert rig.balloon.size == 100
    assert len(rig.daemon.sent) == sent  # deflating is local
    assert rig.balloon.deflated == 500 and rig.os.sizes()["free"] == 924
    rig.check()


@pytest.mark.timeout(10)
def test_nothing_is_given_while_the_guest_is_verified() -> None:
    rig = Rig(pages=64)
    rig.target(32)
    rig.runner.verifying = True
    assert rig.inflate(32).tolist() == []
    assert rig.balloon.not_given == {"frozen": 32}
    assert rig.region.balloon_refused_pages == 32
    rig.runner.verifying = False
    assert len(rig.inflate(32)) == 32
    assert rig.region.balloon_refused_pages == 32  # pages given are no refusal


@pytest.mark.timeout(10)
def test_no_balloon_driver_gives_nothing() -> None:
    rig = Rig(pages=16)
    rig.batches.balloon = None
    rig.target(8)
    assert rig.inflate(8).tolist() == []
    assert rig.daemon.completes()[-1].count == 0


# ---- the guest report --------------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_the_tick_reports_balloon_size_refaults_and_stall_in_the_control_region() -> None:
    rig = Rig(pages=128)
    await rig.run(duration=0.3, working_set=0.1, cache=0.25, cache_ratio=1.0, refault_ms=1)
    rig.target(10)
    rig.inflate(10)
    rig.balloon.tick(rig.clock())
    assert rig.region.balloon_pages == 10
    assert rig.region.guest_refaults == rig.os.refaults == 32
    stall = rig.progress.stalled_total(rig.progress.clock())
    assert 0 < rig.region.guest_stall_seconds <= stall


# ---- the guest never touches a ballooned page ------------------------------------------------


async def _fill_balloon_then_touch_everything(rig: Rig) -> None:
    """Write a third of memory, put the free rest in the balloon, then run a workload over
    all of it (reads and writes), then verify every page the guest holds."""
    await rig.run(duration=0.2, working_set=0.33, write_ratio=1.0, distribution="sequential")
    rig.target(rig.pages)
    while len(rig.inflate(512)):
        pass
    assert rig.os.balloon_size == int(0.65 * rig.pages)
    rig.check()
    await rig.run(duration=0.5, working_set=1.0, write_ratio=0.3, distribution="uniform")


@pytest.mark.timeout(20)
async def test_the_guest_never_reads_or_writes_a_ballooned_page() -> None:
    """Every page the workload touches that is in the balloon is first taken back (the
    platform sees a first touch: the fake daemon zeroes the poisoned frame), and no access
    ever lands on a page while it is in the balloon."""
    rig = Rig(pages=256)
    await _fill_balloon_then_touch_everything(rig)
    os = rig.os
    assert os.balloon_returns > 0.9 * int(0.65 * 256)  # nearly all of it was touched
    assert os.balloon_touches == 0
    assert rig.guest.mismatches == 0
    result = await rig.runner.verify()
    assert result["mismatches"] == 0 and result["unreachable"] == 0
    rig.check()


@pytest.mark.timeout(20)
async def test_a_broken_take_back_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the take-back broken (a page in the balloon is left there when the workload
    touches it), the vCPU's accesses land on ballooned pages and ``balloon_touches`` counts
    them: the counter the test above relies on does see them."""
    claim = GuestOS.claim

    def broken(self: GuestOS, page: int) -> None:
        if self.kind_bytes[page] != BALLOON:
            claim(self, page)

    monkeypatch.setattr(GuestOS, "claim", broken)
    rig = Rig(pages=256)
    await _fill_balloon_then_touch_everything(rig)
    assert rig.os.balloon_touches > 0
    assert rig.os.balloon_returns == 0


@pytest.mark.timeout(20)
async def test_ballooned_pages_mapped_again_leave_the_balloon_and_are_given_anew() -> None:
    """The daemon's fault-around may map untouched neighbours, ballooned pages among them:
    the next tick returns those to the free pool (the balloon must hold no mapped page), and
    the balloon takes and gives them again."""
    rig = Rig(pages=64)
    rig.target(64)
    given = rig.inflate(20)  # 63..44
    rig.daemon.around = 8
    await rig.faults.ensure(43, write=True, sequential=True)  # maps 43 and 44..51
    rig.daemon.around = 0
    remapped = [p for p in range(44, 52) if rig.os.kind[p] == BALLOON]
    assert len(remapped) == 8 and (rig.exposure.frame[remapped] >= 0).all()
    rig.balloon.tick(rig.clock())
    assert rig.balloon.remapped == 8
    assert (rig.os.kind[remapped] == FREE).all()
    assert rig.region.balloon_pages == len(given) - 8
    again = rig.inflate(20)
    assert sorted(again.tolist()[:8]) == remapped  # the pool gives them first
    assert not rig.daemon.backed[remapped].any()
    rig.check()
