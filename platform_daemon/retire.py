"""Retiring a failing frame (``vmmem-ctl retire``), whatever it holds.

- A free frame leaves the free pool at once.
- A private page's frame: the page is queued for page-retire, which releases it through a
  high-priority batch and copies it to a healthy frame (a page no VMM maps moves at once).
- A shared frame (a node's zero frame, or a frame page sharing merged pages into): a healthy
  copy replaces it for every sharer in the p2m at once; VMMs that still map the old frame
  read-only drop those mappings through p2mUpdate, and the old frame is retired when the
  last one is gone. Sharers are found by a scan of every VM's p2m: retiring is rare, and a
  per-frame list of sharers would cost memory on every merge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from shared.constants import PageState
from shared.errors import ErrorCode, VMMemError

from .allocator import FrameState
from .machine import MachineMemory
from .metrics import PlatformMetrics
from .services.p2m_update import P2MUpdateService
from .services.page_retire import PageRetireService
from .shared_frames import SharedFrames
from .vm import VM

log = structlog.get_logger("vmmem.platform.retire")


class FrameRetirement:
    """Takes failing frames out of use, moving whatever pages they back."""

    def __init__(
        self,
        machine: MachineMemory,
        shared: SharedFrames,
        vms: dict[int, VM],
        retire: PageRetireService,
        p2m_update: P2MUpdateService,
        kick: Callable[[VM], None],
        metrics: PlatformMetrics,
    ) -> None:
        self.machine = machine
        self.shared = shared
        self.vms = vms
        self.retire_service = retire
        self.p2m_update = p2m_update
        self.kick = kick
        self.metrics = metrics

    def retire(self, mpn: int, again: bool = False) -> dict[str, Any]:
        """Mark ``mpn`` failing: take it out of use, moving whatever page it holds.
        ``again``: it was marked by a crashed daemon; its page is moved off it anew."""
        machine = self.machine
        if not 0 <= mpn < machine.host_pages:
            raise VMMemError(
                f"MPN {mpn} out of range 0..{machine.host_pages - 1}", ErrorCode.BAD_REQUEST
            )
        state = int(machine.allocator.frame_state[mpn])
        if state == FrameState.RETIRED or (machine.failing[mpn] and not again):
            return {"mpn": mpn, "was": "retired"}
        if state == FrameState.FREE:
            machine.allocator.retire(mpn)
            self.metrics.retired.labels("free").inc()
            log.info("frame_retired", mpn=mpn, was="free")
            return {"mpn": mpn, "was": "free"}
        machine.failing[mpn] = True
        if machine.is_zero_frame(mpn) or self.shared.is_merged(mpn):
            result = self._retire_shared(mpn)
        else:
            vm = self.vms.get(int(machine.owner_vm[mpn]))
            if vm is None:  # in transit (e.g. a swap-in buffer): retired when it is freed
                return {"mpn": mpn, "was": "in_transit"}
            bpn = int(machine.owner_bpn[mpn])
            self.retire_service.enqueue(vm, bpn)
            if vm.p2m.state[bpn] == PageState.RESIDENT:
                self.retire_service.move(vm, np.array([bpn]))
            self.kick(vm)
            result = {
                "mpn": mpn,
                "was": "used",
                "vm": vm.name,
                "bpn": bpn,
                "page_state": PageState(vm.p2m.state[bpn]).name.lower(),
            }
        self.metrics.retired.labels("used").inc()
        log.info("frame_retired", **result)
        return result

    def _retire_shared(self, old: int) -> dict[str, Any]:
        """Point every sharer at a healthy copy; p2mUpdate drops the old mappings."""
        machine = self.machine
        node = int(machine.allocator.node_of(np.array([old]))[0])
        if machine.is_zero_frame(old):
            new = int(machine.allocate_zeroed(1, node)[0])
            machine.zero_frame[machine.zero_frame.index(old)] = new
            machine.zero_frames = frozenset(machine.zero_frame)
            machine.owner_vm[new] = machine.owner_vm[old]
            was = "zero_frame"
        else:
            new = int(machine.allocator.allocate(1, node)[0])
            machine.frames[new] = machine.frames[old]
            self.shared.move(old, new)
            was = "shared_frame"
        self.p2m_update.hold(old)  # the old frame lives until every VM has let go of it
        pages = 0
        for vm in self.vms.values():
            sharers = np.flatnonzero(vm.p2m.frame == old)
            vm.p2m.frame[sharers] = new
            exposed = sharers[vm.p2m.state[sharers] != PageState.ZERO]
            self.p2m_update.enqueue(vm, exposed, old)
            pages += len(exposed)
            self.kick(vm)
        self.p2m_update.release(old)
        return {"mpn": old, "was": was, "node": node, "new_mpn": new, "stale_pages": pages}
