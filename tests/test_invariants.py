"""The invariant check (``platform_daemon/invariants.py``, ``vmmem-ctl check``).

- A hand-built host state holding one of everything, work in flight included (a swap-out
  being written, a merge in flight, a page selected for a batch, an old frame p2mUpdate
  holds), passes; each kind of violation planted in it is reported by its name, and only
  the names it implies.
- An agent's exposures against the p2m: what a VMM may map, and what it may not.
- The page-life state machine of ``test_page_life.py``, with the check run after every
  step: random interleavings of every service never look like a violation.
- The check of a 2 GiB host takes well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, run_state_machine_as_test

from platform_daemon import invariants
from platform_daemon.allocator import FrameAllocator, FrameState
from platform_daemon.invariants import VIOLATIONS, HostState, check, check_exposures
from platform_daemon.machine import HOST_OWNER
from platform_daemon.p2m import FLAG_MERGED, FLAG_SHARED, P2M
from platform_daemon.shared_frames import SHARED_OWNER
from platform_daemon.swapfile import SwapFile
from shared.constants import NO_FRAME, PAGE_SIZE, PageState, ServiceType
from shared.errors import VMMemError
from shared.exposures import CHUNK_PAGES, Exposures, exposures_chunk
from tests import test_page_life
from tests.test_page_life import LIFE_SETTINGS, PageLife

HOST = 64
E, S, R = PageState.EXPOSED, PageState.SELECTED, PageState.RESIDENT


@dataclass
class Host:
    """A small host with one of everything, consistent (``state()`` checks clean)."""

    alloc: FrameAllocator
    owner_vm: np.ndarray
    owner_bpn: np.ndarray
    refs: np.ndarray
    vms: dict[int, P2M]
    zero: int
    merged: int
    held: int
    swap: SwapFile
    writing: int

    def state(self) -> HostState:
        return HostState(
            allocator=self.alloc,
            owner_vm=self.owner_vm,
            owner_bpn=self.owner_bpn,
            zero_frames=[self.zero],
            refs=self.refs,
            merged_frames=int(np.count_nonzero(self.refs > 0)),
            vms=self.vms,
            held_frames=[self.held],
            swap=self.swap,
            swap_writing=self.writing,
        )

    def private(self, vm_id: int, bpns: list[int], state: PageState = E) -> None:
        p2m = self.vms[vm_id]
        frames = self.alloc.allocate(len(bpns), 0)
        p2m.frame[bpns], p2m.state[bpns] = frames, state
        self.owner_vm[frames], self.owner_bpn[frames] = vm_id, bpns

    def exposures(self, vm_id: int) -> Exposures:
        """What a correct agent maps: exposed and selected pages, writable when private."""
        p2m = self.vms[vm_id]
        mapped = (p2m.state == E) | (p2m.state == S)
        frame = np.where(mapped, p2m.frame, NO_FRAME)
        writable = mapped & ((p2m.flags & FLAG_SHARED) == 0)
        return Exposures(frame, writable, np.empty(0, dtype=np.int64))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    alloc = FrameAllocator(HOST, 1)
    owner_vm = np.full(HOST, -1, dtype=np.int32)
    owner_bpn = np.full(HOST, NO_FRAME, dtype=np.int64)
    refs = np.zeros(HOST, dtype=np.int32)
    zero = int(alloc.allocate(1, 0)[0])
    owner_vm[zero] = HOST_OWNER
    swap = SwapFile(tmp_path / "swap", 16 * PAGE_SIZE)
    h = Host(alloc, owner_vm, owner_bpn, refs, {1: P2M(16), 2: P2M(8)}, zero, -1, -1, swap, 0)
    vm1, vm2 = h.vms[1], h.vms[2]
    h.private(1, [0, 1, 2, 3])
    h.private(1, [9], R)
    vm1.frame[4], vm1.flags[4], vm1.state[4] = zero, FLAG_SHARED, E  # read of untouched memory
    # A merged frame with three sharers in two VMs.
    h.merged = int(alloc.allocate(1, 0)[0])
    owner_vm[h.merged], refs[h.merged] = SHARED_OWNER, 3
    for p2m, bpn, state in ((vm1, 5, E), (vm1, 6, R), (vm2, 0, E)):
        p2m.frame[bpn], p2m.flags[bpn], p2m.state[bpn] = h.merged, FLAG_SHARED | FLAG_MERGED, state
    # A page in swap, and a swap-out being written (its slot taken, no page names it yet).
    slots = swap.allocate(2)
    vm1.state[7], vm1.swap_slot[7] = PageState.SWAPPED, slots[0]
    h.private(1, [8], PageState.IN_FLIGHT)
    vm1.op[8] = ServiceType.SWAP
    h.writing = 1
    # In VM 2: a private page, a merge in flight, a page selected for a batch.
    h.private(2, [1])
    h.private(2, [2], PageState.IN_FLIGHT)
    vm2.op[2] = ServiceType.PAGE_SHARING
    h.private(2, [3], S)
    # A retired merged frame's old copy, kept by p2mUpdate for stale mappings.
    h.held = int(alloc.allocate(1, 0)[0])
    owner_vm[h.held] = SHARED_OWNER
    alloc.retire(HOST - 1)
    try:
        yield h
    finally:
        swap.close()


def test_a_consistent_state_with_work_in_flight_passes(host: Host) -> None:
    """Swap-out being written, merge in flight, selected page, held old frame, retired
    frame: all consistent, no violation."""
    assert check(host.state()) == []
    for vm_id in host.vms:
        assert check_exposures(host.state(), vm_id, host.exposures(vm_id)) == []


def _free_frame(h: Host) -> int:
    return int(np.flatnonzero(h.alloc.frame_state == FrameState.FREE)[0])


def _map_free_frame(h: Host) -> None:
    h.vms[1].frame[0] = _free_frame(h)


def _two_pages_one_frame(h: Host) -> None:
    h.vms[2].frame[1] = h.vms[1].frame[0]


def _shared_page_on_private_frame(h: Host) -> None:
    h.vms[2].frame[0], h.vms[2].flags[0] = h.vms[1].frame[1], FLAG_SHARED
    h.refs[h.merged] -= 1


def _write_done_not_counted(h: Host) -> None:
    h.writing = 0


PLANTED: dict[str, tuple[Callable[[Host], object], set[str]]] = {
    "retired_behind_the_counters": (
        lambda h: h.alloc.frame_state.__setitem__(_free_frame(h), FrameState.RETIRED),
        {"frame_counts"},
    ),
    "exposed_without_frame": (
        lambda h: h.vms[1].state.__setitem__(10, PageState.EXPOSED),
        {"page_state"},
    ),
    "swapped_keeps_frame": (
        lambda h: h.vms[1].frame.__setitem__(7, h.vms[1].frame[0]),
        {"page_state", "frame_multiple_owners", "private_frame_not_owned"},
    ),
    "in_flight_without_op": (
        lambda h: h.vms[1].op.__setitem__(8, 0xFF),
        {"page_state"},
    ),
    # The page's frame was freed (its old frame now leaks).
    "page_maps_a_free_frame": (_map_free_frame, {"private_frame_not_owned", "frame_leaked"}),
    "page_on_another_vms_frame": (
        _two_pages_one_frame,
        {"frame_multiple_owners", "private_frame_not_owned", "frame_leaked"},
    ),
    "shared_page_on_a_private_frame": (
        _shared_page_on_private_frame,
        {"shared_frame_invalid", "shared_refcount"},
    ),
    "merged_frame_counts_one_sharer_too_few": (
        lambda h: h.refs.__setitem__(h.merged, 2),
        {"shared_refcount"},
    ),
    "used_frame_nobody_holds": (lambda h: h.alloc.allocate(1, 0), {"frame_leaked"}),
    "p2m_update_let_go_of_its_frame": (lambda h: setattr(h, "held", -1), {"frame_leaked"}),
    "free_frame_keeps_its_owner": (
        lambda h: h.owner_vm.__setitem__(_free_frame(h), 2),
        {"free_frame_owned"},
    ),
    "slot_taken_by_nobody": (lambda h: h.swap.allocate(1), {"swap_slots"}),
    "finished_write_still_counted": (_write_done_not_counted, {"swap_slots"}),
    "swapped_page_on_a_free_slot": (
        lambda h: h.vms[1].swap_slot.__setitem__(7, 15),
        {"swap_slots"},
    ),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_each_planted_violation_is_reported_by_name(host: Host, case: str) -> None:
    """Each kind of broken state is named (and only with the names it implies)."""
    plant, expected = PLANTED[case]
    plant(host)
    found = check(host.state())
    assert {v.name for v in found} == expected, found
    assert all(v.name in VIOLATIONS and v.count >= 1 and v.detail for v in found)


def test_every_violation_name_is_planted_somewhere() -> None:
    names = set().union(*(names for _, names in PLANTED.values()))
    assert names | {"vm_exposes_foreign_frame"} == set(VIOLATIONS)


def _exposure_case(h: Host, case: str) -> tuple[int, Exposures]:
    vm_id = 1
    ex = h.exposures(vm_id)
    if case == "foreign_frame":
        ex.frame[10], ex.writable[10] = h.vms[2].frame[1], True  # another VM's page
    elif case == "zero_frame_writable":
        ex.writable[4] = True
    elif case == "in_flight_still_mapped":
        ex.frame[8], ex.writable[8] = h.vms[1].frame[8], True  # released, being swapped out
    elif case == "resident_still_mapped":
        ex.frame[9] = h.vms[1].frame[9]
    elif case == "in_flight_to_validation_mapped":  # allowed: held read-ahead, being installed
        h.vms[1].op[8] = ServiceType.VALIDATION
        ex.frame[8], ex.writable[8] = h.vms[1].frame[8], True
    elif case == "held_frame_writable":
        ex.frame[5], ex.writable[5] = h.held, True
    elif case == "stale_held_frame_read_only":  # allowed: p2mUpdate drains it
        ex.frame[5], ex.writable[5] = h.held, False
    elif case == "fault_on_the_wire":  # allowed: the reply may be on either side
        ex.frame[10] = h.vms[2].frame[1]
        ex.faulting = np.array([10])
    elif case == "wrong_size":
        ex = Exposures(ex.frame[:8], ex.writable[:8], ex.faulting)
    return vm_id, ex


@pytest.mark.parametrize(
    ("case", "violated"),
    [
        ("foreign_frame", True),
        ("zero_frame_writable", True),
        ("in_flight_still_mapped", True),
        ("resident_still_mapped", True),
        ("held_frame_writable", True),
        ("wrong_size", True),
        ("stale_held_frame_read_only", False),
        ("fault_on_the_wire", False),
        ("in_flight_to_validation_mapped", False),
    ],
)
def test_agent_mapping_what_the_p2m_does_not_give_it(host: Host, case: str, violated: bool) -> None:
    """A VMM may map a page's current frame while it is exposed or selected, writable only
    when private, or an old frame p2mUpdate holds, read-only; anything else is named."""
    vm_id, ex = _exposure_case(host, case)
    found = check_exposures(host.state(), vm_id, ex, "vm1")
    assert [v.name for v in found] == (["vm_exposes_foreign_frame"] if violated else [])
    if violated:
        assert "vm vm1" in found[0].detail


def test_a_mapping_the_p2m_had_when_the_agent_was_asked_is_allowed(host: Host) -> None:
    """A batch or a fault reply may cross the question: a mapping that fits the p2m as it
    was just before the agent was asked (``earlier``) is allowed; one that fits neither the
    p2m then nor now is not."""
    earlier = invariants.P2MView.of(host.vms[1])
    ex = host.exposures(1)
    host.vms[1].state[0] = PageState.IN_FLIGHT  # released after the agent answered
    host.vms[1].op[0] = ServiceType.SWAP
    assert check_exposures(host.state(), 1, ex, earlier=earlier) == []
    assert [v.name for v in check_exposures(host.state(), 1, ex)] == ["vm_exposes_foreign_frame"]
    ex.frame[1] = host.vms[2].frame[1]  # never this page's frame
    (v,) = check_exposures(host.state(), 1, ex, earlier=earlier)
    assert v.count == 1 and "bpn 1 " in v.detail


class _Table:
    """An exposure table reduced to what ``exposures_chunk`` reads."""

    def __init__(self, frame: npt.NDArray[np.int64], writable: npt.NDArray[np.bool_]) -> None:
        self.guest_pages = len(frame)
        self.frame, self.writable = frame, writable

    def mapped_frame(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return self.frame[idx]

    def mapped_writable(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return self.writable[idx]


def test_exposures_travel_in_chunks_and_come_back_whole() -> None:
    """An agent's table larger than one chunk is read back exactly; a damaged reply is a
    clear error, not a wrong table."""
    n = CHUNK_PAGES + 1000
    rng = np.random.default_rng(1)
    frame = np.where(rng.random(n) < 0.5, rng.integers(0, 1 << 40, n), NO_FRAME)
    writable = (frame >= 0) & (rng.random(n) < 0.5)
    table = _Table(frame, writable)
    chunks = [exposures_chunk(table, {5, n - 1}, {"start": s}) for s in (0, CHUNK_PAGES)]
    got = Exposures.from_chunks(n, chunks)
    assert np.array_equal(got.frame, frame) and np.array_equal(got.writable, writable)
    assert got.faulting.tolist() == [5, n - 1]
    with pytest.raises(VMMemError, match="cover"):
        Exposures.from_chunks(n, chunks[:1])
    broken = dict(chunks[1], frames="not base64!")
    with pytest.raises(VMMemError, match="malformed"):
        Exposures.from_chunks(n, [chunks[0], broken])
    with pytest.raises(VMMemError, match="start"):
        exposures_chunk(table, set(), {"start": True})


@pytest.mark.timeout(60)
def big_host_state(tmp_path: Path) -> tuple[HostState, SwapFile]:
    """2 GiB of frames, eight VMs of 256 MiB mapping all of it (also used by
    ``benchmarks/invariants.py``, which times the check)."""
    host_pages, vms, per_vm = 1 << 19, 8, 1 << 16
    alloc = FrameAllocator(host_pages, 2)
    owner_vm = np.full(host_pages, -1, dtype=np.int32)
    owner_bpn = np.full(host_pages, NO_FRAME, dtype=np.int64)
    zero = [int(alloc.allocate(1, n)[0]) for n in range(2)]
    owner_vm[zero] = HOST_OWNER
    p2ms = {}
    for vm_id in range(1, vms + 1):
        p2m = P2M(per_vm)
        n = per_vm - 4
        frames = alloc.allocate(n, vm_id % 2)
        p2m.frame[:n], p2m.state[:n] = frames, PageState.EXPOSED
        owner_vm[frames], owner_bpn[frames] = vm_id, np.arange(n)
        p2m.frame[n:], p2m.flags[n:], p2m.state[n:] = zero[0], FLAG_SHARED, PageState.EXPOSED
        p2ms[vm_id] = p2m
    swap = SwapFile(tmp_path / "swap", 1 << 20)
    state = HostState(
        alloc, owner_vm, owner_bpn, zero, np.zeros(host_pages, np.int32), 0, p2ms, swap=swap
    )
    return state, swap


def test_check_of_a_full_2gib_host_is_clean(tmp_path: Path) -> None:
    """A host with every frame mapped breaks no invariant (its time: benchmarks/invariants.py)."""
    state, swap = big_host_state(tmp_path)
    try:
        assert check(state) == []
        state.vms[3].frame[7] = state.vms[4].frame[9]  # and one wrong page is still found
        assert "private_frame_not_owned" in {v.name for v in check(state)}
    finally:
        swap.close()


class CheckedPageLife(PageLife):
    """The page-life machine, with the daemon's invariant check and the exposure check run
    after every step: no interleaving of faults, batches, writes landing, merges, retires
    and failed writes may look like a violation (nor hide one the machine's own checks see)."""

    @invariant()
    def daemon_invariants_hold(self) -> None:
        state = HostState(
            allocator=self.machine.allocator,
            owner_vm=self.machine.owner_vm,
            owner_bpn=self.machine.owner_bpn,
            zero_frames=self.machine.zero_frame,
            refs=self.shared.refs,
            merged_frames=self.shared.frames,
            vms={vm.vm_id: vm.p2m for vm in self.vm_list},
            held_frames=list(self.p2m_update.refs),
            swap=self.swap,
            swap_writing=self.swap_svc.writing,
        )
        assert invariants.check(state) == []
        for vm, table in zip(self.vm_list, self.exposure, strict=True):
            exposures = Exposures(
                table.mapped_frame(np.arange(vm.guest_pages)),
                table.mapped_writable(np.arange(vm.guest_pages)),
                np.empty(0, dtype=np.int64),
            )
            assert invariants.check_exposures(state, vm.vm_id, exposures) == []


@pytest.mark.timeout(120)
def test_invariants_hold_through_random_page_lives() -> None:
    test_page_life.REACHED.clear()
    run_state_machine_as_test(CheckedPageLife, settings=settings(LIFE_SETTINGS, max_examples=80))
