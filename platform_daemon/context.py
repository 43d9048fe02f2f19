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

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from shared.config import PlatformConfig

    from .faults import FaultResolver
    from .machine import MachineMemory
    from .metrics import PlatformMetrics
    from .shared_frames import SharedFrames
    from .swapfile import SwapFile
    from .vm import VM
    from .waits import FrameWaits


class Targets(Protocol):
    """memsched's side of reclaim: how many pages a VM should still release."""

    def swap_deficit(self, vm: VM, in_flight: int) -> int: ...

    def balloon_deficit(self, vm: VM) -> int: ...


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
    targets: Targets
    #: End the in-flight operations of these pages now, as a write fault would (each page
    #: is exposed again with its frame): for reclaim that cannot wait for them.
    cancel: Callable[[VM, npt.NDArray[np.int64]], None] = lambda vm, bpns: None
