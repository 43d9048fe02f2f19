"""The move of private pages to new frames: the one mechanism NUMA migration, 2M defrag and 2M
promotion share (Linux's ``migrate_pages`` under three policies).

Each of those services decides which pages move, where to, and when (its own module); this
module does the move itself, so the three cannot drift apart:

- **copy, then repoint, then free** (``move``): the content is in the new frame before the
  p2m names it, and the frame it left is handed back to the caller (who frees it, or, for
  defrag, keeps it claimed for the run being emptied) only after nothing names it, so a crash
  at any point leaves every page with a frame that holds its content;
- **released pages move asynchronously, in steps** (``spawn_moves``): the batch's pages,
  with their epochs as the release left them, are moved a step at a time, yielding to the
  event loop between steps so faults and other VMs go first; a step moves only the pages
  still in flight for the same operation and epoch (a fault took the others meanwhile);
- **a fault on a page in flight** (``fault_reply``): the service completes (or cancels) the
  page's move at once, then the page is exposed again and its epoch bumped, so the pending
  step skips it, and the fault's reply maps its frame (COMPLETE) or its old one (CANCEL).

All of it is vectorised over the whole PageList: no per-page Python on the hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import FaultReason, PageState
from shared.messages import FaultReply

from ..p2m import NO_OP
from .base import Pages

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..machine import MachineMemory
    from ..vm import VM

_EXPOSED, _RESIDENT = int(PageState.EXPOSED), int(PageState.RESIDENT)
_IN_FLIGHT = int(PageState.IN_FLIGHT)


#: Destination stretches shorter than this are copied page by page (a slice store each):
#: below it, one ``np.take`` call costs more than the stores it replaces (1.7 against 1.3 µs
#: for one page, 2.5 against 2.7 µs for three, cold scattered sources, 2026-12-03).
TAKE_MIN = 3


@dataclass(frozen=True)
class CopyPlan:
    """What ``run_copy`` does, worked out beforehand (``plan_copy``): the gathers, as
    (first destination frame, source frames), and the pages of short stretches, as
    (destination, source) frame lists."""

    gathers: list[tuple[int, npt.NDArray[np.int64]]]
    single_new: list[int]
    single_old: list[int]


def plan_copy(
    frames_count: int, new: npt.NDArray[np.int64], old: npt.NDArray[np.int64]
) -> CopyPlan:
    """How to do ``frames[new] = frames[old]`` on a machine of ``frames_count`` frames: each
    stretch of consecutive frames in ``new`` is one ``np.take`` from the read-only mapping
    straight into it; stretches shorter than ``TAKE_MIN`` are stored a page at a time.
    Raises before anything is copied if a frame is outside machine memory.

    A promotion's run is one stretch; migration's frames come off the allocator's stacks in
    runs, but often top down, so the pairs are put in ascending order of ``new`` first (in
    ``benchmarks/numa.py``: 49,536 stretches for 98,304 pages as given, one per batch once
    sorted; the order of the copies does not matter).
    """
    if len(new) == 0:
        return CopyPlan([], [], [])
    if int(old.min()) < 0 or int(old.max()) >= frames_count:  # NO_FRAME would wrap around
        raise ValueError("copy from a page without a frame")
    steps = np.diff(new)
    if (steps < 0).any():
        order = np.argsort(new)
        new, old = new[order], old[order]
        steps = np.diff(new)
    if int(new[0]) < 0 or int(new[-1]) >= frames_count:  # ascending now: the two ends
        raise ValueError("copy to a frame outside machine memory")
    breaks = np.flatnonzero(steps != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(new)]
    long = ends - starts >= TAKE_MIN
    gathers = [
        (int(new[a]), old[a:b])
        for a, b in zip(starts[long].tolist(), ends[long].tolist(), strict=True)
    ]
    if long.all():
        return CopyPlan(gathers, [], [])
    alone = ~np.repeat(long, ends - starts)  # the pages of short stretches
    return CopyPlan(gathers, new[alone].tolist(), old[alone].tolist())


def run_copy(frames: npt.NDArray[np.uint8], source: npt.NDArray[np.uint8], plan: CopyPlan) -> None:
    """Do what ``plan`` says: on the copier thread, nothing but the copies, so the thread
    takes the GIL back once per gather (NumPy lets it go inside), not after each of the
    checks and sorts ``plan_copy`` makes (each of which may let it go on a large array, and
    waits up to the switch interval to get it back while the event loop runs)."""
    for first, olds in plan.gathers:
        # mode="clip": the indices were checked; "raise" would buffer the output.
        np.take(source, olds, axis=0, out=frames[first : first + len(olds)], mode="clip")
    if not plan.single_new:
        return
    flat, src = frames.reshape(-1).data.cast("B"), source.reshape(-1).data.cast("B")
    size = frames.shape[1]
    for dst, s in zip(plan.single_new, plan.single_old, strict=True):
        flat[dst * size : (dst + 1) * size] = src[s * size : (s + 1) * size]


def copy_frames(
    frames: npt.NDArray[np.uint8],
    source: npt.NDArray[np.uint8],
    new: npt.NDArray[np.int64],
    old: npt.NDArray[np.int64],
) -> None:
    """``frames[new] = frames[old]``; ``source`` is the same memory as ``frames`` through a
    second mapping (``MachineMemory.source``), the copy done as ``plan_copy`` says.

    From a view of the same mapping NumPy would gather into a temporary and copy again,
    since it must assume the two overlap; they cannot, since ``new`` are frames just
    allocated (no page's new frame is another's old one). For 512 scattered frames on this
    machine: 0.31 ms, against 0.52 ms for a slice store per page from Python (median, 256
    MiB of frames, 2026-12-03). Short stretches keep the slice store.
    """
    run_copy(frames, source, plan_copy(len(frames), new, old))


def move(
    machine: MachineMemory, vm: VM, bpns: Pages, new: npt.NDArray[np.int64], flags: int = 0
) -> npt.NDArray[np.int64]:
    """Copy the pages ``bpns`` (in flight or RESIDENT, private) into the frames ``new``,
    repoint the p2m (and its owners), OR ``flags`` into theirs; the pages end RESIDENT with
    no operation. Returns the frames they left: the caller frees or claims them."""
    old = vm.p2m.frame[bpns].astype(np.int64)  # a copy, widened from the p2m's int32
    # The order keeps a crash safe: the copy is in the new frame before the p2m names it.
    copy_frames(machine.frames, machine.source, new, old)
    repoint(machine, vm, bpns, new, flags)
    return old


async def copy_off_loop(
    machine: MachineMemory, new: npt.NDArray[np.int64], old: npt.NDArray[np.int64]
) -> None:
    """``copy_frames`` with its copies on the machine's copier thread
    (``MachineMemory.copier``): NumPy releases the GIL inside each gather, so the event loop
    goes on (faults, other VMs, the next batch) on the other core while the bytes move.

    What the caller must hold: ``new`` are frames it allocated and nothing names yet, so
    only the copier writes them; ``old`` may change meanwhile (a fault can finish the pages'
    move itself and free them), so after the await the caller checks the pages are still
    its own since their release (``still_ours``: nothing repoints a page in flight but the
    operation it is in flight for, or a fault, which bumps its epoch), and frees ``new``
    otherwise.
    """
    plan = plan_copy(len(machine.frames), new, old)  # the checks and sorts, on the loop
    loop = asyncio.get_running_loop()
    # run_copy looked up at call time: the promotion benchmark times it by wrapping it.
    await loop.run_in_executor(machine.copier, run_copy, machine.frames, machine.source, plan)


def repoint(
    machine: MachineMemory, vm: VM, bpns: Pages, new: npt.NDArray[np.int64], flags: int = 0
) -> None:
    """The second half of a move, once ``new`` holds the pages' bytes: the p2m (and the
    frames' owners) name ``new``, ``flags`` ORed in; the pages end RESIDENT, no operation."""
    p2m = vm.p2m
    p2m.frame[bpns] = new
    machine.set_owner(new, vm.vm_id, bpns)
    if flags:
        p2m.flags[bpns] |= flags
    keep(vm, bpns)


def keep(vm: VM, bpns: Pages) -> None:
    """Pages whose move ended (done, or given up: then on their old frame, content intact)
    are the platform's again: RESIDENT, no operation; remap validation maps them."""
    vm.p2m.state[bpns] = _RESIDENT
    vm.p2m.op[bpns] = NO_OP


def still_ours(
    vm: VM, bpns: Pages, epochs: npt.NDArray[np.uint32], op: int
) -> npt.NDArray[np.bool_]:
    """Per page: still in flight for ``op`` since the release that gave it ``epochs``."""
    p2m = vm.p2m
    ours: npt.NDArray[np.bool_] = (p2m.state[bpns] == _IN_FLIGHT) & (p2m.op[bpns] == op)
    ours &= p2m.epoch[bpns] == epochs
    return ours


def spawn_moves(
    ctx: ServiceContext,
    vm: VM,
    bpns: Pages,
    op: int,
    step: int,
    finish: Callable[[VM, Pages], object],
) -> None:
    """Move released pages asynchronously, ``step`` pages at a time: ``finish`` gets the
    pages of each step still in flight for ``op`` (possibly none)."""
    epochs = vm.p2m.epoch[bpns]  # (a copy) as the release left them
    ctx.spawn(_in_steps(vm, bpns, epochs, op, step, finish))


async def _in_steps(
    vm: VM,
    bpns: Pages,
    epochs: npt.NDArray[np.uint32],
    op: int,
    step: int,
    finish: Callable[[VM, Pages], object],
) -> None:
    for start in range(0, len(bpns), step):
        await asyncio.sleep(0)  # faults and other VMs go first
        if not vm.alive:
            return
        chunk = bpns[start : start + step]
        finish(vm, chunk[still_ours(vm, chunk, epochs[start : start + step], op)])


def fault_reply(ctx: ServiceContext, vm: VM, bpn: int, moved: bool) -> FaultReply:
    """After a fault completed (``moved``) or cancelled the move of ``bpn``: the page is
    exposed again, its epoch bumped (a pending step skips it), and the reply maps it."""
    p2m = vm.p2m
    p2m.state[bpn] = _EXPOSED
    p2m.epoch[bpn] += 1
    reason = FaultReason.COMPLETE if moved else FaultReason.CANCEL
    return ctx.mapper.reply(vm, reason, np.array([bpn], dtype=np.int64))
