"""The interface every platform-side service implements (the talk's callback table).

A service selects the pages of one batch when the agent asks (never all up front), starts its
work on the pages the VMM accepted when the batch completes, and resolves faults on its own
in-flight pages, because only it knows why a page is being processed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import PageState, PageStatus, Priority, ServiceType
from shared.messages import FaultReply

if TYPE_CHECKING:
    from ..server import PlatformServer
    from ..vm import VM

Pages = npt.NDArray[np.int64]


class PlatformService(ABC):
    """One memory service on the platform side."""

    service: ServiceType
    priority: Priority = Priority.HIGH

    def __init__(self, server: PlatformServer) -> None:
        self.server = server

    @abstractmethod
    def has_work(self, vm: VM) -> bool:
        """True while this service wants batches from ``vm`` (keeps its pending bit set)."""

    @abstractmethod
    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        """BPNs of the next batch (at most ``capacity``) and the MPNs the VMM should map."""

    @abstractmethod
    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        """Start work on ``accepted`` (now IN_FLIGHT, not exposed); write outcomes to status."""

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply | Any:
        """Resolve a fault on an in-flight page of this service (a reply or an awaitable)."""
        raise NotImplementedError(f"{self.service.name} has no pages in flight")

    def on_refused(self, vm: VM, refused: Pages, status: npt.NDArray[np.uint8]) -> None:  # noqa: B027
        """Hook: the VMM refused these pages (they are EXPOSED again)."""

    def on_vm_gone(self, vm: VM) -> None:  # noqa: B027
        """Hook: drop any per-VM queue."""

    def mark_in_flight(self, vm: VM, bpns: Pages) -> None:
        """Pages leave the VMM and belong to this service until it finishes or cancels."""
        p2m = vm.p2m
        p2m.state[bpns] = PageState.IN_FLIGHT
        p2m.op[bpns] = self.service
        p2m.epoch[bpns] += 1

    @staticmethod
    def ok_status(n: int) -> npt.NDArray[np.uint8]:
        return np.full(n, PageStatus.OK, dtype=np.uint8)
