"""Taking over from a crashed daemon: make the state files it left consistent again.

A daemon killed at any instruction leaves its last operation cut between two stores. Every
operation orders its stores so that the p2m never points at data that is gone:

- a frame is freed only after no p2m entry points at it, and filled before one does (fault
  replies, swap-in, copy-on-write, moves);
- a p2m entry points at a swap slot only after the slot's write returned and its checksum
  was stored, and stops pointing at it (swap-in) only after the page has its frame back.

So the rule for each page is simple, and needs no log of what was in progress:

- it has a frame: the frame holds its content. An operation in progress (a selected page, a
  swap-out or merge in flight, a swapped page whose frame was not yet freed) is undone: the
  page is exposed again with that frame, as if the VMM had faulted on it, and a swap slot it
  still names is freed. A page no VMM maps (RESIDENT) stays so.
- no frame, a swap slot: swapped out.
- neither: untouched (ZERO).

Frames are then counted from the p2ms: a frame mapped by several pages, or by one page
flagged shared, or a zero frame, is shared (every page mapping it gets FLAG_SHARED, so a
write copies it first); any other mapped frame is private to its page. Frames no page maps
are free (frames allocated for an operation the crash cut short), except retired ones.
Swap slots in use are exactly those of swapped pages; the rest are free.

This module only computes on the arrays (no server, no sockets): ``reconcile`` before
machine memory is set up (the allocator adopts the frame states it writes), the daemon
then adopts the counts and builds its VMs detached, waiting for their agents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import NO_FRAME, PAGE_SIZE, PageState
from shared.distinct import has_repeats

from .allocator import FrameState
from .p2m import FLAG_MERGED, FLAG_SHARED, NO_OP, NO_SLOT
from .persist import (
    P2MFile,
    StateError,
    StateFile,
    StatePaths,
    UnfinishedStateError,
    lock_file,
)

if TYPE_CHECKING:
    from shared.config import PlatformConfig

log = structlog.get_logger("vmmem.platform.recovery")

_ZERO, _EXPOSED = int(PageState.ZERO), int(PageState.EXPOSED)
_SWAPPED, _RESIDENT = int(PageState.SWAPPED), int(PageState.RESIDENT)
_FREE, _USED, _RETIRED = int(FrameState.FREE), int(FrameState.USED), int(FrameState.RETIRED)
_SHARE_FLAGS = FLAG_SHARED | FLAG_MERGED


@dataclass
class Reconciled:
    """What ``reconcile`` found and decided, for the daemon to adopt and to report."""

    files: list[P2MFile]
    #: Sharers of each merged frame (zero frames are not counted, as in SharedFrames).
    refs: npt.NDArray[np.int32]
    swap_slots_in_use: npt.NDArray[np.int64]
    #: Pages whose state changed: operations the crash cut short, undone.
    pages_undone: int = 0
    #: Swap slots written for pages that kept their frame.
    slots_freed: int = 0
    #: Frames allocated but mapped by no page when the daemon died.
    frames_freed: int = 0
    #: Frames that were failing and are now free: retired.
    frames_retired: int = 0
    #: VMs the crashed daemon was releasing: their release is completed (files removed).
    vms_released: int = 0
    pages_by_state: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "vms": len(self.files),
            "pages_undone": self.pages_undone,
            "swap_slots_freed": self.slots_freed,
            "frames_freed": self.frames_freed,
            "frames_retired": self.frames_retired,
            "vms_released": self.vms_released,
            "merged_frames": int(np.count_nonzero(self.refs)),
            "pages": self.pages_by_state,
        }


def open_state(config: PlatformConfig, paths: StatePaths) -> tuple[StateFile, bool]:
    """The state file to run on, and whether it is a crashed daemon's to take over.

    A state file left on this socket is taken over, unless ``--fresh``; other files of the
    set without a state file (a daemon that died while starting) are removed. Either way the
    log says which, and a state file made with other settings is refused, naming them.
    """
    swap_slots = config.swap_size // PAGE_SIZE if config.swap_file is not None else 0
    swap_path = str(config.swap_file.resolve()) if config.swap_file is not None else ""
    reason = "--fresh" if config.fresh else "no state file: a daemon died while starting"
    if paths.state.exists() and not config.fresh:
        state = _open_finished(paths)
        if state is not None:
            try:
                _check_same_settings(state, config, swap_slots, swap_path)
                if not paths.machine.exists():
                    raise StateError(
                        f"{paths.machine} is gone: the guests' memory cannot be recovered"
                    )
            except BaseException:
                state.close(unlink=False)
                raise
            return state, True
        reason = "state file never finished: a daemon died while starting"
    if paths.existing():
        # Held by a live daemon? Then taking the lock fails here, before anything is removed.
        fd = lock_file(paths.state, create=True)
        try:
            removed = paths.remove_all()
        finally:
            os.close(fd)
        log.warning("stale_state_removed", files=removed, reason=reason)
    state = StateFile.create(
        paths.state,
        host_pages=config.host_pages,
        nodes=config.numa_nodes,
        swap_slots=swap_slots,
        swap_path=swap_path,
    )
    return state, False


def _open_finished(paths: StatePaths) -> StateFile | None:
    """The state file to take over, or None when its daemon died before it served.

    Why: the state file is created first, then machine memory (reserved and prefaulted:
    seconds for gigabytes), and only then are the zero frames written to its header. A
    daemon killed before that left a header with no zero frames (or none at all): taking
    it over marked the last frame as a zero frame and mapped reads to frame -1. No VM can
    have registered with such a daemon, so there is nothing to recover.
    """
    try:
        state = StateFile.open(paths.state)
    except UnfinishedStateError:
        return None
    if any(z < 0 for z in state.header.zero_frames):
        state.close(unlink=False)
        return None
    return state


def _check_same_settings(
    state: StateFile, config: PlatformConfig, swap_slots: int, swap_path: str
) -> None:
    h = state.header
    wrong = []
    if h.host_pages != config.host_pages:
        wrong.append(f"--host-memory {h.host_pages * PAGE_SIZE} (now {config.host_memory})")
    if h.nodes != config.numa_nodes:
        wrong.append(f"--numa-nodes {h.nodes} (now {config.numa_nodes})")
    if h.swap_slots != swap_slots or h.swap_path != swap_path:
        was = f"{h.swap_path} of {h.swap_slots * PAGE_SIZE} bytes" if h.swap_slots else "none"
        wrong.append(f"swap {was} (now {swap_path or 'none'} of {config.swap_size} bytes)")
    if wrong:
        raise StateError(
            f"{state.path} was left by a daemon with other settings: {'; '.join(wrong)}. "
            "Start with the same settings to recover its VMs, or with --fresh to discard "
            "them (their memory is lost)"
        )


def open_p2ms(paths: StatePaths) -> list[P2MFile]:
    """Every VM's p2m file; a file that cannot be trusted stops the takeover, named."""
    files: list[P2MFile] = []
    try:
        for vm_id, path in paths.p2m_files():
            try:
                f = P2MFile.open(path)
            except UnfinishedStateError:
                # A registration cut before its header was written (the header comes last,
                # after the arrays are reset): its agent never got Registered, and the
                # arrays are not to be read (frame 0 everywhere). Refusing it would refuse
                # the takeover of every other VM on the host.
                path.unlink(missing_ok=True)  # its region file is created after it
                log.warning("vm_registration_discarded", vm_id=vm_id, file=path.name)
                continue
            files.append(f)
            if f.header.vm_id != vm_id:
                raise StateError(f"{path}: header names VM {f.header.vm_id}")
    except BaseException:
        for f in files:
            f.close(unlink=False)
        raise
    return files


def reconcile(state: StateFile, files: list[P2MFile]) -> Reconciled:
    """Apply the rules above to every p2m and to the frame states, in place."""
    host_pages, slots = state.header.host_pages, state.header.swap_slots
    is_zero = np.zeros(host_pages, dtype=bool)
    is_zero[state.header.zero_frames] = True
    frames_of: list[npt.NDArray[np.int64]] = []
    shared_of: list[npt.NDArray[np.int64]] = []
    swapped: list[npt.NDArray[np.int64]] = []
    out = Reconciled(files, np.zeros(host_pages, dtype=np.int32), np.empty(0, dtype=np.int64))
    for f in files:
        _check_ranges(f, host_pages, slots)
    # In place: the caller's list (which it closes on a refusal) loses the VMs removed here.
    files[:] = [f for f in files if not _finish_release(f, state.swap_checksum, out)]
    for f in files:
        p2m = f.p2m
        has_frame = p2m.frame >= 0
        has_slot = p2m.swap_slot >= 0
        new_state = np.where(
            has_frame,
            np.where(p2m.state == _RESIDENT, _RESIDENT, _EXPOSED),
            np.where(has_slot, _SWAPPED, _ZERO),
        ).astype(np.uint8)
        out.pages_undone += int(np.count_nonzero(new_state != p2m.state))
        drop_slot = has_frame & has_slot
        out.slots_freed += int(np.count_nonzero(drop_slot))
        p2m.swap_slot[drop_slot] = NO_SLOT
        p2m.state[:] = new_state
        p2m.op[:] = NO_OP
        p2m.flags[~has_frame] = 0  # swapped and untouched pages are private
        swapped.append(p2m.swap_slot[~has_frame & has_slot].astype(np.int64))
        frames = p2m.frame[has_frame].astype(np.int64)
        frames_of.append(frames)
        shared_of.append(frames[(p2m.flags[has_frame] & FLAG_SHARED) != 0])
    # One count over all VMs' pages: the cost is the pages plus one pass over the frames.
    mapped_by = _count(frames_of, host_pages)
    shared = is_zero | (mapped_by >= 2) | (_count(shared_of, host_pages) >= 1)
    for f in files:
        _settle_flags(f, shared, is_zero)
    out.refs = np.where(shared & ~is_zero, mapped_by, 0).astype(np.int32)
    _settle_frames(state, mapped_by > 0, is_zero, out)
    out.swap_slots_in_use = np.concatenate(swapped) if swapped else np.empty(0, dtype=np.int64)
    if has_repeats(out.swap_slots_in_use):
        raise StateError("two pages name the same swap slot: the p2m files are damaged")
    counts = np.zeros(len(PageState), dtype=np.int64)
    for f in files:
        counts += np.bincount(f.p2m.state, minlength=len(PageState))
    out.pages_by_state = {s.name.lower(): int(counts[s]) for s in PageState}
    return out


def _count(parts: list[npt.NDArray[np.int64]], n: int) -> npt.NDArray[np.int64]:
    if not parts:
        return np.zeros(n, dtype=np.int64)
    return np.bincount(np.concatenate(parts), minlength=n)


def _check_ranges(f: P2MFile, host_pages: int, slots: int) -> None:
    """Values no store of the daemon can produce mean a damaged file: refuse it."""
    p2m = f.p2m
    bad = (p2m.frame < NO_FRAME) | (p2m.frame >= host_pages)
    bad |= (p2m.swap_slot < NO_SLOT) | (p2m.swap_slot >= slots)
    bad |= p2m.state >= len(PageState)
    if bad.any():
        bpns = np.flatnonzero(bad)[:4].tolist()
        raise StateError(f"{f.path}: pages {bpns} hold values out of range: the file is damaged")


def _finish_release(f: P2MFile, checksum: npt.NDArray[np.uint64], out: Reconciled) -> bool:
    """True (and its files removed) when the daemon died while releasing this VM.

    Why: ``on_vm_gone`` frees the frames and swap slots (zeroing their checksums), clears
    the p2m's frames, then its slots, and removes the p2m file last. Cut in between, the
    p2m has pages that say mapped or swapped but have neither frame nor slot, or name a
    slot whose checksum is gone: no other store order produces either (a page gets its
    frame before its state, a slot's checksum is stored before the p2m names it). Taken
    over, such a VM came back with pages silently zero and swapped pages that fail their
    checksum, and an agent still alive (a clean stop killed mid-way) resumed it with its
    mappings on frames now free for other VMs. Its release is completed instead: the
    agent is refused and says so.
    """
    p2m = f.p2m
    no_frame = p2m.frame < 0
    has_slot = p2m.swap_slot >= 0
    lost = no_frame & ~has_slot & (p2m.state != _ZERO)
    named = np.flatnonzero(no_frame & has_slot)  # none at all without a swap file
    unwritten = checksum[p2m.swap_slot[named]] == 0
    if not (lost.any() or unwritten.any()):
        return False
    log.warning(
        "vm_release_completed",
        vm=f.header.info.name,
        vm_id=f.header.vm_id,
        pages_without_frame=int(np.count_nonzero(lost)),
        slots_released=int(np.count_nonzero(unwritten)),
    )
    f.close(unlink=True)
    f.path.with_suffix(".region").unlink(missing_ok=True)
    out.vms_released += 1
    return True


def _settle_flags(
    f: P2MFile, shared: npt.NDArray[np.bool_], is_zero: npt.NDArray[np.bool_]
) -> None:
    """Sharing flags agree with the frames: shared frames are mapped read-only by all."""
    p2m = f.p2m
    pages = np.flatnonzero(p2m.frame >= 0)
    frames = p2m.frame[pages]
    on_shared = shared[frames]
    p2m.flags[pages[on_shared]] |= FLAG_SHARED
    # A non-zero frame is shared only by page sharing: its pages were merged.
    p2m.flags[pages[on_shared & ~is_zero[frames]]] |= FLAG_MERGED
    p2m.flags[pages[~on_shared]] &= ~_SHARE_FLAGS & 0xFF


def _settle_frames(
    state: StateFile, mapped: npt.NDArray[np.bool_], is_zero: npt.NDArray[np.bool_], out: Reconciled
) -> None:
    """Frame states from what the p2ms map; failing frames that are free are retired."""
    old = state.frame_state.copy()
    used = mapped | is_zero
    retired = (old == _RETIRED) & ~used
    failing = state.failing
    # A retired frame still mapped (it cannot happen, but must not lose the page): it is
    # kept in use and retired when its page leaves, as a failing frame is.
    failing |= used & (old == _RETIRED)
    newly_retired = failing & ~used
    retired |= newly_retired
    failing &= used
    new = np.full(len(old), _FREE, dtype=np.uint8)
    new[used] = _USED
    new[retired] = _RETIRED
    out.frames_freed = int(np.count_nonzero((old == _USED) & (new == _FREE)))
    out.frames_retired = int(np.count_nonzero(newly_retired))
    state.frame_state[:] = new
