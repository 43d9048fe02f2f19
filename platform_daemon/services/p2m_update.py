"""p2mUpdate: drop mappings that changed behind the VMM's back, then free the old frame.

The source is a shared frame that is retired (a node's zero frame, or a frame page sharing
merged pages into): the daemon points every page that shared it at a fresh copy, but VMMs
may still map the old one read-only. Those BPNs are queued here; the VMM's filter keeps only
pages it maps shared at the old MPN and drops them; when no VMM maps the old frame any more,
it is retired.

Bound on stale mappings: p2mUpdate is high priority and kicked at once, and memsched re-kicks
every VM with pending work on each tick (100 ms). The age of every drained entry is observed
in ``vmmem_p2m_stale_mapping_seconds``; the oldest waiting one is the gauge
``vmmem_p2m_oldest_stale_seconds``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.constants import PageState, ServiceType

from .base import Pages, PlatformService

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM


@dataclass
class StaleEntry:
    """Pages of one VM that may still map ``old_mpn``."""

    bpns: npt.NDArray[np.int64]
    old_mpn: int
    since: float


class P2MUpdateService(PlatformService):
    """High-priority release service draining stale mappings."""

    service = ServiceType.P2M_UPDATE

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.queues: dict[int, deque[StaleEntry]] = {}
        self.refs: dict[int, int] = {}  # old MPN -> pages that may still map it
        self.since: dict[tuple[int, int], float] = {}
        self.old_of: dict[tuple[int, int], int] = {}

    def enqueue(self, vm: VM, bpns: Pages, old_mpn: int) -> None:
        if len(bpns) == 0:
            return
        now = self.ctx.clock()
        self.queues.setdefault(vm.vm_id, deque()).append(StaleEntry(bpns, old_mpn, now))
        self.refs[old_mpn] = self.refs.get(old_mpn, 0) + len(bpns)

    def hold(self, old_mpn: int) -> None:
        """Keep ``old_mpn`` alive while its sharers are being queued (see ``release``)."""
        self.refs[old_mpn] = self.refs.get(old_mpn, 0) + 1

    def release(self, old_mpn: int) -> None:
        """Drop a ``hold``; with no stale mapping left, the old frame is retired now."""
        self._unref(old_mpn, 1)

    def oldest_age(self, vm: VM, now: float) -> float:
        q = self.queues.get(vm.vm_id)
        return now - q[0].since if q else 0.0

    def stale_frames(self) -> int:
        return len(self.refs)

    def has_work(self, vm: VM) -> bool:
        return bool(self.queues.get(vm.vm_id))

    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        q = self.queues.get(vm.vm_id)
        if not q:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        entry = q[0]
        picked, rest = entry.bpns[:capacity], entry.bpns[capacity:]
        if len(rest):
            entry.bpns = rest
        else:
            q.popleft()
        # A page still in another outstanding batch (of an older stale mapping) waits for
        # that batch to complete; its bookkeeping is per page, one batch at a time.
        busy = np.array([(vm.vm_id, b) in self.old_of for b in picked.tolist()], dtype=bool)
        if busy.any():
            q.append(StaleEntry(picked[busy], entry.old_mpn, entry.since))
            picked = picked[~busy]
        for b in picked.tolist():
            self.since[(vm.vm_id, b)] = entry.since
            self.old_of[(vm.vm_id, b)] = entry.old_mpn
        # Only exposed pages can still be mapped by the VMM; the rest are done already.
        exposed = vm.p2m.state[picked] == PageState.EXPOSED
        self._drained(vm, picked[~exposed])
        picked = picked[exposed]
        return picked, np.full(len(picked), entry.old_mpn, dtype=np.int64)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        # The VMM dropped its mapping of the old frame; the page keeps its (new) p2m frame.
        vm.p2m.state[accepted] = PageState.RESIDENT
        vm.p2m.op[accepted] = 0xFF
        vm.stats.p2m_updates += len(accepted)
        self._drained(vm, accepted)

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:
        # Not shared any more, stale or not mapped: either way the VMM no longer maps the
        # old frame through these pages.
        self._drained(vm, refused)

    def _drained(self, vm: VM, bpns: Pages) -> None:
        now = self.ctx.clock()
        for b in bpns.tolist():
            since = self.since.pop((vm.vm_id, b), now)
            old = self.old_of.pop((vm.vm_id, b), None)
            if old is None:  # not ours (never selected by this service): nothing to release
                continue
            self.ctx.metrics.p2m_stale_seconds.observe(now - since)
            self._unref(old, 1)

    def _unref(self, old: int, n: int) -> None:
        left = self.refs[old] - n
        if left > 0:
            self.refs[old] = left
            return
        del self.refs[old]
        self.ctx.machine.allocator.retire_used(np.array([old]))
        self.ctx.machine.failing[old] = False
        self.ctx.machine.owner_vm[old] = -1

    def on_vm_gone(self, vm: VM) -> None:
        for entry in self.queues.pop(vm.vm_id, deque()):
            self._unref(entry.old_mpn, len(entry.bpns))
        for key in [k for k in self.old_of if k[0] == vm.vm_id]:
            self.since.pop(key, None)
            self._unref(self.old_of.pop(key), 1)
