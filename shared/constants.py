"""Closed sets and sizes that both daemons agree on: services, page states, statuses, bits."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

PAGE_SIZE = 4096
PAGES_PER_2M = 512
#: Default capacity of one PageList slot (pages per batch).
DEFAULT_SLOT_CAPACITY = 512
#: Default number of PageList slots in one VM's control region.
DEFAULT_SLOT_COUNT = 4
#: Most pages one fault reply may resolve (the faulting page plus its neighbours).
MAX_FAULT_AROUND = 64
#: A frame index that means "no frame"; p2m and exposure arrays use it.
NO_FRAME = -1


class _NumPyIntEnum(IntEnum):
    """An IntEnum NumPy treats as the plain integer it is.

    Why: a NumPy operation with an enum member (``p2m.state[x] == PageState.SWAPPED``) looks
    up ``__array_ufunc__`` on the member's class. On Python 3.11 ``EnumType.__getattr__``
    answers the missing name by raising AttributeError, several µs per operation, on every hot
    path. NumPy ignores a class whose ``__array_ufunc__`` is ndarray's own, so naming it here
    makes the lookup succeed and changes nothing else.
    """

    __array_ufunc__ = np.ndarray.__array_ufunc__


class ServiceType(_NumPyIntEnum):
    """A memory service; the value is its bit in the pending word and its code on the wire."""

    SWAP = 0
    P2M_UPDATE = 1
    PAGE_RETIRE = 2
    SAMPLING = 3
    NUMA_MIGRATION = 4
    DEFRAG_2M = 5
    PAGE_SHARING = 6
    VALIDATION = 7
    PROMOTION_2M = 8
    #: The guest's balloon driver gives pages back (the agent picks them: section 8.3 of
    #: docs/protocol.md, "agent-filled batches").
    BALLOON = 9

    @property
    def bit(self) -> int:
        """This service's bit in the pending word."""
        return 1 << int(self)


#: Release services handled by the high-priority loop, in the order a round serves them.
#: Release services, in the order a round offers them: retiring failing frames and dropping
#: stale mappings first (correctness), then ballooning before swapping (the cheaper method
#: for the guest, ESX's order).
HIGH_PRIORITY_SERVICES = (
    ServiceType.PAGE_RETIRE,
    ServiceType.P2M_UPDATE,
    ServiceType.BALLOON,
    ServiceType.SWAP,
)
HIGH_PRIORITY_MASK = sum(s.bit for s in HIGH_PRIORITY_SERVICES)
#: Best-effort services handled by the 10 Hz low-priority rounds under a time bound.
LOW_PRIORITY_SERVICES = tuple(s for s in ServiceType if s not in HIGH_PRIORITY_SERVICES)
LOW_PRIORITY_MASK = sum(s.bit for s in LOW_PRIORITY_SERVICES)


class Priority(_NumPyIntEnum):
    """Which loop asks for work."""

    HIGH = 0
    LOW = 1


class PageState(_NumPyIntEnum):
    """Platform-side state of one guest page (one byte per BPN in the p2m)."""

    ZERO = 0  # never touched, or given back: the next touch gets a zeroed frame
    EXPOSED = 1  # the VMM maps the frame
    SELECTED = 2  # put in a PageList, the VMM has not answered yet
    IN_FLIGHT = 3  # released by the VMM, a service operates on it (op says which)
    SWAPPED = 4  # content lives in a swap slot, no frame
    RESIDENT = 5  # has a frame with content, but the VMM does not map it (after a move)


class PageStatus(_NumPyIntEnum):
    """Per-page status in a PageList: the VMM's verdict, then the platform's outcome."""

    OK = 0  # accepted by the VMM (or done by the platform)
    BUSY = 1  # refused: pinned in translation
    NOT_SHARED = 2  # refused: the p2mUpdate filter keeps shared pages only
    STALE_FRAME = 3  # refused: the MPN does not match the VMM's exposure table
    NOT_EXPOSED = 4  # refused: the VMM does not map this page
    NO_SPACE = 5  # platform: swap file full, page stays resident
    IO_ERROR = 6  # platform: write failed, page stays resident
    CANCELLED = 7  # platform: a fault cancelled the operation
    REFERENCED = 8  # refused: the guest touched it since the last pass (second chance)
    UNTOUCHED = 9  # released: a read-ahead page the guest never touched (validation)
    LARGE = 10  # daemon's mark in a VALIDATION batch: the page's region is large (p2m)


class FaultReason(_NumPyIntEnum):
    """Why a fault needed the platform; a label on fault metrics."""

    FIRST_TOUCH = 0
    SWAP_IN = 1
    CANCEL = 2  # fault on a page whose swap-out was in flight
    COMPLETE = 3  # fault on a page whose move was in flight: completed first
    REMAP = 4  # resident but not mapped (moved, retired, p2m-updated)
    COW = 5  # write to a shared read-only page
    MAPPED = 6  # already mapped on the platform (another vCPU won the race)


class FreeState(_NumPyIntEnum):
    """Host free-memory state, from most to least free (after ESX)."""

    HIGH = 0
    SOFT = 1
    HARD = 2
    LOW = 3
