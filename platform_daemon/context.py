"""What a service sees of the daemon: a narrow context, never the server object.

A service works on one VM's p2m (passed with each call), machine memory and its allocator,
the shared-frame table, the clock, its metrics and the few daemon facilities it needs
(spawning async work, waiting for free frames, memsched's targets). With only these, every
service can be built in a test from real parts and driven without a socket or a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shared.config import PlatformConfig

    from .faults import FaultResolver
    from .machine import MachineMemory
    from .metrics import PlatformMetrics
    from .shared_frames import SharedFrames
    from .swapfile import SwapFile
    from .vm import VM
    from .waits import FrameWaits


class SwapTargets(Protocol):
    """memsched's side of swap: how many pages a VM should still release."""

    def swap_deficit(self, vm: VM, in_flight: int) -> int: ...


Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Future[Any]"]


@dataclass(frozen=True)
class ServiceContext:
    """The daemon's parts a service may use."""

    machine: MachineMemory
    #: Maps pages to frames in a p2m and builds fault replies.
    mapper: FaultResolver
    shared: SharedFrames
    metrics: PlatformMetrics
    config: PlatformConfig
    clock: Callable[[], float]
    #: Run a coroutine as a task the daemon drains at shutdown.
    spawn: Spawn
    waits: FrameWaits
    swap: SwapFile | None
    targets: SwapTargets
