"""The per-VM control region and its PageList slots, byte by byte, over bytes and a real mmap."""

from __future__ import annotations

import gc
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from shared.constants import PageStatus, ServiceType
from shared.errors import LayoutError
from shared.layout import (
    MAX_SLOT_CAPACITY,
    MAX_SLOT_COUNT,
    REGION_HEADER_SIZE,
    REGION_MAGIC,
    REGION_VERSION,
    SLOT_HEADER_SIZE,
    ControlRegion,
    PageListSlot,
    SlotState,
    region_size,
    slot_capacity_for,
    slot_size,
)

K, C = 3, 5  # slots, pages per slot: C not a multiple of 8, so the status padding shows


def fresh(slot_count: int = K, capacity: int = C, **kw: int) -> tuple[bytearray, ControlRegion]:
    """A zero-filled bytearray holding a newly initialized region."""
    buf = bytearray(region_size(slot_count, capacity))
    args = {"vm_id": 7, "generation": 9, "guest_pages": 1000, **kw}
    region = ControlRegion.initialize(buf, slot_count=slot_count, capacity=capacity, **args)
    return buf, region


def u(fmt: str, buf: bytes | bytearray, offset: int) -> int:
    """One little-endian integer of ``fmt`` at ``offset``."""
    return int(struct.unpack_from("<" + fmt, buf, offset)[0])


def slot_base(index: int, capacity: int = C) -> int:
    """Byte offset of slot ``index`` in the region."""
    return REGION_HEADER_SIZE + index * slot_size(capacity)


# ---- sizes --------------------------------------------------------------------------------


def test_header_sizes() -> None:
    """The region header is 128 bytes (64 for the daemon, 64 for the agent); a slot's 16."""
    assert REGION_HEADER_SIZE == 128
    assert SLOT_HEADER_SIZE == 16


@pytest.mark.parametrize(
    ("capacity", "size"),
    [
        (1, 16 + 8 + 8 + 8),
        (5, 16 + 40 + 8 + 40),
        (8, 16 + 64 + 8 + 64),
        (9, 16 + 72 + 16 + 72),
        (512, 16 + 4096 + 512 + 4096),
    ],
)
def test_slot_size(capacity: int, size: int) -> None:
    """A slot is 16 + 8C (bpn) + C padded to 8 (status) + 8C (mpn) bytes."""
    assert slot_size(capacity) == size
    assert slot_size(capacity) % 8 == 0


def test_region_size() -> None:
    """A region is the 128-byte header followed by K slots."""
    assert region_size(K, C) == 128 + K * slot_size(C)


# ---- header layout ------------------------------------------------------------------------


def test_region_header_bytes() -> None:
    """initialize writes magic, version, geometry, ids and guest pages at their offsets."""
    buf, _ = fresh(vm_id=0x01020304, generation=0x1122334455667788, guest_pages=123456)
    assert buf[0:4] == b"VMMR"
    assert u("I", buf, 0) == REGION_MAGIC
    assert u("H", buf, 4) == REGION_VERSION == 4
    assert u("H", buf, 6) == K
    assert u("I", buf, 8) == C
    assert u("I", buf, 12) == 0x01020304
    assert u("Q", buf, 16) == 0x1122334455667788
    assert u("I", buf, 24) == 0  # pending
    assert u("I", buf, 28) == 0  # free_state
    assert u("Q", buf, 32) == 0  # swap target
    assert u("Q", buf, 40) == 0  # balloon target
    assert u("Q", buf, 48) == 123456
    assert buf[56:128] == bytes(72)  # sample id, the agent's report, reserved


def test_guest_report_words() -> None:
    """The agent's balloon size and impact counters sit at 88, 96 and 104 (u64 each)."""
    buf, region = fresh(vm_id=1, generation=1, guest_pages=64)
    region.write_guest_report(balloon_pages=17, refaults=5, stall_seconds=1.25)
    assert (u("Q", buf, 88), u("Q", buf, 96), u("Q", buf, 104)) == (17, 5, 1_250_000)
    again = ControlRegion(buf)
    assert again.balloon_pages == 17 and again.guest_refaults == 5
    assert again.guest_stall_seconds == 1.25
    assert buf[112:128] == bytes(16)


def test_region_header_fields_write_through() -> None:
    """pending, free_state and the targets are read and written in place at their offsets."""
    buf, region = fresh()
    region.pending = ServiceType.SWAP.bit | ServiceType.PAGE_RETIRE.bit
    region.free_state = 3
    region.swap_target_pages = 0x0102030405
    region.balloon_target_pages = 77
    assert u("I", buf, 24) == 0b101
    assert u("I", buf, 28) == 3
    assert u("Q", buf, 32) == 0x0102030405
    assert u("Q", buf, 40) == 77
    struct.pack_into("<I", buf, 24, 0xFFFF_FFFF)  # written by the other process
    assert region.pending == 0xFFFF_FFFF
    assert buf[56:128] == bytes(72)


def test_sample_words_write_through() -> None:
    """The daemon's sample id (offset 56) and the agent's report (64: id, 72: armed, 76:
    touched) are read and written in place; the reserved bytes stay zero."""
    buf, region = fresh()
    region.sample_id = 0x0102030405060708
    region.write_sample_report(0x0102030405060708, 100, 37)
    assert u("Q", buf, 56) == 0x0102030405060708
    assert u("Q", buf, 64) == 0x0102030405060708
    assert u("I", buf, 72) == 100
    assert u("I", buf, 76) == 37
    assert buf[80:128] == bytes(48)
    region.guest_progress = 12.5
    assert u("Q", buf, 80) == 12_500_000 and region.guest_progress == 12.5
    assert buf[88:128] == bytes(40)
    struct.pack_into("<QII", buf, 64, 9, 5, 4)  # written by the other process
    assert region.read_sample_report() == (9, 5, 4)
    assert region.sample_id == 0x0102030405060708


def test_initialize_clears_previous_contents() -> None:
    """initialize zeroes the whole region, so every slot starts FREE and empty."""
    buf = bytearray(b"\xaa" * region_size(K, C))
    region = ControlRegion.initialize(
        buf, vm_id=1, generation=1, slot_count=K, capacity=C, guest_pages=1
    )
    assert region.pending == 0
    for slot in region.slots:
        assert slot.read_header() == (ServiceType.SWAP, SlotState.FREE, 0, 0)
        assert not slot.bpn.any() and not slot.status.any() and not slot.mpn.any()


def test_initialize_leaves_bytes_past_the_region() -> None:
    """A buffer larger than the region is accepted; bytes after the region are not touched."""
    buf = bytearray(b"\xaa" * (region_size(K, C) + 8))
    ControlRegion.initialize(buf, vm_id=1, generation=1, slot_count=K, capacity=C, guest_pages=1)
    assert buf[-8:] == b"\xaa" * 8


# ---- slot layout --------------------------------------------------------------------------


def test_slot_offsets() -> None:
    """Slot i starts at 128 + i * slot_size(C); its arrays at +16, +16+8C and +16+8C+pad8(C)."""
    buf, region = fresh()
    for i in range(K):
        slot = region.slot(i)
        base = slot_base(i)
        for arr, off in ((slot.bpn, 16), (slot.status, 16 + 8 * C), (slot.mpn, 16 + 8 * C + 8)):
            addr = arr.__array_interface__["data"][0]
            start = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
            assert addr - start == base + off
        assert len(slot.bpn) == len(slot.status) == len(slot.mpn) == C


def test_slot_fill_bytes() -> None:
    """fill writes type, ISSUED, count, seq, the BPNs, OK statuses and the MPNs byte by byte."""
    buf, region = fresh()
    slot = region.slot(1)
    slot.fill(ServiceType.PAGE_RETIRE, 0x0A0B0C0D0E0F, np.array([10, 11, 12]), np.array([-1, 5, 6]))
    base = slot_base(1)
    assert buf[base] == ServiceType.PAGE_RETIRE
    assert buf[base + 1] == SlotState.ISSUED
    assert buf[base + 2 : base + 4] == bytes(2)
    assert u("I", buf, base + 4) == 3
    assert u("Q", buf, base + 8) == 0x0A0B0C0D0E0F
    assert [u("Q", buf, base + 16 + 8 * i) for i in range(3)] == [10, 11, 12]
    assert bytes(buf[base + 16 + 8 * C : base + 16 + 8 * C + 3]) == bytes([PageStatus.OK] * 3)
    mpn_at = base + 16 + 8 * C + 8
    assert [u("q", buf, mpn_at + 8 * i) for i in range(3)] == [-1, 5, 6]
    # Neighbouring slots are untouched.
    assert not any(buf[slot_base(0) : slot_base(1)])
    assert not any(buf[slot_base(2) : slot_base(3)])


def test_status_writes_land_in_the_buffer() -> None:
    """Statuses written through the batch views are the bytes the other process reads."""
    buf, region = fresh()
    slot = region.slot(0)
    slot.fill(ServiceType.SWAP, 1, np.arange(4), np.arange(4))
    _, status, _ = slot.batch(4)
    status[:] = [PageStatus.OK, PageStatus.BUSY, PageStatus.REFERENCED, PageStatus.STALE_FRAME]
    at = slot_base(0) + 16 + 8 * C
    assert list(buf[at : at + 4]) == [0, 1, 8, 3]


def test_slot_header_roundtrip() -> None:
    """write_header then read_header returns the same (type, state, count, seq)."""
    _, region = fresh()
    slot = region.slot(2)
    slot.write_header(ServiceType.PROMOTION_2M, SlotState.ISSUED, C, (1 << 64) - 1)
    assert slot.read_header() == (ServiceType.PROMOTION_2M, SlotState.ISSUED, C, (1 << 64) - 1)
    slot.write_header(ServiceType.SWAP, SlotState.FREE, 0, 0)
    assert slot.read_header() == (ServiceType.SWAP, SlotState.FREE, 0, 0)


def test_batch_views() -> None:
    """batch(n) returns views of the first n entries of the three arrays."""
    _, region = fresh()
    slot = region.slot(0)
    slot.fill(ServiceType.SWAP, 5, np.array([3, 4]), np.array([30, 40]))
    bpn, status, mpn = slot.batch(2)
    assert bpn.tolist() == [3, 4] and status.tolist() == [0, 0] and mpn.tolist() == [30, 40]
    assert bpn.dtype == np.dtype("<u8") and mpn.dtype == np.dtype("<i8")
    assert [len(a) for a in slot.batch(0)] == [0, 0, 0]


# ---- open / round trip --------------------------------------------------------------------


def test_open_roundtrip_bytearray() -> None:
    """A second ControlRegion over the same bytes sees the header and slots the first wrote."""
    buf, first = fresh(vm_id=42, generation=5, guest_pages=4096)
    first.pending = 6
    first.swap_target_pages = 100
    first.slot(2).fill(ServiceType.P2M_UPDATE, 8, np.array([1, 2]), np.array([3, 4]))
    second = ControlRegion(buf)
    assert (second.vm_id, second.generation, second.guest_pages) == (42, 5, 4096)
    assert (second.slot_count, second.slot_capacity) == (K, C)
    assert second.pending == 6 and second.swap_target_pages == 100
    assert second.slot(2).read_header() == (ServiceType.P2M_UPDATE, SlotState.ISSUED, 2, 8)
    second.slot(2).status[1] = PageStatus.NOT_SHARED
    assert first.slot(2).batch(2)[1].tolist() == [0, PageStatus.NOT_SHARED]


def test_open_roundtrip_mmap_file(tmp_path: Path) -> None:
    """A region initialized through one mmap of a file is read back through a fresh mmap."""
    path = tmp_path / "region"
    size = region_size(2, 512)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        writer_map = mmap.mmap(fd, size)
        reader_map = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    writer = ControlRegion.initialize(
        writer_map, vm_id=3, generation=11, slot_count=2, capacity=512, guest_pages=1 << 20
    )
    writer.slot(1).fill(ServiceType.SWAP, 99, np.arange(512), np.arange(512) + 1000)
    writer.pending = ServiceType.SWAP.bit
    reader = ControlRegion(reader_map)
    assert (reader.vm_id, reader.generation, reader.guest_pages) == (3, 11, 1 << 20)
    assert reader.pending == ServiceType.SWAP.bit
    bpn, status, mpn = reader.slot(1).batch(512)
    assert not status.any()
    assert bpn.tolist() == list(range(512))
    assert mpn.tolist() == list(range(1000, 1512))
    reader.slot(1).status[7] = PageStatus.BUSY  # the agent's verdict, seen by the daemon
    assert writer.slot(1).status[7] == PageStatus.BUSY
    del writer, reader, bpn, status, mpn
    gc.collect()
    writer_map.close()
    reader_map.close()
    data = path.read_bytes()
    assert data[:4] == b"VMMR"
    assert data[slot_base(1, 512) + 16 + 8 * 512 + 7] == PageStatus.BUSY


# ---- bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [-1, K, K + 10])
def test_slot_index_out_of_range(index: int) -> None:
    """slot() with an index outside 0..K-1 raises LayoutError."""
    _, region = fresh()
    with pytest.raises(LayoutError):
        region.slot(index)


@pytest.mark.parametrize("count", [-1, C + 1])
def test_write_header_count_out_of_range(count: int) -> None:
    """write_header with a count outside 0..C raises LayoutError and writes nothing."""
    buf, region = fresh()
    before = bytes(buf)
    with pytest.raises(LayoutError):
        region.slot(0).write_header(ServiceType.SWAP, SlotState.ISSUED, count, 1)
    assert bytes(buf) == before


@pytest.mark.parametrize("count", [-1, C + 1])
def test_batch_count_out_of_range(count: int) -> None:
    """batch() with a count outside 0..C raises LayoutError."""
    _, region = fresh()
    with pytest.raises(LayoutError):
        region.slot(0).batch(count)


def test_fill_too_many_pages() -> None:
    """fill with more pages than the slot holds raises LayoutError."""
    _, region = fresh()
    with pytest.raises(LayoutError):
        region.slot(0).fill(ServiceType.SWAP, 1, np.arange(C + 1), np.arange(C + 1))


def test_fill_mismatched_arrays() -> None:
    """fill with BPN and MPN arrays of different lengths raises LayoutError."""
    _, region = fresh()
    with pytest.raises(LayoutError):
        region.slot(0).fill(ServiceType.SWAP, 1, np.arange(3), np.arange(2))


def test_read_header_count_above_capacity() -> None:
    """A slot header whose count exceeds the capacity (written by a peer) raises LayoutError."""
    buf, region = fresh()
    struct.pack_into("<BBxxIQ", buf, slot_base(0), ServiceType.SWAP, SlotState.ISSUED, C + 1, 1)
    with pytest.raises(LayoutError, match="exceeds capacity"):
        region.slot(0).read_header()


def test_full_slot_fits() -> None:
    """A batch of exactly C pages fills the slot without touching the next one."""
    buf, region = fresh()
    region.slot(0).fill(ServiceType.SWAP, 1, np.full(C, 0xFF), np.full(C, -1))
    assert region.slot(0).read_header()[2] == C
    assert not any(buf[slot_base(1) :])


# ---- corruption ---------------------------------------------------------------------------


def _corrupt(fmt: str, offset: int, value: int) -> bytearray:
    buf, _ = fresh()
    struct.pack_into("<" + fmt, buf, offset, value)
    return buf


@pytest.mark.parametrize(
    ("fmt", "offset", "value", "match"),
    [
        ("I", 0, 0x524D4D57, "bad magic"),
        ("I", 0, 0, "bad magic"),
        ("H", 4, 1, "version"),
        ("H", 4, 0, "version"),
        ("H", 6, 0, "geometry"),
        ("H", 6, MAX_SLOT_COUNT + 1, "geometry"),
        ("I", 8, 0, "geometry"),
        ("I", 8, MAX_SLOT_CAPACITY + 1, "geometry"),
        ("H", 6, K + 1, "need"),  # more slots than the buffer holds
        ("I", 8, C + 1, "need"),  # bigger slots than the buffer holds
    ],
)
def test_corrupt_header(fmt: str, offset: int, value: int, match: str) -> None:
    """Opening a region with a corrupt magic, version or geometry raises LayoutError."""
    buf = _corrupt(fmt, offset, value)
    with pytest.raises(LayoutError, match=match):
        ControlRegion(buf)


@pytest.mark.parametrize("size", [0, 1, REGION_HEADER_SIZE - 1])
def test_buffer_smaller_than_header(size: int) -> None:
    """A buffer smaller than the 128-byte header raises LayoutError, not struct.error."""
    with pytest.raises(LayoutError):
        ControlRegion(bytearray(size))


def test_buffer_truncated() -> None:
    """A valid header over a buffer too short for its slots raises LayoutError."""
    buf, _ = fresh()
    with pytest.raises(LayoutError):
        ControlRegion(buf[:-1])
    with pytest.raises(LayoutError):
        ControlRegion(buf[:REGION_HEADER_SIZE])


def test_zeroed_buffer_is_not_a_region() -> None:
    """An all-zero buffer (a file never initialized) raises LayoutError."""
    with pytest.raises(LayoutError):
        ControlRegion(bytearray(region_size(K, C)))


def test_initialize_buffer_too_small() -> None:
    """initialize into a buffer smaller than the region raises LayoutError and writes nothing."""
    buf = bytearray(b"\xaa" * (region_size(K, C) - 1))
    with pytest.raises(LayoutError):
        ControlRegion.initialize(
            buf, vm_id=1, generation=1, slot_count=K, capacity=C, guest_pages=1
        )
    assert buf == bytearray(b"\xaa" * (region_size(K, C) - 1))


@pytest.mark.parametrize(("stype", "state"), [(len(ServiceType), 0), (255, 0), (0, 2), (0, 255)])
def test_corrupt_slot_type_or_state(stype: int, state: int) -> None:
    """A slot header with an unknown service type or state raises LayoutError on read."""
    buf, region = fresh()
    struct.pack_into("<BB", buf, slot_base(1), stype, state)
    with pytest.raises(LayoutError, match="corrupt header"):
        region.slot(1).read_header()
    region.slot(0).read_header()  # other slots are unaffected


@pytest.mark.parametrize("bad", [max(PageStatus) + 1, 0xFF])
def test_corrupt_status_byte(bad: int) -> None:
    """A status byte that is no PageStatus raises LayoutError when the batch is read."""
    _, region = fresh()
    slot = region.slot(0)
    slot.fill(ServiceType.SWAP, 1, np.arange(C), np.arange(C))
    slot.status[C - 1] = bad
    with pytest.raises(LayoutError, match="corrupt status"):
        slot.batch(C)
    # Entries past the batch are not examined.
    assert len(slot.batch(C - 1)[0]) == C - 1


def test_every_page_status_is_valid() -> None:
    """Every PageStatus value passes the status check."""
    _, region = fresh(capacity=len(PageStatus))
    slot = region.slot(0)
    n = len(PageStatus)
    slot.fill(ServiceType.SWAP, 1, np.arange(n), np.arange(n))
    slot.status[:] = [int(s) for s in PageStatus]
    assert slot.batch(n)[1].tolist() == [int(s) for s in PageStatus]


def test_slot_class_is_positioned_by_offset() -> None:
    """A PageListSlot built at an offset views exactly that part of the buffer."""
    buf = bytearray(8 + slot_size(2))
    slot = PageListSlot(buf, 8, 2, index=0)
    slot.write_header(ServiceType.SWAP, SlotState.ISSUED, 1, 2)
    assert buf[:8] == bytes(8)
    assert u("I", buf, 8 + 4) == 1


def test_slot_capacity_follows_the_guest_in_whole_2m_regions() -> None:
    """1/32 of the guest in whole 512-page regions, never under 512 nor over 4096: the
    slots cost at most ~2 bytes per guest page above the floor."""
    mib = 256  # pages per MiB
    assert slot_capacity_for(16 * mib) == 512  # the floor: the old fixed size
    assert slot_capacity_for(64 * mib) == 512
    assert slot_capacity_for(128 * mib) == 1024
    assert slot_capacity_for(200 * mib) == 1536  # 1600 rounded down to whole regions
    assert slot_capacity_for(256 * mib) == 2048
    assert slot_capacity_for(512 * mib) == 4096
    assert slot_capacity_for(64 * 1024 * mib) == 4096  # the ceiling
    for pages in (20 * mib, 300 * mib, 777 * mib, 4096 * mib):
        c = slot_capacity_for(pages)
        assert c % 512 == 0
        assert c == 512 or region_size(4, c) / pages < 2.2, (pages, c)
