"""``fault_failed`` and other per-page events: one log line per VM per interval, counted.

The throttle alone on a virtual clock and a scripted timer; then a real in-process daemon
(as ``test_operator_logs.py``) whose host is out of memory, so every waiting fault fails:
one line at once and one with the count, not one per fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from platform_daemon.log_throttle import ThrottledEvent
from shared.constants import FreeState
from shared.messages import Fault
from tests.test_services_swap import FakeAgent, running_platform, wait_until

pytestmark = pytest.mark.timeout(60)
Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


class Timers:
    """Virtual time and the timers scheduled on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.due: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], None]) -> object:
        self.due.append((self.now + delay, callback))
        return object()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while ready := [t for t in self.due if t[0] <= self.now]:
            for t in ready:
                self.due.remove(t)
                t[1]()


def faults(logs: Logs) -> Logs:
    return [e for e in logs if e["event"] == "fault_failed"]


def test_a_storm_gives_one_line_at_once_then_one_count_per_interval(logs: Logs) -> None:
    """The first failure is logged at once; the next thousand within the interval are one
    line at its end with their count and the last one's details; after a quiet interval the
    next failure is logged at once again. Each VM has its own interval."""
    t = Timers()
    ev = ThrottledEvent(structlog.get_logger("t"), "fault_failed", 5.0, t.clock, t.schedule)
    for bpn in range(1001):
        ev.record("vm1", vm="vm1", bpn=bpn)
    ev.record("vm2", vm="vm2", bpn=7)
    assert [(e["vm"], e["count"], e["bpn"]) for e in faults(logs)] == [
        ("vm1", 1, 0),
        ("vm2", 1, 7),
    ]
    t.advance(5.0)
    assert [(e["vm"], e["count"], e["bpn"]) for e in faults(logs)[2:]] == [("vm1", 1000, 1000)]
    for bpn in range(3):  # still counted: the next interval's line
        ev.record("vm1", vm="vm1", bpn=bpn)
    t.advance(5.0)
    assert [(e["vm"], e["count"]) for e in faults(logs)[3:]] == [("vm1", 3)]
    t.advance(5.0)  # a quiet interval: the key is forgotten
    ev.record("vm1", vm="vm1", bpn=9)
    assert [(e["vm"], e["count"], e["bpn"]) for e in faults(logs)[4:]] == [("vm1", 1, 9)]
    assert sum(e["count"] for e in faults(logs) if e["vm"] == "vm1") == 1005


def test_without_a_timer_the_next_occurrence_ends_the_interval_and_flush_logs_the_rest(
    logs: Logs,
) -> None:
    """With no event loop to run a timer, the first occurrence after the interval logs the
    count; ``flush`` (shutdown) logs what is still counted."""
    t = Timers()
    ev = ThrottledEvent(structlog.get_logger("t"), "ev", 1.0, t.clock, lambda d, c: None)
    for _ in range(4):
        ev.record("k", vm="k")
    t.now += 1.0
    ev.record("k", vm="k")
    ev.record("k", vm="k")
    ev.flush()
    assert [e["count"] for e in logs] == [1, 4, 1]
    with pytest.raises(ValueError):
        ThrottledEvent(structlog.get_logger("t"), "ev", 0.0)


async def test_faults_failing_out_of_memory_are_one_line_with_the_count(
    short_tmp: Path, mem_dir: Path, logs: Logs
) -> None:
    """A real daemon in LOW with a short wait for frames: twenty write faults wait and fail.
    The VMM gets twenty errors; the log has the first at once and the rest as one counted
    line (the interval is shortened so the test does not wait 5 s)."""
    async with running_platform(short_tmp, mem_dir, host_mib=8, low_wait_seconds=0.2) as server:
        server.fault_failed_log.interval = 0.3
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(1000))
        server.memsched.set_host_limit(server.machine.allocator.used)
        server.memsched.tick(time.monotonic())
        assert server.memsched.state == FreeState.LOW
        waiting = [agent.link.request_nowait(Fault(bpn, True, 0)) for bpn in range(1500, 1520)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)

        def counted() -> int:
            return sum(e["count"] for e in faults(logs))

        await wait_until(lambda: counted() == 20, "all twenty failures to be counted")
        assert len(faults(logs)) == 2
        assert faults(logs)[0]["vm"] == "vm1" and faults(logs)[1]["count"] == 19
        await agent.close()
