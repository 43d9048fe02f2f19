"""The agent never has two low-priority batches out: what keeps read-ahead verdicts safe.

``ValidationService.complete`` (``platform_daemon/services/validation.py``) takes a page of
the batch that is SELECTED when the verdicts land for one of its remapped pages, with no
epoch check. A read-ahead page whose hold ended while its verdict (batch A) was out is not
claimed by ``readahead.complete``, so A's verdict would fall through to that branch. It is
harmful only if the page is SELECTED by a batch the VMM *maps* it through: a remap
validation batch B after NUMA migration, 2M defrag or promotion moved it (A's UNTOUCHED or
STALE_FRAME would then make RESIDENT, the platform's alone, a page the VMM maps). Every step
of that path (the move's release batch, then B) is a low-priority batch. Both sides keep
one low batch out at a time. The agent: its low loop sends a batch's CompleteRequest, with
no await after the verdict (``BatchProcessor.process``), before it sends its next
``GetRequest{LOW}``, on the one socket the daemon reads in order and answers synchronously.
The daemon: its round engine hands out no low batch while one of the VM's is out (a peer
that pipelines gets the round's end, NO_SLOT). So A's verdict always lands before any later
low batch is selected. The high-priority batches that can select
the page meanwhile (swap, page retire) only release pages, and the agent processes them
after A (issue order): ``tests/test_readahead_verdict_crossing.py`` covers that crossing.

The first test pins the daemon's half. The second pins the agent's: a low round over real
daemon-filled VALIDATION slots (read-ahead pages, the real ``BatchProcessor`` and filter)
sends no ``GetRequest{LOW}`` while a batch it was handed is not completed, and its verdicts
are written by then.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.constants import PageStatus, Priority, ServiceType
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest, Request
from tests.test_hugepages import HugeHarness, region
from tests.test_lowprio_agent import FRAME_BASE, MS, Rig, end

pytestmark = pytest.mark.timeout(10)

BATCHES = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def test_the_daemon_hands_out_no_second_low_batch_while_one_is_out(
    mem_dir: Path, short_tmp: Path
) -> None:
    """Two regions to promote, slots to spare: a peer that asks for more low work while its
    first PROMOTION_2M batch is out (in the round, or opening a new one) is told the round
    is over; once it completes the batch, the rest follows and both regions end large."""
    h = HugeHarness(mem_dir, short_tmp)
    try:
        g = h.add_vm()
        h.back(g, region(0) + region(1), node=0)
        h.promo.scan(g.vm, 64, h.clock())
        assert g.vm.region.slot_count >= 2  # a free slot is there: only the rule says no
        engine = h.engine

        def get(flags: int) -> Request:
            return engine.get_request(g.vm, g.state, GetRequest(Priority.LOW, 1_000_000, flags))

        first = get(GET_FLAG_NEW_ROUND)
        assert first.has_work and ServiceType(first.service) == ServiceType.PROMOTION_2M
        assert not get(0).has_work
        assert not get(GET_FLAG_NEW_ROUND).has_work
        assert len(g.state.issued) == 1
        bpns, status, mpns = g.vm.region.slot(first.slot).batch(first.count)
        g.filters[ServiceType.PROMOTION_2M].process(bpns, mpns, status)
        del bpns, status, mpns
        engine.complete(g.vm, g.state, CompleteRequest(first.slot, first.count, first.seq))
        h.run_spawned()
        h.rounds(g)
        assert g.exposure.large.tolist() == [True, True]
        h.content_intact(g)
        assert h.invariants() == []
    finally:
        h.close()


async def test_each_low_batch_is_completed_before_the_next_get_request() -> None:
    rig = Rig(real_batches=True)
    exposure = rig.exposure
    pages = np.array([b for batch in BATCHES for b in batch], dtype=np.int64)
    # Read-ahead pages: mapped by a swap-in reply at the frame the batch names, untouched.
    exposure.install(pages, FRAME_BASE + pages, np.ones(len(pages), dtype=bool))
    exposure.released_by[pages] = ServiceType.SWAP
    # Each batch in its own slot, as the daemon would issue them if asked while others
    # are out (RoundEngine._free_slot): nothing on the daemon's side forbids it.
    requests = [rig.issue(ServiceType.VALIDATION, batch, slot=i) for i, batch in enumerate(BATCHES)]
    rig.link.script = [*((req, 0.1 * MS) for req in requests), (end(), 0.1 * MS)]
    outstanding: list[list[int]] = []  # per GetRequest: handed out and not completed

    def on_get(n: int) -> None:
        done = {(c.slot, c.seq) for c in rig.link.completions}
        handed = requests[: n - 1]  # the answers to the GetRequests before this one
        outstanding.append([r.seq for r in handed if (r.slot, r.seq) not in done])
        for req in handed:  # and the VMM's verdicts on them are written
            status = rig.region.slot(req.slot).status[: req.count]
            assert (status == PageStatus.UNTOUCHED).all(), (req, status)

    rig.link.hooks.append(on_get)
    rig.region.pending = ServiceType.VALIDATION.bit
    record = await rig.tick()

    assert record is not None and record.outcome == "done"
    assert len(rig.link.gets) == len(BATCHES) + 1
    assert outstanding == [[]] * len(rig.link.gets), "a low batch was out at a GetRequest"
    assert [(c.slot, c.seq) for c in rig.link.completions] == [(r.slot, r.seq) for r in requests]
    assert (exposure.frame[pages] < 0).all()  # UNTOUCHED: let go back to swap
    assert (exposure.released_by[pages] == ServiceType.SWAP).all()
