"""The monitor-side queue: low-priority work the monitor does itself, inside the time bound.

The talk splits a low-priority round's time bound between two queues and interleaves them:
the platform's (batches chosen by the daemon) and the monitor's own. The monitor's tasks
here are in priority order (sampling's arming first, as in the strawman; then page checking,
``page_check.py``). Each task's cost per unit of work is a moving average measured here, so
a turn does only as much as fits in the time it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class MonitorTask(Protocol):
    """One kind of monitor-side work."""

    name: str

    def has_work(self) -> bool: ...

    def run(self, units: int) -> int:
        """Do up to ``units`` units of work; return how many were done."""
        ...


#: No unit of monitor work is estimated below this (seconds): far below any real one.
MIN_PER_UNIT = 1e-9


@dataclass
class TaskCost:
    """Moving average of one task's cost per unit, and what it has done."""

    per_unit: float = 2e-6
    alpha: float = 0.25
    units: int = 0
    seconds: float = 0.0

    def record(self, units: int, seconds: float) -> None:
        if units > 0:
            self.per_unit += self.alpha * (seconds / units - self.per_unit)
            # Turns the clock did not see (a coarse or a virtual clock) would drive the
            # estimate towards 0, and a turn's units to infinity (``int`` of inf raises).
            self.per_unit = max(self.per_unit, MIN_PER_UNIT)
        self.units += units
        self.seconds += seconds


class MonitorQueue:
    """Runs monitor tasks in priority order for at most the time it is given."""

    def __init__(self, tasks: Sequence[MonitorTask], clock: Callable[[], float]) -> None:
        self.tasks = list(tasks)
        self.clock = clock
        self.costs = {t.name: TaskCost() for t in self.tasks}

    def has_work(self) -> bool:
        return any(t.has_work() for t in self.tasks)

    def run(self, seconds: float) -> int:
        """Work for up to ``seconds``; returns the units of work done (0: none fitted)."""
        start = self.clock()
        total = 0
        for task in self.tasks:
            cost = self.costs[task.name]
            while task.has_work():
                left = seconds - (self.clock() - start)
                units = int(left / cost.per_unit)  # per_unit >= MIN_PER_UNIT > 0
                if units < 1:
                    return total
                t0 = self.clock()
                done = task.run(units)
                cost.record(done, self.clock() - t0)
                total += done
                if done == 0:
                    break
        return total
