"""FrameAllocator's 2 MiB runs: free-run counts, whole-run allocation, claiming a run's free
frames, and the free stacks' invariants after frames leave them from anywhere (lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from platform_daemon.allocator import REBUILD_FRACTION, REBUILD_SLACK, FrameAllocator, FrameState
from shared.constants import PAGES_PER_2M
from shared.errors import VMMemError

pytestmark = pytest.mark.timeout(60)
RUN = PAGES_PER_2M


def run_free_truth(alloc: FrameAllocator) -> np.ndarray:
    free = np.flatnonzero(alloc.frame_state == FrameState.FREE) // RUN
    return np.bincount(free, minlength=alloc.runs)


def check(alloc: FrameAllocator) -> None:
    counts = np.bincount(alloc.frame_state, minlength=3)
    assert alloc.free == counts[FrameState.FREE]
    assert alloc.retired == counts[FrameState.RETIRED]
    for node in range(alloc.nodes):
        assert alloc.free_on(node) == alloc.counts_by_node()[node]["free"]
    assert (alloc.run_free == run_free_truth(alloc)).all()


def test_a_fresh_host_is_all_free_runs() -> None:
    """Every whole run of each node is free at start; a partial run at the end never is."""
    alloc = FrameAllocator(4 * RUN + 100, 2)
    assert [alloc.node_runs(n) for n in (0, 1)] == [(0, 2), (2, 4)]
    assert [alloc.free_runs(n) for n in (0, 1)] == [2, 2]
    assert alloc.run_free[4] == 100 and alloc.runs == 5
    check(alloc)


def test_one_allocated_frame_breaks_a_run_and_its_release_mends_it() -> None:
    """Allocating a single frame takes one run from the count; releasing it gives it back."""
    alloc = FrameAllocator(4 * RUN, 2)
    f = alloc.allocate(1, 0)
    assert alloc.free_runs(0) == 1 and alloc.run_free[0] == RUN - 1
    alloc.release(f)
    assert alloc.free_runs(0) == 2
    check(alloc)


@pytest.mark.parametrize("n", [2, 40, 64, 65, 600])
def test_batches_across_runs_keep_every_runs_count(n: int) -> None:
    """Allocations and releases of any size, lying in one run or across several (the stack
    handed out scattered frames after mixed releases), keep each run's free count exact:
    each size takes its own counting path."""
    alloc = FrameAllocator(8 * RUN, 1)
    rng = np.random.default_rng(n)
    first = alloc.allocate(6 * RUN, 0)
    back = rng.permutation(first)[: 3 * RUN]  # scattered over six runs, pushed in this order
    alloc.release(back)
    check(alloc)
    taken = alloc.allocate(n, 0)
    assert len(np.unique(taken // RUN)) > 1 or n <= 2
    check(alloc)
    alloc.release(taken)
    check(alloc)


def test_allocate_run_hands_out_an_aligned_run_of_the_node() -> None:
    """512 aligned frames of the asked node, marked USED; none is ever handed out again by
    the free stack until released; then the run is free again."""
    alloc = FrameAllocator(4 * RUN, 2)
    alloc.allocate(3, 1)  # run 2 is not whole any more
    run = alloc.allocate_run(1)
    assert run is not None
    assert run[0] % RUN == 0 and (np.diff(run) == 1).all() and len(run) == RUN
    assert run[0] == 3 * RUN  # the only whole run left on node 1
    assert (alloc.frame_state[run] == FrameState.USED).all()
    assert alloc.free_runs(1) == 0 and alloc.allocate_run(1) is None
    rest = alloc.allocate(alloc.free_on(1), 1)  # everything else of the node
    assert not np.isin(rest, run).any()
    check(alloc)
    alloc.release(run)
    assert alloc.free_runs(1) == 1
    check(alloc)


def test_allocate_run_looks_at_a_window_from_a_hand() -> None:
    """One call looks at ``window`` runs only; the hand moves on, so later calls find runs
    further on (the cost per call is bounded, the whole node is still covered)."""
    alloc = FrameAllocator(8 * RUN, 1)
    for r in range(6):  # runs 0..5 broken, 6 and 7 whole
        alloc.allocate_run(0)
        alloc.release(np.array([r * RUN + 1]))
    assert alloc.free_runs(0) == 2
    alloc._nodes[0].run_hand = 0
    assert alloc.find_run(0, window=3) is None  # runs 0-2
    assert alloc.find_run(0, window=3) is None  # runs 3-5
    got = alloc.allocate_run(0, window=3)  # runs 6-8 (wrapping)
    assert got is not None and got[0] == 6 * RUN
    check(alloc)


def test_claim_free_takes_only_the_runs_free_frames() -> None:
    """A claimed run's free frames leave the free pool (USED, no owner); the used ones stay
    with their owners; nothing allocated afterwards lands in the run."""
    alloc = FrameAllocator(4 * RUN, 1)
    used = alloc.allocate(10, 0)  # frames 0..9 of run 0
    claimed = alloc.claim_free(0)
    assert claimed.tolist() == list(range(10, RUN))
    assert alloc.run_free[0] == 0 and alloc.free == 3 * RUN
    later = alloc.allocate(3 * RUN, 0)
    assert (later >= RUN).all()
    check(alloc)
    alloc.release(used)
    alloc.release(claimed)
    assert alloc.run_free[0] == RUN
    check(alloc)


def test_claim_free_out_of_range() -> None:
    alloc = FrameAllocator(2 * RUN, 1)
    with pytest.raises(VMMemError, match="out of range"):
        alloc.claim_free(2)


def test_a_frame_claimed_freed_and_stacked_twice_is_handed_out_once() -> None:
    """A claimed frame keeps a stale entry in the stack; freed again it is pushed again. The
    pop that meets both copies hands it out once, and the counts stay right."""
    alloc = FrameAllocator(2 * RUN, 1)
    claimed = alloc.claim_free(0)  # all of run 0; its stale entries are on top of the stack
    alloc.release(claimed[:5])  # 5 frames now twice in the stack
    got = alloc.allocate(2 * RUN - RUN + 5, 0)
    assert len(np.unique(got)) == len(got)
    assert alloc.free == 0
    check(alloc)


def test_the_stack_is_rebuilt_when_stale_entries_pile_up() -> None:
    """Runs handed out and released again, over and over, leave stale entries; the stack is
    rebuilt before they outnumber the live ones by the node's slack, so it stays bounded."""
    alloc = FrameAllocator(64 * RUN, 1)
    for _ in range(200):
        run = alloc.allocate_run(0)
        assert run is not None
        alloc.release(run)
    ns = alloc._nodes[0]
    assert ns.slack == REBUILD_SLACK  # a small node: the fixed minimum
    assert ns.stale <= ns.free + ns.slack
    assert len(ns.stack) <= 3 * 64 * RUN
    check(alloc)
    assert len(np.unique(alloc.allocate(alloc.free, 0))) == 64 * RUN


def test_rebuilds_cost_a_bounded_number_of_reads_per_stale_entry_on_a_big_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node of 2**20 frames with little free (8 runs) and runs handed out and given back
    over and over (promotion and defrag on a full host): each rebuild scans the whole node,
    so rebuilds must be rarer on a bigger node. The frame states read by rebuilds stay
    within REBUILD_FRACTION (+1) per stale entry made, whatever the node's size."""
    frames = 1 << 20
    alloc = FrameAllocator(frames, 1)
    alloc.allocate(frames - 8 * RUN, 0)
    rebuilds = 0
    rebuild = alloc._rebuild

    def counted(ns: Any) -> None:
        nonlocal rebuilds
        rebuilds += 1
        rebuild(ns)

    monkeypatch.setattr(alloc, "_rebuild", counted)
    rounds = 2000
    for _ in range(rounds):
        run = alloc.allocate_run(0)
        assert run is not None
        alloc.release(run)
    assert rebuilds >= 1  # (the workload does make stale entries pile up)
    assert rebuilds * frames <= (REBUILD_FRACTION + 1) * rounds * RUN
    assert alloc.free == 8 * RUN
    check(alloc)


class RunMachine(RuleBasedStateMachine):
    """Random frames, runs, claims, releases and retirements: no frame is ever handed out
    twice, and every counter (free per node, free per run) matches the frame states."""

    @initialize(pages=st.sampled_from([4 * RUN, 6 * RUN + 7]), nodes=st.integers(1, 2))
    def setup(self, pages: int, nodes: int) -> None:
        self.alloc = FrameAllocator(pages, nodes)
        self.held: set[int] = set()

    def _take(self, frames: np.ndarray) -> None:
        got = frames.tolist()
        assert not (set(got) & self.held), "a frame handed out twice"
        assert len(set(got)) == len(got)
        self.held |= set(got)

    @rule(n=st.integers(0, 700), node=st.integers(0, 1))
    def allocate(self, n: int, node: int) -> None:
        node %= self.alloc.nodes
        if n <= self.alloc.free:
            self._take(self.alloc.allocate(n, node))

    @rule(node=st.integers(0, 1))
    def allocate_run(self, node: int) -> None:
        run = self.alloc.allocate_run(node % self.alloc.nodes)
        if run is not None:
            self._take(run)

    @rule(run=st.integers(0, 5))
    def claim(self, run: int) -> None:
        self._take(self.alloc.claim_free(run % self.alloc.runs))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.held:
            return
        frames = data.draw(st.lists(st.sampled_from(sorted(self.held)), unique=True))
        self.alloc.release(np.array(frames, dtype=np.int64))
        self.held -= set(frames)

    @rule(mpn=st.integers(0, 4 * RUN - 1))
    def retire_free(self, mpn: int) -> None:
        if self.alloc.frame_state[mpn] == FrameState.FREE:
            self.alloc.retire(mpn)

    @invariant()
    def counts(self) -> None:
        if hasattr(self, "alloc"):
            check(self.alloc)


TestRunMachine = RunMachine.TestCase
TestRunMachine.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
