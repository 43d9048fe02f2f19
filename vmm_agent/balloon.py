"""The guest's balloon driver (ESX's vmmemctl, Waldspurger OSDI 2002 section 3).

The platform asks for pages by a BALLOON batch (docs/protocol.md, "agent-filled batches"):
the slot comes empty with room for the pages wanted, and the driver fills it with the pages
it gives. It takes them as a guest's balloon allocates memory (``GuestOS.inflate``): free
pages first (those the guest once used, which free a frame each at no cost to it, then
never-used ones), then pages of the page cache, coldest first by the CLOCK the guest
evicts with (their blocks are dropped: a later read of one is a refault), never anonymous
pages, never pages pinned for I/O or that a fault in flight may map. Before the batch is
completed each page is out of the guest: BALLOON in the guest model, its mapping gone
(hidden one included, no longer watched by the sampler), its content forgotten (the
verification pass does not read it). The platform then frees what backed it: the page is
untouched again, and the balloon is no disk (a ballooned page is never swapped or read).

Deflating needs no message: when the platform's target (control region, offset 40) is
below the balloon's size, the driver gives pages back to the free pool; their next touch is
a first touch.

Both directions are rate-limited (pages per second, token buckets; Linux's vmw_balloon
inflates up to 2048 pages/s when the guest is under pressure, deflates up to 16384 pages/s)
and the balloon holds at most ``max_fraction`` of guest memory (ESX: 65 %).

The driver also writes the agent's guest report into the control region: the balloon's
size, the guest's refaults and its stall time, at every low-priority tick (100 ms) and
after every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import PageStatus, ServiceType
from shared.layout import ControlRegion

from .exposure import ExposureTable
from .guest import GuestMemory
from .guest_os import BALLOON, GuestOS
from .guest_time import GuestProgress

log = structlog.get_logger("vmmem.vmm.balloon")
#: A token bucket holds this many seconds of its rate: the most one batch or tick may move.
BURST_SECONDS = 0.25


class TokenBucket:
    """Pages per second, with a burst of ``BURST_SECONDS`` worth."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * BURST_SECONDS)
        self.tokens = self.burst
        self.last = now

    def take(self, wanted: int, now: float) -> int:
        """Up to ``wanted`` whole pages the rate allows now (taken from the bucket)."""
        self.tokens = min(self.burst, self.tokens + self.rate * max(0.0, now - self.last))
        self.last = now
        granted = max(0, min(wanted, int(self.tokens + 1e-6)))  # float dust is no page
        self.tokens = max(0.0, self.tokens - granted)
        return granted

    def give_back(self, pages: int) -> None:
        """Pages taken but not moved (none could be found) do not use up the rate."""
        self.tokens = min(self.burst, self.tokens + pages)


class BalloonDriver:
    """Inflates on the platform's BALLOON batches, deflates toward the target by itself."""

    def __init__(
        self,
        guest_os: GuestOS,
        exposure: ExposureTable,
        guest: GuestMemory,
        busy: Container[int],
        region: ControlRegion,
        progress: GuestProgress,
        inflate_rate: float,
        deflate_rate: float,
        max_fraction: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.os = guest_os
        self.exposure = exposure
        self.guest = guest
        #: Pages a fault in flight may map (``FaultPath.may_map``: its own page, and its
        #: fault-around's): the daemon may have mapped them already, and would free the
        #: frame its reply maps.
        self.busy = busy
        self.region = region
        self.progress = progress
        self.clock = clock
        self.cap = int(max_fraction * guest_os.guest_pages)
        self.inflater = TokenBucket(inflate_rate, clock())
        self.deflater = TokenBucket(deflate_rate, clock())
        #: Set while nothing may leave the guest (the verification pass reads it all back).
        self.frozen: Callable[[], bool] = lambda: False
        self.inflated = 0
        self.deflated = 0
        self.batches = 0
        #: Pages asked for and not given, by why: the rate, the cap, the target already met,
        #: no page that may go (all anonymous, pinned or busy), frozen.
        self.not_given: dict[str, int] = {}
        #: Ballooned pages found mapped again (the platform's fault-around mapped them as
        #: untouched neighbours): returned to the free pool, so the balloon gives them anew.
        self.remapped = 0

    @property
    def size(self) -> int:
        return self.os.balloon_size

    @property
    def target(self) -> int:
        return self.region.balloon_target_pages

    def _unavailable(self, page: int) -> bool:
        return bool(self.exposure.pinned[page]) or page in self.busy

    def _refuse(self, why: str, pages: int) -> None:
        if pages > 0:
            self.not_given[why] = self.not_given.get(why, 0) + pages

    def fill(self, bpn: npt.NDArray[np.uint64], status: npt.NDArray[np.uint8], wanted: int) -> int:
        """A BALLOON batch: write the pages given into ``bpn``/``status``; returns how many.

        ``bpn`` and ``status`` are the slot's arrays (room for at least ``wanted``). Every
        page given is out of the guest when this returns, before the CompleteRequest goes.
        """
        self.batches += 1
        wanted = min(wanted, len(bpn), len(status))
        if self.frozen():
            self._refuse("frozen", wanted)
            self.report()  # the refusal, for memsched, before the CompleteRequest
            return 0
        room = min(wanted, max(0, self.target - self.size))
        self._refuse("target", wanted - room)
        capped = min(room, max(0, self.cap - self.size))
        self._refuse("cap", room - capped)
        allowed = self.inflater.take(capped, self.clock())
        self._refuse("rate", capped - allowed)
        pages = self.os.inflate(allowed, self._unavailable)
        k = len(pages)
        self.inflater.give_back(allowed - k)
        self._refuse("no_page", allowed - k)
        if k:
            self._out_of_guest(pages)
            bpn[:k] = pages
            status[:k] = PageStatus.OK
            self.inflated += k
        self.report()
        return k

    def _out_of_guest(self, pages: npt.NDArray[np.int64]) -> None:
        """The guest no longer maps, watches or expects anything of ``pages``."""
        exposure = self.exposure
        exposure.invalidate(pages)
        exposure.watched[pages] = False  # not touched while ballooned: counts as untouched
        exposure.released_by[pages] = ServiceType.BALLOON
        self.guest.forget(pages)

    def tick(self, now: float) -> None:
        """Deflate toward the target (rate-limited), then report. Called every 100 ms."""
        self._take_back_remapped()
        excess = self.size - self.target
        if excess > 0:
            n = self.deflater.take(excess, now)
            given = self.os.deflate(n)
            self.deflater.give_back(n - len(given))
            self.deflated += len(given)
        self.report()

    def _take_back_remapped(self) -> None:
        """Ballooned pages the guest maps again leave the balloon (see ``remapped``)."""
        if self.os.balloon_size == 0:
            return
        ballooned = np.flatnonzero(self.os.kind == BALLOON)
        mapped = ballooned[self.exposure.mapped_frame(ballooned) >= 0]
        if len(mapped):
            self.os.release(mapped)
            self.remapped += len(mapped)
            log.info("balloon_pages_remapped", pages=len(mapped), total=self.remapped)

    def report(self) -> None:
        """The guest report in the control region (agent-written words)."""
        self.region.write_guest_report(
            self.size,
            self.os.refaults,
            self.progress.stalled_total(self.progress.clock()),
            self.refused,
        )

    @property
    def refused(self) -> int:
        """Pages asked for that could not leave the guest (none that may go, or frozen):
        not the rate, the cap or a target already met, which a later batch may still give."""
        return self.not_given.get("no_page", 0) + self.not_given.get("frozen", 0)

    def summary(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "target": self.target,
            "cap": self.cap,
            "inflated": self.inflated,
            "deflated": self.deflated,
            "batches": self.batches,
            "not_given": dict(self.not_given),
            "remapped": self.remapped,
            "inflate_rate": self.inflater.rate,
            "deflate_rate": self.deflater.rate,
        }
