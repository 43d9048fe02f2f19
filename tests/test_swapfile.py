"""SwapFile: slot allocation, batched writes with checksums, checked reads, injected errors."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from platform_daemon import swapfile
from platform_daemon.swapfile import (
    HASH_CHUNK,
    IOV_MAX,
    SwapChecksumError,
    SwapFile,
    SwapWriteError,
    frame_digests,
    runs,
)
from shared.constants import PAGE_SIZE
from shared.errors import VMMemError

SLOTS = 32


@pytest.fixture
def swap(tmp_path: Path) -> Iterator[SwapFile]:
    """A swap file of 32 slots in a temporary directory, closed after the test."""
    sf = SwapFile(tmp_path / "swap", SLOTS * PAGE_SIZE)
    try:
        yield sf
    finally:
        if sf.path.exists():
            sf.close()


def pages(n: int, seed: int = 0) -> np.ndarray:
    """``n`` pages of random bytes."""
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)


# ---- runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "expected"),
    [
        ([], []),
        ([4], [(0, 1)]),
        ([1, 2, 3], [(0, 3)]),
        ([1, 2, 3, 7, 8, 10], [(0, 3), (3, 2), (5, 1)]),
        ([0, 2, 4], [(0, 1), (1, 1), (2, 1)]),
        ([5, 5, 6], [(0, 1), (1, 2)]),
    ],
)
def test_runs(slots: list[int], expected: list[tuple[int, int]]) -> None:
    """runs() gives (start index, length) of each run of consecutive slot numbers."""
    assert runs(np.array(slots, dtype=np.int64)) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 200), unique=True).map(sorted))
def test_runs_property(slots: list[int]) -> None:
    """Runs tile the array in order, each is consecutive, and no two runs could be joined."""
    arr = np.array(slots, dtype=np.int64)
    out = runs(arr)
    assert sum(length for _, length in out) == len(slots)
    pos = 0
    for start, length in out:
        assert start == pos and length >= 1
        assert slots[start : start + length] == list(range(slots[start], slots[start] + length))
        pos += length
    for (s1, l1), (s2, _) in itertools.pairwise(out):
        assert slots[s1 + l1 - 1] + 1 != slots[s2]


# ---- the file -----------------------------------------------------------------------------


def test_file_created_sparse_with_mode_0600(swap: SwapFile) -> None:
    """The swap file has one page per slot and mode 0600."""
    st_ = swap.path.stat()
    assert st_.st_size == SLOTS * PAGE_SIZE
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert swap.slots == SLOTS


def test_size_rounded_down_to_pages(tmp_path: Path) -> None:
    """A size that is not a multiple of 4 KiB yields whole slots only."""
    sf = SwapFile(tmp_path / "s", 3 * PAGE_SIZE + 100)
    try:
        assert sf.slots == 3
        assert sf.path.stat().st_size == 3 * PAGE_SIZE
    finally:
        sf.close()


def test_smaller_than_a_page(tmp_path: Path) -> None:
    """A swap size below one page raises and creates no file."""
    with pytest.raises(VMMemError):
        SwapFile(tmp_path / "s", PAGE_SIZE - 1)
    assert not (tmp_path / "s").exists()


def test_close_removes_file(swap: SwapFile) -> None:
    """close() closes the descriptor and unlinks the file."""
    swap.close()
    assert not swap.path.exists()


# ---- slots --------------------------------------------------------------------------------


def test_allocate_lowest_first(swap: SwapFile) -> None:
    """A fresh file hands out consecutive slots, lowest first."""
    assert swap.allocate(3).tolist() == [0, 1, 2]
    assert swap.allocate(2).tolist() == [3, 4]
    assert swap.used == 5 and swap.free == SLOTS - 5
    assert swap.in_use[:5].all() and not swap.in_use[5:].any()


def test_allocate_more_than_free(swap: SwapFile) -> None:
    """Asking for more slots than are free returns the ones left, then none."""
    swap.allocate(SLOTS - 2)
    assert swap.allocate(5).tolist() == [SLOTS - 2, SLOTS - 1]
    assert swap.allocate(1).tolist() == []
    assert swap.free == 0


def test_allocate_zero(swap: SwapFile) -> None:
    """Allocating zero slots returns an empty array and changes nothing."""
    assert len(swap.allocate(0)) == 0
    assert swap.free == SLOTS


def test_release_and_reuse(swap: SwapFile) -> None:
    """Released slots are free again and handed out before untouched ones."""
    got = swap.allocate(6)
    swap.release(got[[1, 4]])
    assert swap.used == 4
    assert not swap.in_use[[1, 4]].any()
    assert sorted(swap.allocate(2).tolist()) == [1, 4]


def test_release_empty(swap: SwapFile) -> None:
    """Releasing nothing is a no-op."""
    swap.release(np.empty(0, np.int64))
    assert swap.free == SLOTS


def test_double_release_raises(swap: SwapFile) -> None:
    """Releasing a slot that is not in use raises and changes nothing."""
    got = swap.allocate(4)
    swap.release(got[:1])
    with pytest.raises(VMMemError):
        swap.release(got[:2])
    assert swap.used == 3 and swap.in_use[got[1]]


def test_duplicate_in_one_release_raises(swap: SwapFile) -> None:
    """The same slot twice in one release raises."""
    got = swap.allocate(2)
    with pytest.raises(VMMemError):
        swap.release(np.array([got[0], got[0]]))
    assert swap.used == 2


def test_release_never_allocated_raises(swap: SwapFile) -> None:
    """Releasing a slot never handed out raises."""
    with pytest.raises(VMMemError):
        swap.release(np.array([7]))


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=30))
def test_slot_accounting_property(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[bool, int]]
) -> None:
    """Random allocate/release sequences never hand out a slot twice; counts stay exact."""
    sf = SwapFile(tmp_path_factory.mktemp("sw") / "s", SLOTS * PAGE_SIZE)
    try:
        held: list[int] = []
        for alloc, n in ops:
            if alloc:
                got = sf.allocate(n).tolist()
                assert len(got) == min(n, SLOTS - len(held))
                assert not set(got) & set(held)
                held += got
            elif held:
                out, held = held[: n % (len(held) + 1)], held[n % (len(held) + 1) :]
                sf.release(np.array(out, dtype=np.int64))
            assert sf.used == len(held) == int(sf.in_use.sum())
            assert sf.free == SLOTS - len(held)
    finally:
        sf.close()


# ---- I/O ----------------------------------------------------------------------------------


def test_write_read_roundtrip(swap: SwapFile) -> None:
    """Pages written to slots in any order read back byte for byte, in any order."""
    slots = np.array([9, 1, 2, 3, 20, 0], dtype=np.int64)
    data = pages(len(slots))
    swap.write_pages(slots, data)
    assert np.array_equal(swap.read_pages(slots), data)
    back = slots[::-1].copy()
    assert np.array_equal(swap.read_pages(back), data[::-1])
    assert np.array_equal(swap.read_pages(np.array([2], np.int64))[0], data[2])


def test_write_lands_at_slot_offsets(swap: SwapFile) -> None:
    """Slot s occupies bytes s*4096 .. (s+1)*4096 of the file."""
    slots = swap.allocate(4)[[3, 0]]  # slots 3 and 0, unsorted
    data = pages(2, seed=5)
    swap.write_pages(slots, data)
    raw = swap.path.read_bytes()
    assert raw[3 * PAGE_SIZE : 4 * PAGE_SIZE] == data[0].tobytes()
    assert raw[0:PAGE_SIZE] == data[1].tobytes()
    assert raw[PAGE_SIZE : 3 * PAGE_SIZE] == bytes(2 * PAGE_SIZE)


def test_write_from_a_gathered_view(swap: SwapFile) -> None:
    """Data gathered from a larger frame array (as the swap service does) is written intact."""
    frames = pages(16, seed=2)
    picked = np.array([15, 3, 8], dtype=np.int64)
    slots = swap.allocate(3)
    swap.write_pages(slots, frames[picked])
    assert np.array_equal(swap.read_pages(slots), frames[picked])


def flip_in_file(swap: SwapFile, slot: int, offset: int, byte: int) -> None:
    """Write ``byte`` at ``offset`` of ``slot`` in the file, behind the SwapFile's back."""
    fd = os.open(swap.path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([int(byte)]), slot * PAGE_SIZE + offset)
    finally:
        os.close(fd)


def test_checksum_mismatch_detected(swap: SwapFile) -> None:
    """A page changed in the file behind the SwapFile's back raises SwapChecksumError on read."""
    slots = swap.allocate(3)
    data = pages(3, seed=3)
    swap.write_pages(slots, data)
    flip_in_file(swap, int(slots[1]), 100, data[1, 100] ^ 1)
    with pytest.raises(SwapChecksumError, match=f"slot {int(slots[1])}"):
        swap.read_pages(slots)
    # The intact pages still read back.
    assert np.array_equal(swap.read_pages(slots[[0, 2]]), data[[0, 2]])


def test_checksum_mismatch_in_a_reordered_read_names_the_slot(swap: SwapFile) -> None:
    """Reads of slots out of order check each page against its own slot's checksum."""
    slots = np.array([7, 2, 5], dtype=np.int64)
    data = pages(3, seed=4)
    swap.write_pages(slots, data)
    swap.checksum[5] ^= np.uint64(1)
    with pytest.raises(SwapChecksumError, match="slot 5:"):
        swap.read_pages(np.array([7, 5, 2], dtype=np.int64))
    assert np.array_equal(swap.read_pages(np.array([7, 2], dtype=np.int64)), data[[0, 1]])


@pytest.mark.timeout(20)
def test_submitted_writes_and_their_checksums_run_on_two_threads_in_order(
    swap: SwapFile,
) -> None:
    """``submit_write`` writes the frames straight from memory one batch at a time in
    submission order on the writer thread, and takes each batch's checksums after its write,
    in the same order, on the hasher thread; each batch reads back exactly."""
    import threading

    memory = pages(64, seed=7)
    seen: list[tuple[str, str, int]] = []
    write_only, checksum_written = swap._write_only, swap._checksum_written

    def spy_write(mem: np.ndarray, frames: np.ndarray, slots: np.ndarray) -> Any:
        seen.append(("write", threading.current_thread().name, int(slots[0])))
        return write_only(mem, frames, slots)

    def spy_checksum(mem: np.ndarray, frames: np.ndarray, slots: np.ndarray, *rest: Any) -> None:
        seen.append(("checksum", threading.current_thread().name, int(slots[0])))
        checksum_written(mem, frames, slots, *rest)

    swap._write_only = spy_write  # type: ignore[method-assign]
    swap._checksum_written = spy_checksum  # type: ignore[method-assign]
    batches = [np.array(f, dtype=np.int64) for f in ([40, 3, 9], [1], [63, 62, 0, 5], [8, 7])]
    slot_lists = [swap.allocate(len(f)) for f in batches]
    futures = [swap.submit_write(memory, f, s) for f, s in zip(batches, slot_lists, strict=True)]
    for fut in futures:
        fut.result(timeout=10)
    firsts = [int(s[0]) for s in slot_lists]
    for stage, thread in (("write", "vmmem-swap-writer"), ("checksum", "vmmem-swap-hasher")):
        ours = [(name, first) for what, name, first in seen if what == stage]
        assert [first for _, first in ours] == firsts, stage
        assert len({name for name, _ in ours}) == 1 and ours[0][0].startswith(thread), ours
    at = {(what, first): i for i, (what, _, first) in enumerate(seen)}
    assert all(at["checksum", first] > at["write", first] for first in firsts)
    for f, s in zip(batches, slot_lists, strict=True):
        assert np.array_equal(swap.read_pages(s), memory[f])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("slow", ["write", "checksums"])
def test_close_waits_for_the_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """Closing the file lets a submitted write finish first, and its checksums after it: it
    never lands on a closed (or reused) file descriptor, nor loses its checksums."""
    sf = SwapFile(tmp_path / "swap", SLOTS * PAGE_SIZE)
    memory = pages(4, seed=8)
    if slow == "write":
        sf.write_delay = 0.3
    else:
        digests = swapfile.frame_digests

        def slow_digests(flat: memoryview, frames: np.ndarray) -> np.ndarray:
            time.sleep(0.3)
            return digests(flat, frames)

        monkeypatch.setattr(swapfile, "frame_digests", slow_digests)
    slots = sf.allocate(4)
    fut = sf.submit_write(memory, np.arange(4, dtype=np.int64), slots)
    sf.close(unlink=False)
    assert fut.done()
    assert fut.exception() is None
    assert (tmp_path / "swap").read_bytes()[: 4 * PAGE_SIZE] == memory.tobytes()
    want = [xxhash.xxh3_64_intdigest(memory[i].tobytes()) for i in range(4)]
    assert sf.checksum[slots].tolist() == want


def test_released_slot_is_not_readable(swap: SwapFile) -> None:
    """After release the slot's checksum is cleared, so a stale read is detected."""
    slots = swap.allocate(1)
    swap.write_pages(slots, pages(1))
    swap.release(slots)
    with pytest.raises(SwapChecksumError):
        swap.read_pages(slots)


def test_rewrite_updates_checksum(swap: SwapFile) -> None:
    """Writing a slot again replaces both its bytes and its checksum."""
    slots = swap.allocate(1)
    swap.write_pages(slots, pages(1, seed=1))
    second = pages(1, seed=2)
    swap.write_pages(slots, second)
    assert np.array_equal(swap.read_pages(slots), second)


def test_checksum_error_is_a_vmmem_error() -> None:
    """SwapChecksumError belongs to the project's error hierarchy."""
    assert issubclass(SwapChecksumError, VMMemError)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_fail_next_write(swap: SwapFile, code: int) -> None:
    """fail_next_write makes the next write raise OSError(errno) once, writing nothing."""
    slots = swap.allocate(2)
    data = pages(2)
    swap.fail_next_write = code
    with pytest.raises(OSError) as info:
        swap.write_pages(slots, data)
    assert info.value.errno == code
    assert swap.fail_next_write is None
    assert swap.path.read_bytes() == bytes(SLOTS * PAGE_SIZE)
    assert not swap.checksum[slots].any()
    swap.write_pages(slots, data)  # one-shot: the next write succeeds
    assert np.array_equal(swap.read_pages(slots), data)


def test_nowait_read_serves_cached_pages_and_never_waits(swap: SwapFile) -> None:
    """read_pages(nowait=True) returns cached pages intact, and None where the disk is needed."""
    slots = swap.allocate(8)
    data = pages(8, seed=9)
    swap.write_pages(slots, data)
    cached = swap.read_pages(slots, nowait=True)  # just written: in the page cache
    assert cached is not None and np.array_equal(cached, data)
    os.fsync(swap.fd)
    os.posix_fadvise(swap.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    # Evicted (ext4, xfs) or not (tmpfs), and the kernel may read ahead meanwhile: whatever
    # the cache holds, a nowait read gives the right bytes or None, never wrong bytes.
    got = swap.read_pages(slots, nowait=True)
    assert got is None or np.array_equal(got, data)
    blocking = swap.read_pages(slots)
    assert blocking is not None and np.array_equal(blocking, data)


def test_a_swap_file_in_use_is_neither_truncated_nor_shared(swap: SwapFile) -> None:
    """A second SwapFile on a path another one holds fails clearly and leaves its data alone."""
    slots = swap.allocate(2)
    data = pages(2, seed=4)
    swap.write_pages(slots, data)
    with pytest.raises(VMMemError, match="in use by another daemon"):
        SwapFile(swap.path, 16 * PAGE_SIZE)
    assert swap.path.exists()
    back = swap.read_pages(slots)
    assert back is not None and np.array_equal(back, data)


def test_read_into_fills_the_given_frames_and_checks_each(swap: SwapFile) -> None:
    """``read_into`` reads each slot straight into its frame (slots in any order, runs and
    gaps), leaves other frames alone, and names a corrupt slot."""
    slots = np.array([9, 1, 2, 3, 20, 0], dtype=np.int64)
    data = pages(len(slots), seed=9)
    swap.write_pages(slots, data)
    memory = np.full((16, PAGE_SIZE), 0xEE, dtype=np.uint8)
    frames = np.array([7, 3, 12, 0, 5, 9], dtype=np.int64)
    assert swap.read_into(slots, memory, frames)
    assert np.array_equal(memory[frames], data)
    untouched = np.setdiff1d(np.arange(16), frames)
    assert (memory[untouched] == 0xEE).all()
    assert swap.read_into(slots, memory, frames, nowait=True)  # cached: no wait needed
    swap.checksum[3] ^= np.uint64(1)
    with pytest.raises(SwapChecksumError, match="slot 3:"):
        swap.read_into(slots, memory, frames)


def test_read_into_checks_every_page_of_an_ascending_run(swap: SwapFile) -> None:
    """Ascending slots into scattered frames (a swap-in with read-ahead): each page lands in
    its own frame, and a page changed on disk in the middle of the run is named by its slot,
    on the page-cache path (``nowait``) as on the blocking one."""
    slots = swap.allocate(8)
    data = pages(8, seed=12)
    swap.write_pages(slots, data)
    memory = np.zeros((32, PAGE_SIZE), dtype=np.uint8)
    frames = np.array([30, 2, 17, 5, 6, 7, 21, 0], dtype=np.int64)
    assert swap.read_into(slots, memory, frames, nowait=True)
    assert np.array_equal(memory[frames], data)
    fd = os.open(swap.path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[5, 4000] ^ 0x10]), int(slots[5]) * PAGE_SIZE + 4000)
    finally:
        os.close(fd)
    for nowait in (True, False):
        with pytest.raises(SwapChecksumError, match=f"slot {int(slots[5])}:"):
            swap.read_into(slots, memory, frames, nowait=nowait)


def test_read_into_a_run_longer_than_iov_max(tmp_path: Path) -> None:
    """A run of consecutive slots into more scattered frames than one ``preadv`` takes
    iovecs (Linux: 1024) is read in several calls, every page in its frame."""
    n = 1100
    sf = SwapFile(tmp_path / "swap", n * PAGE_SIZE)
    try:
        slots = sf.allocate(n)
        data = np.random.default_rng(5).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
        sf.write_pages(slots, data)
        memory = np.zeros((2 * n, PAGE_SIZE), dtype=np.uint8)
        frames = np.arange(2 * n - 1, -1, -2, dtype=np.int64)  # every other frame, descending
        assert sf.read_into(slots, memory, frames)
        assert np.array_equal(memory[frames], data)
    finally:
        sf.close()


# ---- writes straight from machine memory --------------------------------------------------


def _file_page(swap: SwapFile, slot: int) -> bytes:
    return os.pread(swap.fd, PAGE_SIZE, slot * PAGE_SIZE)


def test_write_frames_writes_exactly_the_frames_bytes(swap: SwapFile) -> None:
    """``write_frames`` puts ``memory[frames[i]]`` at slot ``slots[i]`` byte for byte (runs of
    consecutive frames and slots, gaps, any order), with each page's xxh3 as its checksum,
    leaves other slots and the memory untouched."""
    memory = pages(64, seed=11)
    before = memory.copy()
    frames = np.array([10, 11, 12, 40, 5, 4, 63, 0], dtype=np.int64)
    slots = np.array([3, 4, 5, 6, 20, 21, 1, 9], dtype=np.int64)
    swap.write_frames(memory, frames, slots)
    for f, s in zip(frames.tolist(), slots.tolist(), strict=True):
        assert _file_page(swap, s) == memory[f].tobytes(), (f, s)
        assert int(swap.checksum[s]) == xxhash.xxh3_64_intdigest(memory[f].tobytes())
    others = np.setdiff1d(np.arange(SLOTS), slots)
    assert all(_file_page(swap, s) == bytes(PAGE_SIZE) for s in others.tolist())
    assert not swap.checksum[others].any()
    assert np.array_equal(memory, before)
    assert np.array_equal(swap.read_pages(slots), memory[frames])


@pytest.mark.parametrize("n", [0, 1, HASH_CHUNK, 3 * HASH_CHUNK + 5])
def test_frame_digests_in_chunks_are_each_pages_xxh3(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksums, taken ``HASH_CHUNK`` pages between two GIL releases, are each page's
    xxh3 in the frames' order, over chunk edges and a last partial chunk; the GIL is let go
    once between two chunks."""
    memory = pages(2 * n + 1, seed=16)
    frames = np.arange(2 * n, -1, -2, dtype=np.int64)[:n].copy()  # scattered, descending
    yields = []
    monkeypatch.setattr(swapfile.os, "sched_yield", lambda: yields.append(1))
    got = frame_digests(memory.reshape(-1).data.cast("B"), frames)
    want = [xxhash.xxh3_64_intdigest(memory[f].tobytes()) for f in frames.tolist()]
    assert got.dtype == np.uint64 and got.tolist() == want
    assert len(yields) == max(0, -(-n // HASH_CHUNK) - 1)


@pytest.mark.timeout(30)
def test_write_frames_past_iov_max_iovecs(tmp_path: Path) -> None:
    """A run of more scattered frames than one ``pwritev`` takes (IOV_MAX iovecs) is written
    in several calls, each at its own offset."""
    n = IOV_MAX + 100
    sf = SwapFile(tmp_path / "swap", (n + 8) * PAGE_SIZE)
    try:
        memory = pages(2 * n, seed=12)
        frames = np.arange(0, 2 * n, 2, dtype=np.int64)[::-1].copy()  # no two consecutive
        slots = sf.allocate(n)
        sf.write_frames(memory, frames, slots)
        assert np.array_equal(sf.read_pages(slots), memory[frames])
        raw = np.frombuffer(sf.path.read_bytes(), np.uint8).reshape(-1, PAGE_SIZE)
        assert np.array_equal(raw[slots], memory[frames])
    finally:
        sf.close()


def test_release_one_frees_a_slot_once(swap: SwapFile) -> None:
    """``release_one`` frees one slot as ``release`` does (checksum cleared, handed out
    again); a second release of it, or of a slot out of range, raises."""
    slots = swap.allocate(3)
    swap.write_pages(slots, pages(3, seed=2))
    swap.release_one(int(slots[1]))
    assert swap.free == SLOTS - 2 and not swap.in_use[slots[1]]
    assert swap.checksum[slots[1]] == 0 and swap.checksum[slots[0]] != 0
    with pytest.raises(VMMemError, match="released twice"):
        swap.release_one(int(slots[1]))
    for bad in (-1, SLOTS):
        with pytest.raises(VMMemError, match="released twice"):
            swap.release_one(bad)
    assert swap.allocate(1).tolist() == [int(slots[1])]


def test_a_slot_corrupted_after_write_frames_is_caught(swap: SwapFile) -> None:
    """A page written from frames, changed in the file afterwards, fails its read with a
    SwapChecksumError naming its slot; the other pages still read back exactly."""
    memory = pages(16, seed=13)
    frames = np.array([2, 3, 9, 14], dtype=np.int64)
    slots = swap.allocate(4)
    swap.write_frames(memory, frames, slots)
    flip_in_file(swap, int(slots[2]), 7, memory[9, 7] ^ 0x80)
    with pytest.raises(SwapChecksumError, match=f"slot {int(slots[2])}:"):
        swap.read_pages(slots)
    out = np.zeros((16, PAGE_SIZE), dtype=np.uint8)
    with pytest.raises(SwapChecksumError):
        swap.read_into(slots[2:3], out, np.array([0], dtype=np.int64))
    keep = [0, 1, 3]
    assert np.array_equal(swap.read_pages(slots[keep]), memory[frames[keep]])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("submitted", [False, True], ids=["write_frames", "submit_write"])
def test_a_frame_changed_during_its_write_never_reads_back_as_valid(
    swap: SwapFile, monkeypatch: pytest.MonkeyPatch, submitted: bool
) -> None:
    """The checksums come from the frames after the write: a frame that changes once its
    bytes are in the file (a cancelled swap-out's page, written by the guest again) leaves
    a slot whose read fails, never one that passes with bytes nobody checked. Also through
    ``submit_write``, whose hasher thread takes them: it waits for the (slowed) write."""
    memory = pages(8, seed=14)
    real = swapfile.os.pwritev

    def write_then_touch(fd: int, bufs: list[memoryview], offset: int) -> int:
        done = real(fd, bufs, offset)
        memory[6, 0] ^= 0xFF  # the guest writes its page right after the write
        return done

    monkeypatch.setattr(swapfile.os, "pwritev", write_then_touch)
    slots = swap.allocate(1)
    if submitted:
        swap.write_delay = 0.2  # a hasher that did not wait would hash before the write
        swap.submit_write(memory, np.array([6], dtype=np.int64), slots).result(timeout=10)
    else:
        swap.write_frames(memory, np.array([6], dtype=np.int64), slots)
    with pytest.raises(SwapChecksumError):
        swap.read_pages(slots)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("submitted", [False, True], ids=["write_frames", "submit_write"])
def test_a_short_pwritev_keeps_exactly_the_pages_written(
    swap: SwapFile, monkeypatch: pytest.MonkeyPatch, submitted: bool
) -> None:
    """A write that stops part way (the disk full after some pages) raises SwapWriteError
    naming exactly the pages that reached the file; those keep their checksums and read
    back, the others have none. Through ``submit_write`` its future raises the same."""
    memory = pages(16, seed=15)
    real = swapfile.os.pwritev

    def short(fd: int, bufs: list[memoryview], offset: int) -> int:
        head = b"".join(bytes(b) for b in bufs)[: 2 * PAGE_SIZE + 100]  # two pages and a bit
        return real(fd, [head], offset)

    monkeypatch.setattr(swapfile.os, "pwritev", short)
    frames = np.array([4, 5, 6, 7, 8], dtype=np.int64)
    slots = np.array([12, 10, 11, 13, 14], dtype=np.int64)  # slot order: frames 5, 6, 4, 7, 8
    with pytest.raises(SwapWriteError) as info:
        if submitted:
            swap.submit_write(memory, frames, slots).result(timeout=10)
        else:
            swap.write_frames(memory, frames, slots)
    assert info.value.errno == errno.ENOSPC
    assert info.value.written.tolist() == [False, True, True, False, False]
    monkeypatch.undo()
    assert np.array_equal(swap.read_pages(slots[[1, 2]]), memory[[5, 6]])
    assert not swap.checksum[slots[[0, 3, 4]]].any()
