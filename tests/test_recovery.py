"""Taking over a crashed daemon's state: every cut an operation can leave, resolved.

The daemon's p2m, frame states and swap checksums live in mapped files (``persist.py``); a
daemon killed between two stores of one operation leaves them half-updated. Each test here
writes the arrays exactly as such a cut leaves them and checks what ``reconcile`` makes of
it: no page loses its content, no frame or swap slot leaks, flags agree with sharing.
The end-to-end crash tests are in ``test_e2e_crash.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from platform_daemon.allocator import FrameAllocator, FrameState
from platform_daemon.p2m import FLAG_MERGED, FLAG_SHARED, NO_OP, NO_SLOT, P2M
from platform_daemon.persist import (
    P2MFile,
    P2MHeader,
    StateError,
    StateFile,
    StatePaths,
)
from platform_daemon.recovery import open_p2ms, open_state, reconcile
from shared.config import PlatformConfig
from shared.constants import NO_FRAME, PAGE_SIZE, PageState, ServiceType
from shared.messages import Register

HOST_PAGES = 2048
SLOTS = 64
ZERO = [0, 1024]  # one zero frame per node
GUEST = 32
USED, FREE, RETIRED = int(FrameState.USED), int(FrameState.FREE), int(FrameState.RETIRED)


class Host:
    """A state file and VMs' p2m files as a daemon leaves them, before reconciliation."""

    def __init__(self, tmp: Path) -> None:
        self.paths = StatePaths(tmp, "test")
        self.state = StateFile.create(
            self.paths.state, host_pages=HOST_PAGES, nodes=2, swap_slots=SLOTS, swap_path="s"
        )
        self.state.header.zero_frames = list(ZERO)
        self.state.write_header()
        self.state.frame_state[ZERO] = USED
        self.files: list[P2MFile] = []

    def vm(self, vm_id: int) -> P2M:
        info = Register(name=f"vm{vm_id}", guest_pages=GUEST, vcpus=1, pid=1000 + vm_id)
        f = P2MFile.create(self.paths.p2m(vm_id), P2MHeader(vm_id, vm_id, GUEST, 0, info))
        self.files.append(f)
        return f.p2m

    def map(self, p2m: P2M, bpn: int, frame: int, flags: int = 0) -> None:
        """A page exposed with ``frame`` (the allocator marked the frame used)."""
        p2m.frame[bpn] = frame
        p2m.state[bpn] = PageState.EXPOSED
        p2m.flags[bpn] = flags
        self.state.frame_state[frame] = USED

    def swapped(self, p2m: P2M, bpn: int, slot: int) -> None:
        p2m.state[bpn] = PageState.SWAPPED
        p2m.swap_slot[bpn] = slot
        self.state.swap_checksum[slot] = 0xC0FFEE + slot

    def reconcile(self):  # type: ignore[no-untyped-def]
        return reconcile(self.state, self.files)

    def close(self) -> None:
        for f in self.files:
            f.close(unlink=False)
        self.state.close(unlink=False)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_settled_pages_are_kept_as_they_are(host: Host) -> None:
    p = host.vm(1)
    host.map(p, 0, 10)
    host.map(p, 1, ZERO[0], FLAG_SHARED)  # a read of an untouched page
    host.swapped(p, 2, 5)
    p.state[3] = PageState.RESIDENT  # moved by the platform, not mapped by the VMM
    p.frame[3] = 11
    host.state.frame_state[11] = USED
    before = {name: getattr(p, name).copy() for name, _ in P2M.FIELDS}
    out = host.reconcile()
    for name, _ in P2M.FIELDS:
        assert np.array_equal(getattr(p, name), before[name]), name
    assert out.pages_undone == 0
    assert out.frames_freed == 0
    assert out.swap_slots_in_use.tolist() == [5]
    assert sorted(np.flatnonzero(host.state.frame_state == USED).tolist()) == [0, 10, 11, 1024]
    assert out.refs.sum() == 0  # the zero frame is not reference-counted


def test_operations_in_flight_are_undone_and_pages_keep_their_frames(host: Host) -> None:
    """A batch handed out (SELECTED) or released and in flight (a swap-out writing, a merge
    waiting): the page is exposed again with the frame it had, its op forgotten."""
    p = host.vm(1)
    for bpn, frame in ((0, 20), (1, 21)):
        host.map(p, bpn, frame)
    p.state[0] = PageState.SELECTED
    p.state[1] = PageState.IN_FLIGHT
    p.op[1] = ServiceType.SWAP
    out = host.reconcile()
    assert p.state[:2].tolist() == [PageState.EXPOSED, PageState.EXPOSED]
    assert p.frame[:2].tolist() == [20, 21]
    assert (p.op == NO_OP).all()
    assert out.pages_undone == 2
    assert host.state.frame_state[[20, 21]].tolist() == [USED, USED]


def test_swap_out_cut_before_its_frame_is_dropped_keeps_the_frame_and_frees_the_slot(
    host: Host,
) -> None:
    """``_written`` stores state, then slot, then frame = -1, then frees the frame. Cut
    after the slot: the frame still holds the page, the slot is not needed."""
    p = host.vm(1)
    host.map(p, 0, 30)
    p.state[0] = PageState.SWAPPED
    p.swap_slot[0] = 7
    out = host.reconcile()
    assert (p.state[0], p.frame[0], p.swap_slot[0]) == (PageState.EXPOSED, 30, NO_SLOT)
    assert out.slots_freed == 1
    assert out.swap_slots_in_use.tolist() == []


def test_swap_out_cut_before_the_frame_is_freed_frees_it(host: Host) -> None:
    """Cut after frame = -1, before the allocator took the frame back: swapped, frame free."""
    p = host.vm(1)
    host.state.frame_state[31] = USED
    host.swapped(p, 0, 8)
    out = host.reconcile()
    assert (p.state[0], p.swap_slot[0]) == (PageState.SWAPPED, 8)
    assert host.state.frame_state[31] == FREE
    assert out.frames_freed == 1
    assert out.swap_slots_in_use.tolist() == [8]


def test_swap_in_cut_after_allocating_frees_the_frames(host: Host) -> None:
    """Frames allocated for a swap-in (or a first touch, a copy) that no p2m entry names
    yet: free again; the page is still swapped."""
    p = host.vm(1)
    host.swapped(p, 0, 9)
    host.state.frame_state[[40, 41]] = USED
    out = host.reconcile()
    assert host.state.frame_state[[40, 41]].tolist() == [FREE, FREE]
    assert out.frames_freed == 2
    assert p.state[0] == PageState.SWAPPED


def test_swap_in_cut_before_the_slot_is_released_keeps_the_frame(host: Host) -> None:
    """``_install`` maps the frame, then clears the slot: cut between, the frame wins."""
    p = host.vm(1)
    host.map(p, 0, 42)
    p.swap_slot[0] = 10
    out = host.reconcile()
    assert (p.state[0], p.frame[0], p.swap_slot[0]) == (PageState.EXPOSED, 42, NO_SLOT)
    assert out.slots_freed == 1


def test_first_touch_cut_before_the_state_store_maps_the_page(host: Host) -> None:
    p = host.vm(1)
    p.frame[0] = 43  # frame stored, state still ZERO
    host.state.frame_state[43] = USED
    host.reconcile()
    assert (p.state[0], p.frame[0]) == (PageState.EXPOSED, 43)


def test_merge_cut_before_the_flags_shares_the_frame_read_only(host: Host) -> None:
    """A merge stores the shared frame, then the flags, then frees the duplicate. Cut
    between: the page names a frame another page shares; it becomes a sharer too (flags
    set, counted), so neither can write it in place, and its own frame is freed."""
    a, b = host.vm(1), host.vm(2)
    host.map(b, 0, 50, FLAG_SHARED | FLAG_MERGED)  # the merged frame, first sharer
    host.state.frame_state[51] = USED  # a's own frame, not yet freed
    a.frame[0] = 50
    a.state[0] = PageState.RESIDENT
    out = host.reconcile()
    assert a.flags[0] == FLAG_SHARED | FLAG_MERGED
    assert out.refs[50] == 2
    assert host.state.frame_state[51] == FREE


def test_merge_into_the_zero_frame_cut_before_the_flags(host: Host) -> None:
    p = host.vm(1)
    p.frame[0] = ZERO[0]
    p.state[0] = PageState.RESIDENT
    out = host.reconcile()
    assert p.flags[0] & FLAG_SHARED
    assert out.refs[ZERO[0]] == 0


def test_two_pages_on_one_frame_without_flags_are_made_shared(host: Host) -> None:
    """Never left by a cut of one operation, but if it were: read-only for both, counted."""
    p = host.vm(1)
    host.map(p, 0, 60)
    host.map(p, 1, 60)
    out = host.reconcile()
    assert (p.flags[:2] & FLAG_SHARED).all()
    assert out.refs[60] == 2


def test_copy_on_write_cut_before_the_flags_leaves_a_private_copy_shared_once(host: Host) -> None:
    """COW stores the new frame, then clears the flags, then drops a sharer of the old.
    Cut between: the copy is a merged frame of one sharer (a write makes it private, with no
    copy), the old frame counts one sharer less."""
    a, b = host.vm(1), host.vm(2)
    host.map(b, 0, 70, FLAG_SHARED | FLAG_MERGED)
    host.map(a, 0, 71, FLAG_SHARED | FLAG_MERGED)  # a's copy, flags not cleared yet
    out = host.reconcile()
    assert out.refs[70] == 1
    assert out.refs[71] == 1
    assert a.flags[0] & FLAG_SHARED


def test_private_page_flags_are_cleared(host: Host) -> None:
    """A stray FLAG_MERGED on a page of its own frame (the last sharer took it) is dropped
    only when no one else maps the frame and it was not flagged shared."""
    p = host.vm(1)
    host.map(p, 0, 80, FLAG_MERGED)
    host.reconcile()
    assert p.flags[0] == 0


def test_failing_and_retired_frames(host: Host) -> None:
    p = host.vm(1)
    host.map(p, 0, 90)
    host.state.failing[[90, 91]] = True  # 90 is in use, 91 was freed before the crash
    host.state.frame_state[91] = USED
    host.state.frame_state[92] = RETIRED
    host.map(p, 1, 93)
    host.state.frame_state[93] = RETIRED  # cannot happen; the page must not be lost
    out = host.reconcile()
    fs = host.state.frame_state
    assert fs[[90, 91, 92, 93]].tolist() == [USED, RETIRED, RETIRED, USED]
    assert host.state.failing[[90, 91, 93]].tolist() == [True, False, True]
    assert out.frames_retired == 1


def test_allocator_adopts_the_reconciled_frame_states(host: Host) -> None:
    p = host.vm(1)
    host.map(p, 0, 100)
    host.state.frame_state[101] = RETIRED
    host.state.frame_state[102] = USED  # an orphan
    host.reconcile()
    alloc = FrameAllocator(HOST_PAGES, 2, host.state.frame_state)
    assert alloc.used == 3  # two zero frames and frame 100
    assert alloc.retired == 1
    assert alloc.free == HOST_PAGES - 4
    got = alloc.allocate(alloc.free, 0)
    assert not set(got.tolist()) & {0, 100, 101, 1024}
    assert 102 in got.tolist()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.frame.__setitem__(3, HOST_PAGES),
        lambda p: p.frame.__setitem__(3, -5),
        lambda p: p.swap_slot.__setitem__(3, SLOTS),
        lambda p: p.state.__setitem__(3, 99),
    ],
    ids=["frame-beyond-memory", "negative-frame", "slot-beyond-swap", "unknown-state"],
)
def test_damaged_p2m_is_refused_by_name(host: Host, damage) -> None:  # type: ignore[no-untyped-def]
    p = host.vm(1)
    damage(p)
    with pytest.raises(StateError, match=r"vm1\.p2m: pages \[3\]"):
        host.reconcile()


def test_two_pages_on_one_slot_are_refused(host: Host) -> None:
    p = host.vm(1)
    host.swapped(p, 0, 4)
    host.swapped(p, 1, 4)
    with pytest.raises(StateError, match="same swap slot"):
        host.reconcile()


def test_headers_are_checked(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.vm(1)
    host.close()
    state_path, p2m_path = host.paths.state, host.paths.p2m(1)
    # Intact: both open again, with their contents.
    st = StateFile.open(state_path)
    assert st.header.zero_frames == ZERO
    assert st.header.generation == 2  # every daemon that opens it counts one
    files = open_p2ms(host.paths)
    assert files[0].header.info.name == "vm1"
    for f in files:
        f.close(unlink=False)
    st.close(unlink=False)
    for path in (state_path, p2m_path):
        raw = bytearray(path.read_bytes())
        raw[40] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="header checksum mismatch"):
        StateFile.open(state_path)
    with pytest.raises(StateError, match="header checksum mismatch"):
        open_p2ms(host.paths)


def test_a_live_daemons_state_cannot_be_adopted(tmp_path: Path) -> None:
    host = Host(tmp_path)
    try:
        with pytest.raises(StateError, match="held by a running daemon"):
            StateFile.open(host.paths.state)
    finally:
        host.close()


def _config(tmp: Path, **kw: object) -> PlatformConfig:
    base: dict[str, object] = {
        "socket": tmp / "p.sock",
        "mem_dir": tmp,
        "host_memory": HOST_PAGES * PAGE_SIZE,
        "metrics_port": -1,
    }
    return PlatformConfig(**{**base, **kw})


def test_open_state_refuses_other_settings_naming_them(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    paths = StatePaths.for_socket(tmp_path, cfg.socket)
    state, recovered = open_state(cfg, paths)
    assert not recovered
    state.header.zero_frames = list(ZERO)  # the daemon finished starting
    state.write_header()
    state.close(unlink=False)
    paths.machine.write_bytes(b"")  # the machine file exists
    other = _config(tmp_path, host_memory=2 * HOST_PAGES * PAGE_SIZE, numa_nodes=1)
    with pytest.raises(StateError, match=r"--host-memory .*--numa-nodes 2 \(now 1\)"):
        open_state(other, paths)
    assert paths.state.exists()  # refused: nothing removed
    state, recovered = open_state(cfg, paths)
    assert recovered
    state.close(unlink=False)


def test_fresh_and_leftovers_are_removed_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    paths = StatePaths.for_socket(tmp_path, cfg.socket)
    state, _ = open_state(cfg, paths)
    state.close(unlink=False)
    paths.machine.write_bytes(b"x")
    paths.region(3).write_bytes(b"x")
    fresh = _config(tmp_path, fresh=True)
    state, recovered = open_state(fresh, paths)
    assert not recovered
    assert not paths.machine.exists() and not paths.region(3).exists()
    state.close(unlink=True)
    out = capsys.readouterr().out
    assert "stale_state_removed" in out and "--fresh" in out
    # Files without a state file (a daemon that died while starting) go too, said so.
    paths.machine.write_bytes(b"x")
    state, recovered = open_state(cfg, paths)
    assert not recovered and not paths.machine.exists()
    state.close(unlink=True)
    assert "died while starting" in capsys.readouterr().out


def test_p2m_file_round_trip_and_detach(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path, "t")
    info = Register(name="a", guest_pages=8, vcpus=1)
    f = P2MFile.create(paths.p2m(1), P2MHeader(1, 5, 8, 0, info))
    assert (f.p2m.frame == NO_FRAME).all() and (f.p2m.op == NO_OP).all()
    f.p2m.frame[3] = 77
    f.close(unlink=False)
    assert not f.p2m.frame.flags.writeable  # a late writer fails loudly
    g = P2MFile.open(paths.p2m(1))
    assert g.p2m.frame[3] == 77 and g.header.generation == 5 and g.header.info == info
    g.close(unlink=True)
    assert not paths.p2m(1).exists()
