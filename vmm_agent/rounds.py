"""The agent's high-priority loop, as in the talk::

    while (req := await platform.get_request()) is not None:
        services[req.type].process(req)
        await platform.complete_request(req)

A round starts on a Kick from the daemon (action-driven), when a poll of the pending word
finds work (periodic), and after first-touch faults (the VMM allocated pages). Each batch
is processed by ``BatchProcessor`` (no await from reading the slot to completing it).
"""

from __future__ import annotations

import asyncio

import structlog

from shared.constants import HIGH_PRIORITY_MASK, Priority
from shared.layout import ControlRegion
from shared.messages import GET_FLAG_NEW_ROUND, GetRequest, Request

from .batches import BatchProcessor
from .link import Link

log = structlog.get_logger("vmm_agent.rounds")


class HighPriorityLoop:
    """Runs rounds of release requests against the daemon."""

    def __init__(
        self,
        link: Link,
        region: ControlRegion,
        batches: BatchProcessor,
        poll_interval: float,
    ) -> None:
        self.link = link
        self.region = region
        self.batches = batches
        self.poll_interval = poll_interval
        self.wake = asyncio.Event()
        self.rounds = 0
        #: True while a round runs: low-priority rounds yield to it.
        self.busy = False
        #: High bits still set when the last round ended: work it was offered and could not
        #: finish, which does not hold low-priority work back.
        self.attended = 0

    def kick(self) -> None:
        """Action-driven wake-up (a Kick message, or pages just allocated)."""
        self.wake.set()

    def poll(self) -> None:
        """Allocation-driven check of the pending word: cheap, no message."""
        if self.region.pending & HIGH_PRIORITY_MASK:
            self.wake.set()

    def pending(self) -> bool:
        """A round runs, or high-priority work waits that no round has been offered yet."""
        return self.busy or bool(self.region.pending & HIGH_PRIORITY_MASK & ~self.attended)

    async def run(self) -> None:
        # The periodic poll is a timer callback that reads the word and wakes the loop only
        # when work is pending: no task switch for an empty poll. (``wait_for`` with a
        # timeout made a task, a timer and a cancellation per poll: at 20 polls a second
        # that was ~0.5 % of a CPU for an idle agent.)
        loop = asyncio.get_running_loop()
        timer: list[asyncio.TimerHandle] = []

        def poll_tick() -> None:
            timer[:] = [loop.call_later(self.poll_interval, poll_tick)]
            self.poll()

        timer.append(loop.call_later(self.poll_interval, poll_tick))
        try:
            await self._serve()
        finally:
            timer[0].cancel()

    async def _serve(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            # A round serves a bounded number of batches per type; when work is still
            # pending after it, the next round starts at once instead of at the next poll.
            # A round that made no progress waits (nothing offered, or everything refused
            # for good: pinned, shared), so a bit that stays set cannot make the two
            # processes spin. Pages refused as recently referenced are progress: their
            # bits are cleared and the next pass takes them (a sweep of a freshly written
            # guest once waited a poll per round: 0.8 s before the first page went out).
            while await self.round() and self.region.pending & HIGH_PRIORITY_MASK:
                await asyncio.sleep(0)  # let the vCPUs run between rounds

    async def round(self) -> int:
        """One round: batches until the daemon says the round is over; returns its progress:
        pages released, and pages refused as recently referenced (aged by the clock)."""
        self.rounds += 1
        self.busy = True
        progress, flags = 0, GET_FLAG_NEW_ROUND
        try:
            while True:
                req: Request = await self.link.request(GetRequest(Priority.HIGH, 0, flags))
                flags = 0
                if not req.has_work:
                    # The daemon rewrote the pending word as the round closed.
                    self.attended = self.region.pending & HIGH_PRIORITY_MASK
                    return progress
                progress += self.batches.process(req) + self.batches.last_referenced
        finally:
            self.busy = False
