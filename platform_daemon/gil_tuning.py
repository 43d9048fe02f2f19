"""The daemon's GIL switch interval: 0.5 ms instead of CPython's 5 ms.

Why: the daemon's threads take turns at the GIL. The swap writer thread releases it for
each ``pwritev`` and needs it back between them; the hasher thread and the event loop hold
it in stretches of up to a millisecond or two (a 4096-page batch's checksums, a batch's
selection and completion). A thread that wants the GIL waits for its holder to give it up
at a blocking call, or for the switch interval to pass and then asks the holder to drop it.
With CPython's 5 ms the writer sat idle behind the hasher and the loop for most of that
time, and the event loop itself, which answers faults, could wait as long behind a thread.

Measured (``benchmarks/swap.py``'s ``default_warm`` with a 1 GiB guest and the hasher
thread, before the hasher's GIL yields, four runs each, alternately, 2026-12-02 16:31-16:38
UTC, quiet: docs/performance.md): swap-out while active median 801 k pages/s at 0.5 ms,
736 k at 1 ms, 647 k at 2 ms, 663 k at CPython's 5 ms; 0.2 ms and 0.1 ms were no better
(760 k and 610 k, 17:03-17:07).
"""

from __future__ import annotations

import sys

#: Seconds a thread waits for the GIL before it asks the holder to drop it.
SWITCH_INTERVAL = 0.0005


def shorten_switch_interval(seconds: float = SWITCH_INTERVAL) -> None:
    """Set this process's GIL switch interval (``sys.setswitchinterval``)."""
    sys.setswitchinterval(seconds)
