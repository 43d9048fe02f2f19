"""One log line per interval for an event that can happen once per page.

A host out of memory fails every fault that waits for a frame: one ``fault_failed`` line per
fault is a log storm that buries everything else, at the moment the operator reads the log.
``ThrottledEvent`` logs the first occurrence per key (a VM) at once, with its details; later
ones within ``interval`` seconds are only counted, and one line at the end of the interval
says how many there were (``count``), with the details of the last one. So a storm gives at
most one line per VM per interval, and no occurrence goes uncounted.

The end of an interval is a timer on the running event loop (or the ``schedule`` callable
given, so tests run it on a virtual clock); ``flush`` logs what is pending at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: schedule(delay, callback): run ``callback`` after ``delay`` seconds.
Schedule = Callable[[float, Callable[[], None]], object]


def _call_later(delay: float, callback: Callable[[], None]) -> object:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a synchronous caller): flush() is the caller's
        return None
    return loop.call_later(delay, callback)


@dataclass
class _Pending:
    since: float  # when the line that opened this interval was logged
    count: int = 0  # occurrences since that line
    fields: dict[str, Any] = field(default_factory=dict)  # the last one's details
    timer: object | None = None  # the interval's end, scheduled (None without a loop)


class ThrottledEvent:
    """Logs ``event`` (at warning level) at most once per ``interval`` per key."""

    def __init__(
        self,
        logger: Any,
        event: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _call_later,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.logger = logger
        self.event = event
        self.interval = interval
        self.clock = clock
        self.schedule = schedule
        self._pending: dict[str, _Pending] = {}

    def record(self, key: str, **fields: Any) -> None:
        """One occurrence for ``key`` (a VM's name), its details in ``fields``."""
        p = self._pending.get(key)
        if p is None:  # the first in an interval: logged at once
            p = self._pending[key] = _Pending(since=self.clock())
            self.logger.warning(self.event, count=1, **fields)
            p.timer = self.schedule(self.interval, lambda: self._expire(key))
            return
        p.count += 1
        p.fields = fields
        if p.timer is None and self.clock() - p.since >= self.interval:
            self._emit(p)  # no event loop to run a timer: this occurrence ends the interval

    def _expire(self, key: str) -> None:
        """An interval is over: log its count, and keep counting for one more; after an
        interval with none, the key is forgotten (its next occurrence is logged at once)."""
        p = self._pending.get(key)
        if p is None:
            return
        p.timer = None
        if not p.count:
            del self._pending[key]
            return
        self._emit(p)
        p.timer = self.schedule(self.interval, lambda: self._expire(key))

    def _emit(self, p: _Pending) -> None:
        self.logger.warning(self.event, count=p.count, interval_seconds=self.interval, **p.fields)
        p.count = 0
        p.since = self.clock()

    def flush(self) -> None:
        """Log every pending count now (at shutdown)."""
        for p in self._pending.values():
            if p.count:
                self._emit(p)
