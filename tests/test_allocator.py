"""FrameAllocator: per-node free stacks, all-or-nothing allocation, double frees, retirement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from platform_daemon.allocator import FrameAllocator, FrameState
from shared.errors import OutOfMemoryError, VMMemError


def in_node(alloc: FrameAllocator, frames: np.ndarray, node: int) -> bool:
    """True when every frame lies in ``node``'s MPN range."""
    first, last = alloc.node_bounds[node]
    return bool(np.all((frames >= first) & (frames < last)))


def check_counts(alloc: FrameAllocator) -> None:
    """The counters agree with the frame-state array, host-wide and per node."""
    counts = np.bincount(alloc.frame_state, minlength=3)
    assert alloc.free == counts[FrameState.FREE]
    assert alloc.used == counts[FrameState.USED]
    assert alloc.retired == counts[FrameState.RETIRED]
    assert alloc.free + alloc.used + alloc.retired == alloc.host_pages
    for node, by_state in enumerate(alloc.counts_by_node()):
        assert alloc.free_on(node) == by_state["free"]


# ---- geometry -----------------------------------------------------------------------------


def test_nodes_are_contiguous_and_cover_host() -> None:
    """Node ranges are contiguous, in order, and cover every frame exactly once."""
    alloc = FrameAllocator(3000, 3)
    assert alloc.node_bounds[0][0] == 0 and alloc.node_bounds[-1][1] == 3000
    for (_, end), (start, _) in itertools.pairwise(alloc.node_bounds):
        assert end == start
    expected = np.concatenate([np.full(b - a, n) for n, (a, b) in enumerate(alloc.node_bounds)])
    assert np.array_equal(alloc.node_of(np.arange(3000)), expected)


@pytest.mark.parametrize(("pages", "nodes"), [(1024, 2), (1600, 3), (4096, 4), (512 * 7 + 1, 7)])
def test_node_bounds_aligned_to_2m(pages: int, nodes: int) -> None:
    """With at least 2 MB per node, inner node boundaries sit on 512-frame boundaries."""
    alloc = FrameAllocator(pages, nodes)
    assert all(a % 512 == 0 for a, _ in alloc.node_bounds)
    assert all(b - a >= 512 for a, b in alloc.node_bounds)


def test_small_host_still_splits() -> None:
    """Below 2 MB per node every node still gets at least one frame."""
    alloc = FrameAllocator(5, 4)
    assert all(b > a for a, b in alloc.node_bounds)
    assert alloc.free == 5


@pytest.mark.parametrize(("pages", "nodes"), [(0, 1), (3, 4), (10, 0)])
def test_bad_geometry(pages: int, nodes: int) -> None:
    """Fewer frames than nodes, or no node at all, raises ValueError."""
    with pytest.raises(ValueError):
        FrameAllocator(pages, nodes)


# ---- allocation ---------------------------------------------------------------------------


def test_allocate_zero() -> None:
    """Allocating zero frames returns an empty int64 array and changes nothing."""
    alloc = FrameAllocator(16, 2)
    got = alloc.allocate(0, 0)
    assert got.dtype == np.int64 and len(got) == 0
    assert alloc.free == 16


def test_allocate_lowest_first_and_marks_used() -> None:
    """A fresh node hands out its lowest MPNs first, and they become USED."""
    alloc = FrameAllocator(1024, 2)
    got = alloc.allocate(4, 1)
    assert got.tolist() == [512, 513, 514, 515]
    assert (alloc.frame_state[got] == FrameState.USED).all()
    check_counts(alloc)


@pytest.mark.parametrize("node", [0, 1, 2])
def test_node_preference(node: int) -> None:
    """Frames come from the requested node while it has enough."""
    alloc = FrameAllocator(1536, 3)
    got = alloc.allocate(512, node)
    assert in_node(alloc, got, node)
    assert alloc.free_on(node) == 0


def test_node_fallback() -> None:
    """When the node runs out, the rest comes from the other nodes, the node's own first."""
    alloc = FrameAllocator(1536, 3)
    got = alloc.allocate(600, 1)
    assert len(got) == len(np.unique(got)) == 600
    assert in_node(alloc, got[:512], 1)
    assert not in_node(alloc, got[512:], 1)
    assert alloc.free_on(1) == 0
    assert alloc.free == 1536 - 600
    check_counts(alloc)


def test_allocate_whole_host_from_any_node() -> None:
    """Every frame can be allocated, whichever node is asked first, and each only once."""
    alloc = FrameAllocator(1024, 2)
    got = alloc.allocate(1024, 1)
    assert sorted(got.tolist()) == list(range(1024))
    assert alloc.free == 0


def test_out_of_memory_is_all_or_nothing() -> None:
    """Asking for more frames than are free raises OutOfMemoryError and allocates none."""
    alloc = FrameAllocator(1024, 2)
    held = alloc.allocate(1000, 0)
    before = alloc.frame_state.copy()
    with pytest.raises(OutOfMemoryError):
        alloc.allocate(25, 1)
    assert np.array_equal(alloc.frame_state, before)
    assert alloc.free == 24
    rest = alloc.allocate(24, 1)
    assert not set(rest.tolist()) & set(held.tolist())
    with pytest.raises(OutOfMemoryError):
        alloc.allocate(1, 0)


def test_out_of_memory_error_code() -> None:
    """OutOfMemoryError carries the OUT_OF_MEMORY wire code."""
    alloc = FrameAllocator(8, 1)
    with pytest.raises(OutOfMemoryError) as info:
        alloc.allocate(9, 0)
    assert info.value.code.name == "OUT_OF_MEMORY"


# ---- release ------------------------------------------------------------------------------


def test_release_makes_frames_reusable() -> None:
    """Released frames go back to their own node and are handed out again."""
    alloc = FrameAllocator(1024, 2)
    got = alloc.allocate(1024, 0)
    alloc.release(got[[5, 700]])
    assert alloc.free_on(0) == 1 and alloc.free_on(1) == 1
    again = alloc.allocate(2, 0)
    assert sorted(again.tolist()) == sorted(got[[5, 700]].tolist())
    check_counts(alloc)


def test_release_empty() -> None:
    """Releasing an empty array is a no-op."""
    alloc = FrameAllocator(8, 1)
    alloc.release(np.empty(0, np.int64))
    assert alloc.free == 8


def test_double_free_raises() -> None:
    """Releasing a frame that is already free raises and changes nothing."""
    alloc = FrameAllocator(16, 2)
    got = alloc.allocate(4, 0)
    alloc.release(got[:2])
    before = alloc.frame_state.copy()
    with pytest.raises(VMMemError):
        alloc.release(got[1:3])  # got[1] is free already
    assert np.array_equal(alloc.frame_state, before)
    check_counts(alloc)


def test_duplicate_in_one_release_raises() -> None:
    """The same frame twice in one release batch raises."""
    alloc = FrameAllocator(16, 2)
    got = alloc.allocate(4, 0)
    with pytest.raises(VMMemError):
        alloc.release(np.array([got[0], got[0]]))
    assert alloc.used == 4


def test_release_never_allocated_raises() -> None:
    """Releasing a frame that was never handed out raises."""
    alloc = FrameAllocator(16, 2)
    with pytest.raises(VMMemError):
        alloc.release(np.array([3]))


@pytest.mark.parametrize("mpn", [-1, -16, 16, 1 << 40])
def test_release_out_of_range_raises(mpn: int) -> None:
    """Releasing an MPN outside the host (e.g. NO_FRAME) raises instead of wrapping around."""
    alloc = FrameAllocator(16, 2)
    alloc.allocate(16, 0)
    with pytest.raises(VMMemError):
        alloc.release(np.array([mpn]))
    assert alloc.free == 0
    check_counts(alloc)


# ---- retirement ---------------------------------------------------------------------------


def test_retire_free_frame() -> None:
    """Retiring a free frame returns True, leaves the free count and is never handed out."""
    alloc = FrameAllocator(1024, 2)
    assert alloc.retire(0) is True
    assert alloc.retire(1) is True
    assert alloc.free == 1022 and alloc.retired == 2 and alloc.free_on(0) == 510
    got = alloc.allocate(1022, 0)
    assert 0 not in got and 1 not in got
    assert len(np.unique(got)) == 1022
    with pytest.raises(OutOfMemoryError):
        alloc.allocate(1, 0)
    check_counts(alloc)


def test_retire_is_idempotent() -> None:
    """Retiring a retired frame returns False and counts it once."""
    alloc = FrameAllocator(16, 1)
    assert alloc.retire(3) is True
    assert alloc.retire(3) is False
    assert alloc.retired == 1 and alloc.free == 15


def test_retire_used_frame() -> None:
    """retire() of a used frame returns False; the frame leaves use and cannot be released."""
    alloc = FrameAllocator(16, 1)
    got = alloc.allocate(4, 0)
    assert alloc.retire(int(got[2])) is False
    assert alloc.frame_state[got[2]] == FrameState.RETIRED
    assert alloc.used == 3 and alloc.retired == 1 and alloc.free == 12
    with pytest.raises(VMMemError):
        alloc.release(got[2:3])
    check_counts(alloc)


def test_retire_used_batch() -> None:
    """retire_used() retires used frames instead of freeing them; free frames are refused."""
    alloc = FrameAllocator(16, 2)
    got = alloc.allocate(6, 0)
    alloc.retire_used(got[:3])
    assert alloc.retired == 3 and alloc.used == 3
    with pytest.raises(VMMemError):
        alloc.retire_used(got[:1])  # retired already
    alloc.release(got[3:])
    with pytest.raises(VMMemError):
        alloc.retire_used(got[3:4])  # free
    assert alloc.allocate(13, 1).size == 13  # everything but the retired three
    check_counts(alloc)


@pytest.mark.parametrize("batch", [[-1], [16], [2, 2]])
def test_retire_used_bad_batch(batch: list[int]) -> None:
    """retire_used() of an out-of-range or repeated MPN raises and keeps the counts exact."""
    alloc = FrameAllocator(16, 1)
    alloc.allocate(16, 0)
    with pytest.raises(VMMemError):
        alloc.retire_used(np.array(batch))
    assert alloc.retired == 0 and alloc.used == 16
    check_counts(alloc)


@pytest.mark.parametrize("mpn", [-1, 16])
def test_retire_out_of_range(mpn: int) -> None:
    """retire() of an MPN outside the host raises."""
    with pytest.raises(VMMemError):
        FrameAllocator(16, 1).retire(mpn)


def test_lazily_skipped_retired_frames_are_never_handed_out() -> None:
    """Frames retired while on the free stack are skipped lazily, across many cycles."""
    alloc = FrameAllocator(64, 2)
    rng = np.random.default_rng(1)
    retired: set[int] = set()
    for _ in range(20):
        held = alloc.allocate(int(rng.integers(1, alloc.free + 1)), int(rng.integers(0, 2)))
        assert not retired & set(held.tolist())
        alloc.release(held)
        if alloc.free > 4:
            victim = int(rng.choice(np.flatnonzero(alloc.frame_state == FrameState.FREE)))
            assert alloc.retire(victim)
            retired.add(victim)
        check_counts(alloc)
    everything = alloc.allocate(alloc.free, 0)
    assert not retired & set(everything.tolist())
    assert len(everything) + len(retired) == 64


# ---- random sequences ---------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / release / retire sequences against a model of who holds what."""

    @initialize(pages=st.integers(1, 1600), nodes=st.integers(1, 4))
    def setup(self, pages: int, nodes: int) -> None:
        nodes = min(nodes, pages)
        self.alloc = FrameAllocator(pages, nodes)
        self.held: set[int] = set()
        self.retired: set[int] = set()

    @rule(n=st.integers(0, 700), node=st.integers(0, 3))
    def allocate(self, n: int, node: int) -> None:
        node %= self.alloc.nodes
        free_before = self.alloc.free
        free_on_node = self.alloc.free_on(node)
        if n > free_before:
            with pytest.raises(OutOfMemoryError):
                self.alloc.allocate(n, node)
            assert self.alloc.free == free_before
            return
        got = self.alloc.allocate(n, node)
        frames = set(got.tolist())
        assert len(got) == len(frames) == n
        assert not frames & self.held, "a frame was handed out twice"
        assert not frames & self.retired, "a retired frame was handed out"
        # The preferred node is drained before any other is touched.
        assert int(np.count_nonzero(self.alloc.node_of(got) == node)) == min(n, free_on_node)
        self.held |= frames

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pick = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        self.alloc.release(np.array(pick))
        self.held -= set(pick)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        free = np.flatnonzero(self.alloc.frame_state != FrameState.USED)
        if len(free) == 0:
            return
        bad = int(data.draw(st.sampled_from(free.tolist())))
        pick = [data.draw(st.sampled_from(sorted(self.held))), bad]
        with pytest.raises(VMMemError):
            self.alloc.release(np.array(pick))

    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        mpn = data.draw(st.integers(0, self.alloc.host_pages - 1))
        was_free = self.alloc.frame_state[mpn] == FrameState.FREE
        assert self.alloc.retire(mpn) == was_free
        self.held.discard(mpn)
        self.retired.add(mpn)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def retire_used(self, data: st.DataObject) -> None:
        pick = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        self.alloc.retire_used(np.array(pick))
        self.held -= set(pick)
        self.retired |= set(pick)

    @invariant()
    def counts_match(self) -> None:
        if not hasattr(self, "alloc"):
            return
        check_counts(self.alloc)
        assert self.alloc.used == len(self.held)
        assert self.alloc.retired == len(self.retired)
        held = np.array(sorted(self.held), dtype=np.int64)
        assert (self.alloc.frame_state[held] == FrameState.USED).all()


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.__doc__ = "No frame handed out twice; free+used+retired == total, always."
