"""The swap file: a slot allocator, batched writes and checked reads of 4 KiB pages.

Slots are handed out from a free stack (O(batch), never a scan), lowest first, so a batch
on a fresh file gets consecutive slots and is written with one ``pwritev`` per run, straight
from the frames. Every slot carries an xxh3-64 checksum of what was written; every read is
checked against it. The I/O methods are plain blocking functions: reads run in the event
loop's thread pool, writes on the file's own writer thread and their checksums on its hasher
thread (``submit_write``).
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.constants import PAGE_SIZE
from shared.distinct import has_repeats
from shared.errors import VMMemError

#: preadv flag: fail with EAGAIN instead of waiting for the disk (Linux >= 4.14).
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class SwapWriteError(OSError):
    """A batched write failed part way; ``written[i]`` says whether page i made it to disk."""

    def __init__(self, errno: int, message: str, written: npt.NDArray[np.bool_]) -> None:
        super().__init__(errno, message)
        self.written = written


class SwapChecksumError(VMMemError):
    """A page read back from swap does not match the checksum written with it."""


def runs(sorted_slots: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """(start index, length) of runs of consecutive slot numbers in a sorted array."""
    n = len(sorted_slots)
    if n == 0:
        return []
    if int(sorted_slots[-1]) - int(sorted_slots[0]) == n - 1:
        return [(0, n)]  # sorted, distinct and spanning n numbers: one run (the usual case)
    breaks = np.flatnonzero(np.diff(sorted_slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(sorted_slots)]))
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


#: Pages the hasher hashes between two moments it lets the GIL go (~20 µs of hashing).
HASH_CHUNK = 64


def frame_digests(flat: memoryview, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """xxh3-64 of page ``frames[i]`` of the flat byte view ``flat``.

    Slices of one memoryview: about 0.1 µs a page cheaper than a NumPy row view each, which
    leaves the hash itself (~0.2-0.3 µs for 4 KiB here) as nearly all of the cost. Under
    64 KiB, xxhash hashes without releasing the GIL, so a 4096-page batch would keep it for
    a millisecond in one stretch, and the writer thread, back from a ``pwritev``, and the
    event loop would wait that long (or the switch interval) for it. Every ``HASH_CHUNK``
    pages a ``sched_yield`` lets it go: a thread waiting for it takes it then. Measured
    alternately with a 1 GiB guest's swap-out: 803 against 612 k pages/s (medians of 8
    runs each, faster in 7 of the 8 pairs; docs/performance.md).
    """
    digest = xxhash.xxh3_64_intdigest
    out = np.empty(len(frames), np.uint64)
    offsets = (frames * PAGE_SIZE).tolist()
    for first in range(0, len(offsets), HASH_CHUNK):
        if first:
            os.sched_yield()  # releases the GIL for its system call
        chunk = offsets[first : first + HASH_CHUNK]
        out[first : first + len(chunk)] = np.fromiter(
            (digest(flat[o : o + PAGE_SIZE]) for o in chunk), np.uint64, len(chunk)
        )
    return out


#: Most iovecs one ``pwritev`` or ``preadv`` takes (Linux's UIO_MAXIOV).
IOV_MAX = 1024


def _pwritev_frames(fd: int, flat: memoryview, frames: npt.NDArray[np.int64], offset: int) -> int:
    """Write pages ``frames`` of ``flat`` to consecutive pages of ``fd`` from ``offset``, one
    ``pwritev`` per IOV_MAX iovecs, each iovec a run of consecutive frames; returns how many
    pages reached the file (fewer than ``len(frames)`` after a short write)."""
    breaks = np.flatnonzero(np.diff(frames) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = [*breaks.tolist(), len(frames)]
    first = frames[starts].tolist()
    bufs = [
        flat[f * PAGE_SIZE : (f + e - s) * PAGE_SIZE]
        for f, s, e in zip(first, starts, ends, strict=True)
    ]
    done = 0
    for i in range(0, len(bufs), IOV_MAX):
        chunk = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in chunk)
        nbytes = os.pwritev(fd, chunk, offset + done * PAGE_SIZE)
        done += nbytes // PAGE_SIZE
        if nbytes != want:
            break
    return done


class SwapFile:
    """A real file of ``size`` bytes cut into 4 KiB slots."""

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        checksum: npt.NDArray[np.uint64] | None = None,
        existing: bool = False,
    ) -> None:
        """``checksum``: an array to keep the slots' checksums in (a mapped state file).
        ``existing``: take over a swap file a crashed daemon left, contents kept; the slots
        in use are then given by ``adopt``."""
        self.path = path
        self.slots = size // PAGE_SIZE
        if self.slots < 1:
            raise VMMemError(f"swap size {size} is smaller than one page")
        # Locked before it is emptied: another daemon's live swap file is never truncated.
        self.fd = os.open(path, os.O_RDWR | (0 if existing else os.O_CREAT), 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise VMMemError(f"swap file {path} is in use by another daemon") from None
        if existing:
            actual = os.fstat(self.fd).st_size
            if actual != self.slots * PAGE_SIZE:
                os.close(self.fd)
                raise VMMemError(f"swap file {path} has {actual} bytes, expected {size}")
        else:
            # Sparse: blocks are allocated as slots are written, so a small filesystem fills
            # up for real (ENOSPC) instead of failing at startup.
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.slots * PAGE_SIZE)
        if checksum is None:
            checksum = np.zeros(self.slots, dtype=np.uint64)
        elif len(checksum) != self.slots:
            os.close(self.fd)
            raise VMMemError(f"{len(checksum)} swap checksums for {self.slots} slots")
        self.checksum = checksum
        self.in_use = np.zeros(self.slots, dtype=bool)
        self._stack = np.arange(self.slots - 1, -1, -1, dtype=np.int64)
        self._top = self.slots
        #: Test hook: an errno to raise from the next write (injected I/O errors).
        self.fail_next_write: int | None = None
        #: Test hook: seconds every write sleeps first (keeps swap-outs in flight longer).
        self.write_delay = 0.0
        # One writer thread: writes to one file serialise in the kernel anyway (the inode's
        # lock), so more threads only contend.
        self._writer: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._writer_lock = threading.Lock()

    def adopt(self, in_use: npt.NDArray[np.int64]) -> None:
        """After a crash: exactly ``in_use`` hold pages; every other slot is free."""
        self.in_use[:] = False
        self.in_use[in_use] = True
        free = np.flatnonzero(~self.in_use)
        self.checksum[free] = 0
        self._stack[: len(free)] = free[::-1]
        self._top = len(free)

    @property
    def used(self) -> int:
        return self.slots - self._top

    @property
    def free(self) -> int:
        return self._top

    def allocate(self, n: int) -> npt.NDArray[np.int64]:
        """Up to ``n`` free slots (fewer when the file is nearly full), in ascending order, so
        a batch is written from its pages as they are, with one ``pwrite`` per run."""
        take = min(n, self._top)
        out = np.sort(self._stack[self._top - take : self._top])
        self._top -= take
        self.in_use[out] = True
        return out

    def release(self, slots: npt.NDArray[Any]) -> None:
        """Return slots; releasing a slot not in use raises (a double free is a bug)."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) == 0:
            return
        if not self.in_use[slots].all() or has_repeats(slots):
            raise VMMemError("swap slot released twice")
        self.in_use[slots] = False
        self.checksum[slots] = 0
        self._stack[self._top : self._top + len(slots)] = slots
        self._top += len(slots)

    def release_one(self, slot: int) -> None:
        """``release`` of one slot with scalar reads and writes (a swap-in fault's own slot:
        NumPy costs about a microsecond per call on a one-element array)."""
        if not 0 <= slot < self.slots or not self.in_use.item(slot):
            raise VMMemError("swap slot released twice")
        self.in_use[slot] = False
        self.checksum[slot] = 0
        self._stack[self._top] = slot
        self._top += 1

    def write_pages(self, slots: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]) -> None:
        """Write ``data[i]`` to ``slots[i]`` and record checksums (blocking; run in a thread).

        ``write_frames`` with ``data`` as the memory; its errors.
        """
        data = np.ascontiguousarray(data)
        self.write_frames(data, np.arange(len(data), dtype=np.int64), slots)

    def write_frames(
        self,
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
    ) -> None:
        """Write ``memory[frames[i]]`` to ``slots[i]`` and record checksums (blocking).

        Straight from ``memory`` (the machine-memory mapping): one ``pwritev`` per run of
        consecutive slots, its iovecs the frames themselves (consecutive frames merged), so
        no 2 MiB gather copy per batch. The checksums are taken from the same frames after
        the write. The frames of a swap-out change only once a fault cancelled it (the
        guest has its frame back), and such a write is discarded when it lands; any other
        change between write and checksum fails the page's swap-in, never passes it.

        A failure part way (a full disk takes what fits, then says ENOSPC) raises
        SwapWriteError naming the pages that did reach the file, with their checksums kept.
        """
        written, error = self._write_only(memory, frames, slots)
        self._checksum_written(memory, frames, slots, written, error)

    def _write_only(
        self,
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
    ) -> tuple[npt.NDArray[np.bool_], OSError | None]:
        """The writes of ``write_frames``, no checksums: which pages reached the file, and
        the error that stopped the rest (None when all did)."""
        written = np.zeros(len(slots), dtype=bool)
        if self.write_delay:
            time.sleep(self.write_delay)
        if self.fail_next_write is not None:
            errno, self.fail_next_write = self.fail_next_write, None
            return written, OSError(errno, os.strerror(errno))
        flat = memory.reshape(-1).data.cast("B")
        order = np.argsort(slots, kind="stable")
        sorted_slots, sorted_frames = slots[order], frames[order]
        try:
            for start, length in runs(sorted_slots):
                offset = int(sorted_slots[start]) * PAGE_SIZE
                done = _pwritev_frames(self.fd, flat, sorted_frames[start : start + length], offset)
                written[order[start : start + done]] = True
                if done != length:
                    raise OSError(errno_mod.ENOSPC, f"short write of {done} pages to swap")
        except OSError as exc:
            return written, exc
        return written, None

    def _checksum_written(
        self,
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
        written: npt.NDArray[np.bool_],
        error: OSError | None,
    ) -> None:
        """Record the checksums of the pages that reached the file; SwapWriteError if some
        did not."""
        flat = memory.reshape(-1).data.cast("B")
        if error is None:
            self.checksum[slots] = frame_digests(flat, frames)
            return
        self.checksum[slots[written]] = frame_digests(flat, frames[written])
        raise SwapWriteError(error.errno or errno_mod.EIO, str(error), written)

    def submit_write(
        self,
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
    ) -> Future[None]:
        """``write_frames`` in two stages on two threads: the writes on the writer thread,
        then the checksums of what they wrote on the hasher thread.

        Each stage takes batches one at a time in submission order, so the event loop
        selects the next batch while this one is written, and batch N is hashed while
        batch N+1 is written: the kernel's copy (no GIL) runs beside the hashes (which keep
        the GIL, as xxhash does under 64 KiB) instead of after them. One writer: writes to
        one file serialise in the kernel anyway (the inode's lock). The returned future
        ends when both stages did; its errors are those of ``write_frames``.
        """
        with self._writer_lock:
            if self._writer is None or self._hasher is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="vmmem-swap-writer")
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="vmmem-swap-hasher")
            wrote = self._writer.submit(self._write_only, memory, frames, slots)
            return self._hasher.submit(self._checksum_after, wrote, memory, frames, slots)

    def _checksum_after(
        self,
        wrote: Future[tuple[npt.NDArray[np.bool_], OSError | None]],
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
    ) -> None:
        written, error = wrote.result()  # the writer's own failures (bugs) raise here
        self._checksum_written(memory, frames, slots, written, error)

    def read_pages(
        self, slots: npt.NDArray[np.int64], nowait: bool = False
    ) -> npt.NDArray[np.uint8] | None:
        """Read and verify the pages in ``slots``.

        ``read_into`` with the result as the memory: one ``preadv`` per run of consecutive
        slots, straight into the result. With ``nowait`` the reads use RWF_NOWAIT: pages in
        the page cache are read at once (a few µs, fine on the event loop), and None says
        some would need the disk — then the caller reads them in a thread instead.
        """
        out = np.empty((len(slots), PAGE_SIZE), dtype=np.uint8)
        frames = np.arange(len(slots), dtype=np.int64)  # page i of the result is "frame" i
        return out if self.read_into(slots, out, frames, nowait) else None

    def read_into(
        self,
        slots: npt.NDArray[np.int64],
        memory: npt.NDArray[np.uint8],
        frames: npt.NDArray[np.int64],
        nowait: bool = False,
    ) -> bool:
        """Read ``slots[i]`` straight into ``memory[frames[i]]`` and verify each page.

        One ``preadv`` per run of consecutive slots, its iovecs the frames themselves: no
        staging buffer and no second copy; the same page views then feed the checksums. False
        (``nowait``) when some page would need the disk; SwapChecksumError or OSError
        otherwise. Either way the frames' bytes are then undefined: the caller frees them.
        """
        n = len(slots)
        flat = memory.reshape(-1).data.cast("B")
        views = [flat[o : o + PAGE_SIZE] for o in (frames * PAGE_SIZE).tolist()]
        if n == 1 or bool((slots[1:] > slots[:-1]).all()):  # ascending: the usual case
            sorted_slots, ordered = slots, views
        else:
            order = np.argsort(slots, kind="stable")
            sorted_slots, ordered = slots[order], [views[i] for i in order.tolist()]
        flags = _RWF_NOWAIT if nowait else 0
        for start, length in runs(sorted_slots):
            for first in range(start, start + length, IOV_MAX):
                count = min(IOV_MAX, start + length - first)
                offset = int(sorted_slots[first]) * PAGE_SIZE
                try:
                    got = os.preadv(self.fd, ordered[first : first + count], offset, flags)
                except BlockingIOError:
                    return False
                if got != count * PAGE_SIZE:
                    if nowait:
                        return False
                    raise OSError(
                        errno_mod.EIO, f"short read of swap slots from {offset // PAGE_SIZE}"
                    )
        sums = np.fromiter(map(xxhash.xxh3_64_intdigest, views), np.uint64, n)
        bad = np.flatnonzero(sums != self.checksum[slots])
        if len(bad):
            raise SwapChecksumError(f"swap slot {int(slots[bad[0]])}: checksum mismatch on read")
        return True

    def close(self, unlink: bool = True) -> None:
        with self._writer_lock:
            # A write in progress finishes before the fd goes, and its checksums after it.
            for stage in (self._writer, self._hasher):
                if stage is not None:
                    stage.shutdown(wait=True)
            self._writer = self._hasher = None
        os.close(self.fd)
        if unlink:
            self.path.unlink(missing_ok=True)
