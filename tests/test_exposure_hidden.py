"""The exposure table's hidden mappings (a dict of the sampled pages, not per-page columns)
against a model: every mix of replies, samples, guest touches, releases and ballooning
leaves the monitor's view of each page exactly what the model says, and every hidden page
watched and invisible (the invariant batch operations rely on to look up only watched pages).

Real parts: the agent's ``ExposureTable``, ``Sampler`` and ``FaultPath`` (its replies go
through ``on_reply`` as the read callback delivers them); the platform is the scripted
``FaultLink`` of ``test_lowprio_agent``. Every mapping the test creates gets a fresh frame,
so a stale mapping given back is seen.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from shared.constants import NO_FRAME
from vmm_agent.exposure import ExposureTable

from .test_lowprio_agent import FaultRig, fault_reply, pages

#: Few pages, so samples, replies and releases keep meeting the same ones.
PAGES = 12
bpn_lists = st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=6, unique=True)
REACHED: Counter[str] = Counter()


class HiddenMappings(RuleBasedStateMachine):
    """The agent's table and fault path against a model of each page's mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = FaultRig()
        self.ex = self.rig.exposure
        self.next_frame = 5000
        self.sample_id = 0
        # The model: each page's mapping (frame, writable), whether the guest sees it, and
        # whether the current sample watches it.
        self.mapping: dict[int, tuple[int, bool]] = {}
        self.visible: set[int] = set()
        self.watched: set[int] = set()

    def teardown(self) -> None:
        self.loop.close()

    def _fresh(self) -> int:
        self.next_frame += 1
        return self.next_frame

    @rule(bpns=bpn_lists, writable=st.booleans())
    def reply(self, bpns: list[int], writable: bool) -> None:
        """A fault(-around) reply arrives: watched pages are installed hidden."""
        frames = [self._fresh() for _ in bpns]
        on_reply = self.rig.link.on_reply
        assert on_reply is not None
        on_reply(0, fault_reply(bpns, frames, writable))
        for bpn, frame in zip(bpns, frames, strict=True):
            self.mapping[bpn] = (frame, writable)
            if bpn in self.watched:
                self.visible.discard(bpn)
                REACHED["installed_hidden"] += 1
            else:
                self.visible.add(bpn)

    @rule(bpns=bpn_lists, new=st.booleans())
    def sample(self, bpns: list[int], new: bool) -> None:
        """A SAMPLING batch, armed at once; a new sample id ends the old sample first."""
        if new or self.sample_id == 0:
            self.sample_id += 1
            self.visible |= {b for b in self.watched if b in self.mapping}
            self.watched.clear()
        self.rig.arm(self.sample_id, bpns)
        self.watched |= set(bpns)
        self.visible -= self.watched
        REACHED["hidden"] += len(self.ex.hidden)

    @rule(bpn=st.integers(0, PAGES - 1), write=st.booleans())
    def touch(self, bpn: int, write: bool) -> None:
        """A guest access through the fault path: a hidden page comes back without a message,
        anything else the guest cannot use faults (and gets a fresh frame)."""
        frame = self._fresh()
        self.rig.link.replies[:] = [fault_reply([bpn], [frame])]
        sent = len(self.rig.link.sent)
        self.loop.run_until_complete(self.rig.faults.ensure(bpn, write))
        self.watched.discard(bpn)
        if bpn in self.mapping:
            if bpn not in self.visible:
                REACHED["soft_fault"] += 1
            self.visible.add(bpn)
        if bpn not in self.mapping or (write and not self.mapping[bpn][1]):
            self.mapping[bpn] = (frame, True)
            self.visible.add(bpn)
            assert len(self.rig.link.sent) == sent + 1
        else:
            assert len(self.rig.link.sent) == sent, "a usable mapping was asked for again"

    @rule(bpns=bpn_lists)
    def release(self, bpns: list[int]) -> None:
        """A release batch (swap-out) takes the mapped pages, hidden ones included."""
        idx = pages(*bpns)
        taken = idx[self.ex.mapped_frame(idx) >= 0]
        self.ex.invalidate(taken)
        for bpn in taken.tolist():
            REACHED["released_hidden"] += bpn not in self.visible
            del self.mapping[bpn]
            self.visible.discard(bpn)

    @rule(bpns=bpn_lists)
    def balloon(self, bpns: list[int]) -> None:
        """Ballooned pages leave the guest: no mapping, not watched (balloon.py's order)."""
        idx = pages(*bpns)
        self.ex.invalidate(idx)
        self.ex.watched[idx] = False
        for bpn in bpns:
            self.mapping.pop(bpn, None)
            self.visible.discard(bpn)
            self.watched.discard(bpn)

    @invariant()
    def matches_the_model(self) -> None:
        ex, idx = self.ex, np.arange(PAGES, dtype=np.int64)
        assert ex.stray_hidden() == []
        want = [self.mapping.get(b, (NO_FRAME, False)) for b in range(PAGES)]
        assert ex.mapped_frame(idx).tolist() == [f for f, _ in want]
        assert ex.mapped_writable(idx).tolist() == [w for _, w in want]
        assert ex.mapped_in(0, PAGES).tolist() == [b in self.mapping for b in range(PAGES)]
        seen = [want[b][0] if b in self.visible else NO_FRAME for b in range(PAGES)]
        assert ex.frame[:PAGES].tolist() == seen
        assert set(np.flatnonzero(ex.watched).tolist()) == self.watched
        assert set(ex.hidden) == set(self.mapping) - self.visible


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(120)
def test_hidden_mappings_follow_the_model() -> None:
    """Replies, samples, touches, releases and ballooning, in any order, keep each page's
    mapping, visibility and watched bit as the model says; the run reached hidden installs,
    soft faults and releases of hidden pages (it was not vacuous)."""
    REACHED.clear()
    run_state_machine_as_test(HiddenMappings, settings=SETTINGS)
    missing = [
        m for m in ("hidden", "installed_hidden", "soft_fault", "released_hidden") if not REACHED[m]
    ]
    assert not missing, f"never reached: {missing} ({dict(REACHED)})"


@pytest.mark.timeout(10)
def test_a_released_hidden_page_faults_instead_of_getting_its_old_frame_back() -> None:
    """A page the sample hid, then released (swap-out: ``invalidate``): the guest's next
    touch must ask the platform, not give back the hidden mapping of a frame the platform
    took (the guest would read and write memory that is no longer its page)."""
    rig = FaultRig()
    ex = rig.exposure
    ex.install(pages(5), pages(900), np.array([True]))
    rig.arm(1, [5])
    assert ex.hidden == {5: (900, True)}
    ex.invalidate(pages(5))
    rig.link.replies.append(fault_reply([5], [1234]))
    asyncio.run(rig.faults.ensure(5, write=False))
    assert rig.faults.soft_faults == 0 and len(rig.link.sent) == 1
    assert ex.frame[5] == 1234 and ex.hidden == {}


def test_table_has_no_per_page_column_for_hidden_mappings() -> None:
    """Issue 10's budget: the table's per-page arrays are frame 8 + writable, accessed,
    watched, released_by 1 each + pinned 2 = 14 B per guest page (hidden mappings are in a
    dict bounded by the sample)."""
    ex = ExposureTable(1024)
    per_page = sum(
        v.nbytes for v in vars(ex).values() if isinstance(v, np.ndarray) and len(v) == 1024
    )
    assert per_page == 14 * 1024


def test_unhide_all_gives_back_only_the_pages_asked() -> None:
    """A new sample gives back the hidden mappings of the old one's pages: only those. A
    hidden page not named stays hidden (and watched), with its mapping."""
    ex = ExposureTable(PAGES)
    ex.install(pages(1, 2, 3), pages(901, 902, 903), np.array([True, False, True]))
    ex.hide(pages(1, 2, 3))
    ex.unhide_all(pages(2, 7))
    assert ex.frame[[1, 2, 3]].tolist() == [NO_FRAME, 902, NO_FRAME]
    assert not ex.writable[2]  # the mapping's own bit, given back
    assert ex.hidden == {1: (901, True), 3: (903, True)}
    assert ex.stray_hidden() == []


def test_mapped_in_sees_a_hidden_page_wherever_the_range_starts() -> None:
    """``mapped_in(start, end)`` is indexed from ``start``: a hidden page is mapped at its
    own position in a range that does not start at 0 (page checking's windows), and a
    page at the same offset from 0 is not made mapped by it."""
    ex = ExposureTable(PAGES)
    ex.install(pages(2, 9), pages(902, 909), np.array([True, True]))
    ex.hide(pages(9))
    assert ex.mapped_in(8, PAGES).tolist() == [False, True, False, False]
    assert ex.mapped_in(0, 4).tolist() == [False, False, True, False]
