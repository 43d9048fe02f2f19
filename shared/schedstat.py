"""How long this thread has waited for a CPU: the run delay in ``/proc/thread-self/schedstat``.

The kernel counts, per thread, the time it was runnable but not running (its second field,
in nanoseconds): time lost to other threads and processes wanting the same CPUs, including
the wait after a wake-up. A round's wall time less this is what the round would have taken
on a CPU of its own. One ``pread`` of an open file, about 2 µs; where the file does not
exist (no ``CONFIG_SCHED_INFO``, not Linux) every reading is 0.0.
"""

from __future__ import annotations

import os


class RunDelay:
    """Reads the run delay of the thread that created it (``/proc/thread-self`` resolves to
    that thread when the file is opened)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def seconds(self) -> float:
        """The thread's total run delay so far, in seconds (0.0 when not available)."""
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
