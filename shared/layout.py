"""Per-VM control region and its PageList slots, laid out byte by byte in shared memory.

The daemon creates one control region file per VM (mode 0600) and both processes map it.
All integers are little-endian. Region header, 128 bytes: the first 64 are written by the
daemon, the last 64 by the agent (one writer per word)::

    offset size field               writer
    0      4    magic               daemon  0x524D4D56 (b"VMMR")
    4      2    version             daemon  4, bumped when a field gains a meaning
    6      2    slot_count          daemon  K
    8      4    slot_capacity       daemon  C, pages per slot
    12     4    vm_id               daemon
    16     8    generation          daemon  bumped at each registration
    24     4    pending             daemon  bit (1 << ServiceType) set while work waits
    28     4    free_state          daemon  host FreeState, for the agent's information
    32     8    swap_target_pages   daemon  memsched target: pages this VM should have swapped
    40     8    balloon_target_pages daemon
    48     8    guest_pages         daemon
    56     8    sample_id           daemon  working-set sample the SAMPLING batches belong to
    64     8    report_sample_id    agent   the sample its counters below are about
    72     4    report_armed        agent   pages of that sample the monitor watches
    76     4    report_touched      agent   of those, pages the guest touched since armed
    80     8    guest_progress_us   agent   guest time so far (not stalled on the platform), µs
    88     8    balloon_pages       agent   pages the guest's balloon driver holds now
    96     8    guest_refaults      agent   page-cache refaults of the guest so far
    104    8    guest_stall_us      agent   time the guest's vCPUs were stalled so far, µs
    112    8    balloon_refused     agent   pages the balloon was asked for and had none to give
    120    8    reserved (0)

Then K slots, each ``slot_size(C)`` bytes, 8-byte aligned. Slot layout::

    offset        size     field
    0             1        type      ServiceType of the batch
    1             1        state     SlotState
    2             2        reserved
    4             4        count     pages in the batch, <= C
    8             8        seq       batch sequence number, matches Request/CompleteRequest
    16            8*C      bpn       u64 guest page numbers
    16+8C         pad8(C)  status    u8 PageStatus per page (padded to a multiple of 8)
                                   (daemon: OK, or LARGE in VALIDATION; then the agent's)
    16+8C+pad8(C) 8*C      mpn       i64 frame numbers, for match checks and remaps

One writer at a time per slot: the daemon fills it and sets ISSUED; the agent writes statuses
while it is ISSUED; the daemon reads them on CompleteRequest and sets FREE.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from .constants import DEFAULT_SLOT_CAPACITY, PAGES_PER_2M, PageStatus, ServiceType
from .errors import LayoutError

REGION_MAGIC = 0x524D4D56
REGION_VERSION = 4
REGION_HEADER = struct.Struct("<IHHIIQIIQQQQ64x")
REGION_HEADER_SIZE = REGION_HEADER.size  # 128
SLOT_HEADER = struct.Struct("<BBxxIQ")
SLOT_HEADER_SIZE = SLOT_HEADER.size  # 16
MAX_SLOT_CAPACITY = 1 << 16
MAX_SLOT_COUNT = 256
#: The largest slot ``slot_capacity_for`` gives (16 MiB a batch; a 512 MiB guest has it).
LARGEST_DEFAULT_SLOT_CAPACITY = 4096
_PENDING_OFFSET = 24
_VALID_STATUS = max(PageStatus)


class SlotState(IntEnum):
    """Who owns a slot right now."""

    FREE = 0
    ISSUED = 1


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def slot_size(capacity: int) -> int:
    """Bytes of one slot of ``capacity`` pages."""
    return SLOT_HEADER_SIZE + 8 * capacity + _pad8(capacity) + 8 * capacity


def slot_capacity_for(guest_pages: int) -> int:
    """Pages per slot for a guest of ``guest_pages`` when the configuration names none.

    Why it grows with the guest: every batch costs the same fixed work on both sides (a
    round trip, the filters' and the completion's NumPy calls, one writer hand-off), so
    512-page batches bound a large guest's swap-out by that fixed cost, not by the copy.
    Why 1/32 of the guest: the default four slots of 17 bytes a page then cost at most
    17 x 4 / 32 ~ 2 bytes per guest page on each side, and a batch stays a small part of
    the guest. Whole 2 MiB
    regions (a multiple of 512, so a promotion batch still holds whole regions), between
    ``DEFAULT_SLOT_CAPACITY`` and ``LARGEST_DEFAULT_SLOT_CAPACITY``.
    """
    share = guest_pages // 32 // PAGES_PER_2M * PAGES_PER_2M
    return max(DEFAULT_SLOT_CAPACITY, min(LARGEST_DEFAULT_SLOT_CAPACITY, share))


def region_size(slot_count: int, capacity: int) -> int:
    """Bytes of a whole control region."""
    return REGION_HEADER_SIZE + slot_count * slot_size(capacity)


class PageListSlot:
    """One PageList slot: header fields plus NumPy views of its three arrays."""

    def __init__(self, buf: Any, offset: int, capacity: int, index: int) -> None:
        self.index = index
        self.capacity = capacity
        self._buf = buf
        self._offset = offset
        base = offset + SLOT_HEADER_SIZE
        self.bpn: npt.NDArray[np.uint64] = np.frombuffer(buf, "<u8", capacity, base)
        self.status: npt.NDArray[np.uint8] = np.frombuffer(buf, "u1", capacity, base + 8 * capacity)
        mpn_off = base + 8 * capacity + _pad8(capacity)
        self.mpn: npt.NDArray[np.int64] = np.frombuffer(buf, "<i8", capacity, mpn_off)

    def read_header(self) -> tuple[ServiceType, SlotState, int, int]:
        """(type, state, count, seq), validated: a corrupt header raises LayoutError."""
        stype, state, count, seq = SLOT_HEADER.unpack_from(self._buf, self._offset)
        try:
            service, slot_state = ServiceType(stype), SlotState(state)
        except ValueError:
            raise LayoutError(
                f"slot {self.index}: corrupt header (type {stype}, state {state})"
            ) from None
        if count > self.capacity:
            raise LayoutError(f"slot {self.index}: count {count} exceeds capacity {self.capacity}")
        return service, slot_state, count, seq

    def write_header(self, service: ServiceType, state: SlotState, count: int, seq: int) -> None:
        """Set the header; ``count`` must fit the slot."""
        if not 0 <= count <= self.capacity:
            raise LayoutError(f"slot {self.index}: count {count} out of 0..{self.capacity}")
        SLOT_HEADER.pack_into(self._buf, self._offset, service, state, count, seq)

    def fill(
        self,
        service: ServiceType,
        seq: int,
        bpns: npt.NDArray[np.integer[Any]],
        mpns: npt.NDArray[np.integer[Any]],
        status: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """Daemon side: write a batch, statuses OK (or ``status``: the daemon's per-page
        marks, LARGE in VALIDATION batches), and hand the slot to the agent."""
        n = len(bpns)
        if n != len(mpns) or n > self.capacity or (status is not None and len(status) != n):
            raise LayoutError(f"slot {self.index}: batch of {n} pages does not fit")
        self.bpn[:n] = bpns
        self.mpn[:n] = mpns
        self.status[:n] = PageStatus.OK if status is None else status
        self.write_header(service, SlotState.ISSUED, n, seq)

    def batch(
        self, count: int
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """Views (bpn, status, mpn) of the first ``count`` entries; statuses are validated."""
        if not 0 <= count <= self.capacity:
            raise LayoutError(f"slot {self.index}: count {count} out of 0..{self.capacity}")
        status = self.status[:count]
        if count and int(status.max()) > _VALID_STATUS:
            raise LayoutError(f"slot {self.index}: corrupt status byte {int(status.max())}")
        return self.bpn[:count], status, self.mpn[:count]


class ControlRegion:
    """The per-VM control region over any writable buffer (an mmap in practice)."""

    def __init__(self, buf: Any) -> None:
        if len(buf) < REGION_HEADER_SIZE:
            raise LayoutError(f"control region of {len(buf)} bytes is smaller than its header")
        self._buf = buf
        fields = REGION_HEADER.unpack_from(buf, 0)
        magic, version, slot_count, capacity = fields[:4]
        if magic != REGION_MAGIC:
            raise LayoutError(f"control region: bad magic 0x{magic:08x}")
        if version != REGION_VERSION:
            raise LayoutError(f"control region: unsupported version {version}")
        if not (0 < slot_count <= MAX_SLOT_COUNT and 0 < capacity <= MAX_SLOT_CAPACITY):
            raise LayoutError(f"control region: bad geometry {slot_count}x{capacity}")
        if len(buf) < region_size(slot_count, capacity):
            raise LayoutError(
                f"control region: {len(buf)} bytes, need {region_size(slot_count, capacity)}"
            )
        self.slot_count: int = slot_count
        self.slot_capacity: int = capacity
        self.vm_id: int = fields[4]
        self.generation: int = fields[5]
        self._pending = np.frombuffer(buf, "<u4", 1, _PENDING_OFFSET)
        self._words = np.frombuffer(buf, "<u8", 5, 32)  # targets, guest_pages, sample_id, report id
        self._report = np.frombuffer(buf, "<u4", 2, 72)  # report_armed, report_touched
        self._progress = np.frombuffer(buf, "<u8", 1, 80)
        # balloon_pages, refaults, stall_us, balloon_refused
        self._guest = np.frombuffer(buf, "<u8", 4, 88)
        step = slot_size(capacity)
        self.slots = [
            PageListSlot(buf, REGION_HEADER_SIZE + i * step, capacity, i) for i in range(slot_count)
        ]

    @staticmethod
    def initialize(
        buf: Any, *, vm_id: int, generation: int, slot_count: int, capacity: int, guest_pages: int
    ) -> ControlRegion:
        """Write a fresh header (all slots FREE) into ``buf`` and return the region."""
        if len(buf) < region_size(slot_count, capacity):
            raise LayoutError("buffer too small for the control region")
        buf[: region_size(slot_count, capacity)] = bytes(region_size(slot_count, capacity))
        REGION_HEADER.pack_into(
            buf,
            0,
            REGION_MAGIC,
            REGION_VERSION,
            slot_count,
            capacity,
            vm_id,
            generation,
            0,
            0,
            0,
            0,
            guest_pages,
            0,
        )
        return ControlRegion(buf)

    def read_generation(self) -> int:
        """The generation in the header now (a daemon that took over writes a new one)."""
        generation: int = REGION_HEADER.unpack_from(self._buf, 0)[5]
        return generation

    @property
    def pending(self) -> int:
        """The pending word: one bit per service type with work waiting."""
        word: int = self._pending.item(0)  # a Python int: read after every fault (poll)
        return word

    @pending.setter
    def pending(self, value: int) -> None:
        self._pending[0] = value

    @property
    def free_state(self) -> int:
        return int(np.frombuffer(self._buf, "<u4", 1, 28)[0])

    @free_state.setter
    def free_state(self, value: int) -> None:
        np.frombuffer(self._buf, "<u4", 1, 28)[0] = value

    @property
    def swap_target_pages(self) -> int:
        return int(self._words[0])

    @swap_target_pages.setter
    def swap_target_pages(self, value: int) -> None:
        self._words[0] = value

    @property
    def balloon_target_pages(self) -> int:
        return int(self._words[1])

    @balloon_target_pages.setter
    def balloon_target_pages(self, value: int) -> None:
        self._words[1] = value

    @property
    def guest_pages(self) -> int:
        return int(self._words[2])

    @property
    def sample_id(self) -> int:
        """Daemon: the working-set sample that SAMPLING batches currently hand out."""
        return int(self._words[3])

    @sample_id.setter
    def sample_id(self, value: int) -> None:
        self._words[3] = value

    def read_sample_report(self) -> tuple[int, int, int]:
        """(sample id, pages armed, pages touched) as the agent last wrote them.

        The agent writes the counters, then the id; reading them in the opposite order means
        counters read with an id were written for that id (or a later write of it).
        """
        armed, touched = int(self._report[0]), int(self._report[1])
        return int(self._words[4]), armed, touched

    @property
    def guest_progress(self) -> float:
        """Agent: seconds the guest has made progress so far (the clock of sampling periods)."""
        return int(self._progress[0]) / 1e6

    @guest_progress.setter
    def guest_progress(self, seconds: float) -> None:
        self._progress[0] = max(0, int(seconds * 1e6))

    @property
    def balloon_pages(self) -> int:
        """Pages the guest's balloon holds (agent-written)."""
        return int(self._guest[0])

    @property
    def guest_refaults(self) -> int:
        """Page-cache refaults of the guest so far (agent-written)."""
        return int(self._guest[1])

    @property
    def guest_stall_seconds(self) -> float:
        """Time the guest's vCPUs were stalled so far (agent-written)."""
        return int(self._guest[2]) / 1e6

    @property
    def balloon_refused_pages(self) -> int:
        """Pages the balloon was asked for and had none to give, so far (agent-written):
        memsched takes a rise while the balloon owes pages as a balloon that cannot inflate."""
        return int(self._guest[3])

    def write_guest_report(
        self, balloon_pages: int, refaults: int, stall_seconds: float, balloon_refused: int = 0
    ) -> None:
        """Agent side: the balloon's size and the guest's impact counters (cumulative)."""
        self._guest[0] = balloon_pages
        self._guest[1] = refaults
        self._guest[2] = int(stall_seconds * 1e6)
        self._guest[3] = balloon_refused

    def write_sample_report(self, sample_id: int, armed: int, touched: int) -> None:
        """Agent: its watch counters for ``sample_id`` (each word has a single writer)."""
        self._report[0] = min(armed, 0xFFFFFFFF)
        self._report[1] = min(touched, 0xFFFFFFFF)
        self._words[4] = sample_id

    def slot(self, index: int) -> PageListSlot:
        """The slot at ``index``; out of range raises LayoutError."""
        if not 0 <= index < len(self.slots):
            raise LayoutError(f"slot index {index} out of 0..{self.slot_count - 1}")
        return self.slots[index]

    def release(self) -> None:
        """Drop every NumPy view of the buffer, so that its mapping can be closed now.

        Why: each view holds a buffer export on the mmap, and ``mmap.close()`` refuses while
        one lives. Left to the garbage collector, a closed VM's mapping and the descriptor of
        its deleted file stay until the next full collection. After this, the region reads
        and writes nothing (a use raises AttributeError or LayoutError, never touches memory).
        """
        self.slots = []
        for name in ("_pending", "_words", "_report", "_progress", "_guest"):
            self.__dict__.pop(name, None)
