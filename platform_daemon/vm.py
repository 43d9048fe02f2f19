"""One registered VM as the daemon sees it: identity, p2m, control region, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from shared.constants import FaultReason
from shared.layout import ControlRegion
from shared.messages import Message, Register
from shared.shm import MappedFile

from .p2m import P2M

if TYPE_CHECKING:
    from .persist import P2MFile


class PeerLink(Protocol):
    """How the daemon reaches a VM's agent (a PlatformConnection in the server)."""

    def send(self, message: Message, request_id: int = 0) -> None: ...


class Detached:
    """The link of a VM recovered after a crash whose agent has not come back yet.

    Nothing can reach the agent: what would be sent (a Kick) is dropped; the pending word
    in the control region still tells the agent about the work once it is back.
    """

    def send(self, message: Message, request_id: int = 0) -> None:
        pass


DETACHED = Detached()


@dataclass
class VMStats:
    """Cumulative per-VM counters, reported by ``vmmem-ctl status``."""

    faults: int = 0
    pages_mapped: int = 0
    fault_around_pages: int = 0
    swapped_out: int = 0
    swapped_in: int = 0
    #: Swapped pages whose slot was freed without a swap-in (the balloon took the page).
    swap_dropped: int = 0
    #: Pages the balloon gave back to the host.
    ballooned: int = 0
    swap_cancelled: int = 0
    #: Large (2 MB) regions split because a release service took one of their pages.
    hugepage_splits: int = 0
    retired_moves: int = 0
    p2m_updates: int = 0
    low_waits: int = 0
    cow_breaks: int = 0
    pages_merged: int = 0
    sharing_scanned: int = 0
    sharing_aborted: int = 0

    @property
    def swapped_now(self) -> int:
        """Pages of this VM in swap now."""
        return self.swapped_out - self.swapped_in - self.swap_dropped


@dataclass(eq=False)
class VM:
    """A VM registered with the daemon."""

    vm_id: int
    generation: int
    info: Register
    home_node: int
    p2m: P2M
    region: ControlRegion
    region_file: MappedFile
    connection: PeerLink
    #: The p2m's file (None for VMs built in tests without one).
    store: P2MFile | None = None
    #: For a VM recovered after a crash: the generation its agent knew, which it must name
    #: to resume.
    resume_generation: int = 0
    stats: VMStats = field(default_factory=VMStats)
    #: Faults answered, per FaultReason value (``vmmem-ctl top`` shows their rates).
    fault_reasons: list[int] = field(default_factory=lambda: [0] * len(FaultReason))
    outstanding_faults: int = 0
    alive: bool = True

    @property
    def detached(self) -> bool:
        """Recovered after a daemon crash, its agent not back yet."""
        return self.connection is DETACHED

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def guest_pages(self) -> int:
        return self.info.guest_pages

    @property
    def region_path(self) -> Path:
        return self.region_file.path
