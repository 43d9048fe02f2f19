"""Processing one PageList batch on the agent: checks, the service's decision, completion.

Both loops (high and low priority) hand their batches here. Processing is synchronous from
reading the slot to sending CompleteRequest, so no vCPU can touch a page between the
service's verdict and the daemon learning of it.

A BALLOON batch is filled by the agent (docs/protocol.md 8.3, "agent-filled batches"): the
slot comes with room for ``count`` pages and no pages in it; the balloon driver writes the
pages it gives (``k`` <= ``count``, maybe 0) and the CompleteRequest says ``k``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from shared.constants import PageStatus, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import ControlRegion, SlotState
from shared.messages import CompleteRequest, Request

from .balloon import BalloonDriver
from .exposure import ExposureTable
from .link import Link
from .sampler import Sampler
from .services import build_services


class BatchProcessor:
    """Decides every page of a batch with its service's filter and completes the batch."""

    def __init__(
        self,
        link: Link,
        region: ControlRegion,
        exposure: ExposureTable,
        sampler: Sampler,
        balloon: BalloonDriver | None = None,
    ) -> None:
        self.link = link
        #: The guest's balloon driver; without one a BALLOON batch is given no page.
        self.balloon = balloon
        self.region = region
        self.exposure = exposure
        self.services = build_services(exposure, sampler)
        self.batches: Counter[str] = Counter()
        self.pages: Counter[tuple[str, str]] = Counter()
        self.released_while_pinned: Counter[str] = Counter()
        self.on_batch: list[Callable[[str, float, np.ndarray], None]] = []
        #: Pages the last batch refused as recently referenced (their bit now cleared: the
        #: clock's second chance, so the next pass may take them).
        self.last_referenced = 0

    def process(self, req: Request) -> int:
        """Filter, invalidate, write statuses and complete one batch; returns pages released."""
        t0 = time.perf_counter()
        slot = self.region.slot(req.slot)
        stype, state, count, seq = slot.read_header()
        if (
            state != SlotState.ISSUED
            or count != req.count
            or seq != req.seq
            or stype != req.service
        ):
            raise RemoteProtocolError(
                f"slot {req.slot} does not match Request {req}", ErrorCode.SLOT_NOT_ISSUED
            )
        bpns, status, mpns = slot.batch(count)
        service = ServiceType(stype)
        if service == ServiceType.BALLOON:
            # Agent-filled: the driver writes the pages it gives and the count sent is theirs.
            given = self.balloon.fill(bpns, status, count) if self.balloon is not None else 0
            accepted = bpns[:given].astype(np.int64)
            count, status = given, status[:given]
        else:
            accepted = self.services[service].process(bpns, mpns, status)
        name = service.name.lower()
        pinned = int(np.count_nonzero(self.exposure.pinned[accepted]))
        if pinned:
            self.released_while_pinned[name] += pinned
        elapsed = time.perf_counter() - t0
        self.link.send(CompleteRequest(req.slot, count, seq, int(elapsed * 1e6)))
        self.batches[name] += 1
        counts = np.bincount(status, minlength=len(PageStatus))
        self.last_referenced = int(counts[PageStatus.REFERENCED])
        for st in PageStatus:
            if counts[st]:
                self.pages[(name, st.name.lower())] += int(counts[st])
        for callback in self.on_batch:
            callback(name, elapsed, counts)
        return len(accepted)
