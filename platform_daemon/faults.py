"""The fault path: a guest touched a page its VMM does not expose (or wrote a read-only one).

The fast cases are answered synchronously, inside the read callback: first touch, a page
already mapped on the platform (another vCPU won the race), a resident page that lost its
mapping, a copy-on-write. Pages in flight go to the service that owns their op; swapped
pages and faults that must wait for free memory are answered from a task.

First touch by a read maps the node's shared zero frame read-only: untouched memory that
is only read costs no frame. A write to such a page copies it (COW) into a private frame.

Fault-around: a message costs a cross-CPU wakeup (~30 µs here), far more than mapping a
page, so when the agent says the guest is walking memory (``around > 0``) the reply also
maps the untouched neighbours after the faulting page, up to ``max_around`` of them, the
same way as the faulting page (private for a write, shared zero for a read).

This runs once per fault message, on 1 to 17 pages, so its cost is per-call overhead, not
per-page work: states are compared as plain ints (comparing a NumPy value with an IntEnum
member costs ~4 µs on Python 3.11, where NumPy's probe of the enum class for ``__array_*__``
attributes goes through ``EnumType.__getattr__`` and raises), and a fault without
fault-around is answered with plain ints and ``struct`` (``first_touch_one``, ``reply_one``):
NumPy costs about a microsecond per call on one-element arrays, and that path made ten calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, FaultReason, PageState
from shared.messages import FAULT_FLAG_WRITABLE, FaultReply

from .machine import MachineMemory
from .p2m import FLAG_MERGED, FLAG_SHARED
from .shared_frames import SharedFrames
from .vm import VM

#: Page states as plain ints, for comparisons with NumPy values (see the module docstring).
_ZERO = int(PageState.ZERO)
_EXPOSED = int(PageState.EXPOSED)
_SELECTED = int(PageState.SELECTED)
_RESIDENT = int(PageState.RESIDENT)
_MAPPABLE = (_EXPOSED, _SELECTED, _RESIDENT)
_PRIVATE = 0xFF & ~(FLAG_SHARED | FLAG_MERGED)
_FIRST_TOUCH, _REMAP, _MAPPED = (
    int(r) for r in (FaultReason.FIRST_TOUCH, FaultReason.REMAP, FaultReason.MAPPED)
)
_NO_PAGES = np.empty(0, dtype=np.int64)
_NO_PAGES.flags.writeable = False


class NeedsAsync(Exception):
    """The fault cannot be answered without waiting (I/O or free memory)."""


class FaultResolver:
    """Answers faults from the p2m and machine memory."""

    def __init__(self, machine: MachineMemory, shared: SharedFrames, max_around: int) -> None:
        self.machine = machine
        self.shared = shared
        self.max_around = max_around

    def map_private(self, vm: VM, bpns: npt.NDArray[Any], frames: npt.NDArray[Any]) -> None:
        """Record that ``bpns`` are backed by their own ``frames`` and exposed to the VMM."""
        p2m = vm.p2m
        p2m.frame[bpns] = frames
        p2m.state[bpns] = _EXPOSED
        p2m.flags[bpns] = p2m.flags[bpns] & _PRIVATE
        self.machine.set_owner(frames, vm.vm_id, bpns)

    def reply(self, vm: VM, reason: FaultReason, bpns: npt.NDArray[Any]) -> FaultReply:
        """A reply mapping ``bpns`` (faulting page first) to their current frames."""
        if len(bpns) == 1:
            return self.reply_one(vm, int(reason), int(bpns[0]))
        idx = np.asarray(bpns, dtype=np.int64)
        flags = ((vm.p2m.flags[idx] & FLAG_SHARED) == 0).astype(np.uint8)  # 1 where writable
        if FAULT_FLAG_WRITABLE != 1:
            flags *= FAULT_FLAG_WRITABLE
        # Fancy indexing already copies: the reply never aliases the p2m.
        return FaultReply(
            int(reason), idx.astype(np.uint64), vm.p2m.frame[idx].astype(np.int64), flags
        )

    def reply_one(self, vm: VM, reason: int, bpn: int) -> FaultReply:
        """``reply`` for one page, with plain ints."""
        p2m = vm.p2m
        flag = 0 if p2m.flags.item(bpn) & FLAG_SHARED else FAULT_FLAG_WRITABLE
        return FaultReply.single(reason, bpn, p2m.frame.item(bpn), flag)

    def first_touch(self, vm: VM, bpn: int, write: bool, around: int) -> FaultReply:
        """Back the faulting page and, if asked, its untouched neighbours."""
        p2m = vm.p2m
        if around <= 0:
            return self.first_touch_one(vm, bpn, write)
        neighbours = self._around(vm, bpn, around)
        if len(neighbours):
            zero_mask = p2m.state[neighbours] == _ZERO
            fresh = np.concatenate((np.array([bpn], dtype=np.int64), neighbours[zero_mask]))
            resident = neighbours[~zero_mask]
        else:
            fresh = np.array([bpn], dtype=np.int64)
            resident = _NO_PAGES
        if write:
            available = self.machine.available()
            if available < 1:
                raise NeedsAsync
            fresh = fresh[: min(len(fresh), available)]
            self.map_private(vm, fresh, self.machine.allocate_zeroed(len(fresh), vm.home_node))
        else:
            p2m.frame[fresh] = self.machine.zero_frame[vm.home_node]
            p2m.flags[fresh] = p2m.flags[fresh] | FLAG_SHARED
            p2m.state[fresh] = _EXPOSED
        if len(resident):
            p2m.state[resident] = _EXPOSED
            fresh = np.concatenate((fresh, resident))
        vm.stats.pages_mapped += len(fresh) - len(resident)
        vm.stats.fault_around_pages += len(fresh) - 1
        return self.reply(vm, FaultReason.FIRST_TOUCH, fresh)

    def first_touch_one(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """``first_touch`` of the faulting page alone, with plain ints (no fault-around)."""
        p2m, machine = vm.p2m, self.machine
        if write:
            if not machine.can_allocate_one():
                raise NeedsAsync
            mpn = machine.allocate_zeroed_one(vm.home_node)
            p2m.frame[bpn] = mpn
            p2m.state[bpn] = _EXPOSED
            p2m.flags[bpn] = p2m.flags.item(bpn) & _PRIVATE
            machine.owner_vm[mpn] = vm.vm_id
            machine.owner_bpn[mpn] = bpn
            flag = FAULT_FLAG_WRITABLE
        else:
            mpn = machine.zero_frame[vm.home_node]
            p2m.frame[bpn] = mpn
            p2m.flags[bpn] = p2m.flags.item(bpn) | FLAG_SHARED
            p2m.state[bpn] = _EXPOSED
            flag = 0
        vm.stats.pages_mapped += 1
        return FaultReply.single(_FIRST_TOUCH, bpn, mpn, flag)

    def copy_on_write(self, vm: VM, bpn: int) -> FaultReply:
        """Give a shared page its own writable copy.

        The last sharer of a merged frame takes the frame itself (no copy, as Linux reuses a
        page whose only mapping faults on write). Otherwise the page gets a copy and its old
        frame loses a sharer (and is freed with its last one).
        """
        p2m, shared = vm.p2m, self.shared
        old = int(p2m.frame[bpn])
        one = np.array([bpn], dtype=np.int64)
        merged = bool(p2m.flags[bpn] & FLAG_MERGED)
        if shared.refs[old] == 1:
            vm.stats.cow_breaks += merged
            shared.make_private(old, vm.vm_id, bpn)
            p2m.flags[bpn] = p2m.flags[bpn] & _PRIVATE
            p2m.state[bpn] = _EXPOSED
            return self.reply(vm, FaultReason.COW, one)
        if self.machine.available() < 1:
            raise NeedsAsync
        new = self.machine.allocator.allocate(1, vm.home_node)
        self.machine.frames[new[0]] = self.machine.frames[old]
        self.map_private(vm, one, new)
        if shared.refs[old] > 0:
            shared.unref(np.array([old]))
        vm.stats.cow_breaks += merged
        vm.stats.pages_mapped += 1
        return self.reply(vm, FaultReason.COW, one)

    def _around(self, vm: VM, bpn: int, around: int) -> npt.NDArray[np.int64]:
        """Neighbours after ``bpn`` that a fault-around may map: untouched or resident."""
        n = min(around, self.max_around, vm.guest_pages - bpn - 1)
        if n <= 0:
            return _NO_PAGES
        window = np.arange(bpn + 1, bpn + 1 + n, dtype=np.int64)
        st = vm.p2m.state[window]
        eligible: npt.NDArray[np.int64] = window[(st == _ZERO) | (st == _RESIDENT)]
        return eligible

    def try_resolve(self, vm: VM, bpn: int, write: bool, around: int) -> FaultReply:
        """Answer now, or raise NeedsAsync; in-flight and swapped pages are the services' job."""
        state = int(vm.p2m.state[bpn])
        if state == _ZERO:
            return self.first_touch(vm, bpn, write, around)
        if state not in _MAPPABLE:
            raise NeedsAsync
        assert vm.p2m.frame[bpn] != NO_FRAME
        if write and vm.p2m.flags[bpn] & FLAG_SHARED:
            return self.copy_on_write(vm, bpn)
        # SELECTED: the VMM faults on a page it still had, so it will not accept the release;
        # the page stays exposed and completion skips it.
        reason = _REMAP if state == _RESIDENT else _MAPPED
        vm.p2m.state[bpn] = _EXPOSED
        return self.reply_one(vm, reason, bpn)
