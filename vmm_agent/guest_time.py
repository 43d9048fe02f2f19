"""Guest time as the monitor sees it: when the guest is exited, and whether it progresses.

``GuestGate``: a low-priority round runs with the guest exited, as the talk's 10 Hz monitor
callback does. Closing the gate stops every vCPU at its next yield point (vCPUs are tasks:
when the round's task runs, none of them is running), so the round's time is time the
guest does not run, and its time bound bounds the guest's latency.

``GuestProgress``: how much of the time the guest made progress. The guest stalls when every
running vCPU waits on the platform (a fault: swap-in, memory wait), and does not progress
while the monitor keeps it exited (a low-priority round). Low-priority rounds follow guest
progress (a round per 100 ms of it), so a stalled guest gets no flood of background work. An
idle guest (no phase running) is not stalled: its idle loop is progress, and idle VMs are
where page sharing and sampling matter most.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class GuestGate:
    """Open while the guest runs; closed while the monitor keeps it exited.

    Several holders may keep it closed at once (a low-priority round, a lost platform
    daemon); it opens when the last one lets go.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._holders: set[str] = set()

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    def close(self, holder: str = "round") -> None:
        self._holders.add(holder)
        self._open.clear()

    def open(self, holder: str = "round") -> None:
        self._holders.discard(holder)
        if not self._holders:
            self._open.set()

    def held_by(self, holder: str) -> bool:
        return holder in self._holders

    async def wait_open(self) -> None:
        await self._open.wait()


class GuestProgress:
    """Stall time of the guest (every running vCPU blocked on the platform), cumulative."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.running = 0  # vCPUs running a phase
        self.blocked = 0  # of those, vCPUs waiting for a fault's answer
        self._stalled_since: float | None = None
        self._stalled_total = 0.0
        #: When a vCPU last made progress (set at its yield points).
        self.last_progress = clock()

    def _update(self, now: float) -> None:
        stalled = self.running > 0 and self.blocked >= self.running
        if stalled and self._stalled_since is None:
            self._stalled_since = now
        elif not stalled and self._stalled_since is not None:
            self._stalled_total += now - self._stalled_since
            self._stalled_since = None

    def vcpu_started(self) -> None:
        self.running += 1
        self._update(self.clock())

    def vcpu_stopped(self) -> None:
        self.running -= 1
        self._update(self.clock())

    def wait_begins(self) -> None:
        self.blocked += 1
        self._update(self.clock())

    def wait_ends(self) -> None:
        self.blocked -= 1
        self._update(self.clock())

    def exited(self, seconds: float) -> None:
        """The monitor kept the guest exited this long (a round): no progress either."""
        self._stalled_total += seconds

    def stalled_total(self, now: float) -> float:
        """Seconds the guest has not progressed so far (stalled on the platform, or exited),
        the stall in progress included."""
        ongoing = 0.0 if self._stalled_since is None else now - self._stalled_since
        return self._stalled_total + ongoing

    def gap(self, now: float) -> float:
        """Time since the guest last made progress (0 when it has no vCPU running)."""
        if self.running == 0:
            return 0.0
        return max(0.0, now - self.last_progress)


class ProgressMeter:
    """Fraction of each interval between two reads that the guest progressed."""

    def __init__(self, progress: GuestProgress) -> None:
        self.progress = progress
        self._last_time = progress.clock()
        self._last_stall = 0.0

    def fraction(self, now: float) -> float:
        """Progress since the previous call, in [0, 1]."""
        stall = self.progress.stalled_total(now)
        span = now - self._last_time
        fraction = 1.0 if span <= 0 else 1.0 - (stall - self._last_stall) / span
        self._last_time, self._last_stall = now, stall
        return min(1.0, max(0.0, fraction))
