"""Waiting, bounded and counted, for reclaim to free frames.

Faults that need a frame when none is free (a write first touch in the low state, a COW, a
swap-in) wait here instead of failing at once: they wake whenever any frame is freed (a
swap-out landed, a VM left, a merge freed duplicates) and give up after ``low_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from prometheus_client import Counter

from shared.errors import ErrorCode, VMMemError

from .machine import MachineMemory

#: Longest sleep between two looks at free memory: a limit change frees no frame.
POLL_SECONDS = 0.05


class FrameWaits:
    """The event waiting faults sleep on, and the bounded wait for n free frames."""

    def __init__(
        self,
        machine: MachineMemory,
        timeout: float,
        nudge_reclaim: Callable[[], None],
        outcomes: Counter,
    ) -> None:
        self.machine = machine
        self.timeout = timeout
        self.nudge_reclaim = nudge_reclaim
        self.outcomes = outcomes
        self.freed = asyncio.Event()
        #: Faults in ``wait_for`` now: memsched counts them as the host needing frames.
        self.waiting = 0
        machine.freed_listeners.append(self.freed.set)

    async def freed_or_timeout(self) -> None:
        """Sleep until a frame is freed, or POLL_SECONDS."""
        self.freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.freed.wait(), timeout=POLL_SECONDS)

    async def wait_for(self, n: int) -> None:
        """Wait, bounded by ``timeout``, until ``n`` frames can be allocated."""
        deadline = time.monotonic() + self.timeout
        if self.machine.available() >= n:
            return
        self.waiting += 1
        try:
            self.nudge_reclaim()  # once: the main loop ticks memsched after that
            while self.machine.available() < n:
                if time.monotonic() >= deadline:
                    self.outcomes.labels("failed").inc()
                    raise VMMemError("no free frame for swap-in", ErrorCode.OUT_OF_MEMORY)
                await self.freed_or_timeout()
        finally:
            self.waiting -= 1
