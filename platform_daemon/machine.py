"""Machine memory: the shared frames file, the allocator and the frame → owner reverse map."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PAGE_SIZE
from shared.errors import VMMemError
from shared.shm import MappedFile, file_ident, frames_view, open_mapped, open_read_only

from .allocator import FrameAllocator, Frames

#: owner_vm value of frames the host itself holds (the shared zero frames).
HOST_OWNER = -2
_ZERO_PAGE = bytes(PAGE_SIZE)


#: madvise advice that backs a whole mapping with memory now (Linux >= 5.14).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def populate(mapped: MappedFile) -> None:
    """Back every frame with real memory up front, as a host's RAM is.

    Why: otherwise the first touch of each frame pays a kernel page fault (and on a VM with
    free-page reporting, a hypervisor one), a cost real machine memory does not have and
    that would land inside the fault path's first-touch latency.
    """
    try:
        mapped.mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):  # older kernel: touch one byte per page instead
        view = np.frombuffer(mapped.mm, dtype=np.uint8)
        view[::PAGE_SIZE] = 0


def create_reserved(path: Path, size: int) -> MappedFile:
    """Create machine memory at ``path`` with all of its space reserved now.

    Why reserve: a file on tmpfs that outgrows the free space does not fail a write, it kills
    the process that touches the missing page with SIGBUS, possibly much later. Reserving up
    front turns that into a clear error at startup.
    """
    free = _free_bytes(path.parent)
    if size > free:
        raise VMMemError(
            f"machine memory of {size} bytes does not fit in {path.parent} "
            f"({free} bytes free): lower --host-memory or choose another --mem-dir"
        )
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise VMMemError(
                f"cannot reserve {size} bytes of machine memory in {path.parent}: {exc.strerror}"
            ) from None
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ident = file_ident(fd)
    finally:
        os.close(fd)
    return MappedFile(path, mm, ident)


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_fits_ram(size: int, allowed: bool) -> None:
    """Machine memory beyond the machine's RAM only on request: it would be swapped by the
    host kernel, and every figure measured on it would be the host's swap, not VMMem's."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > ram and not allowed:
        raise VMMemError(
            f"--host-memory of {size} bytes is more than this machine's RAM ({ram} bytes); "
            "pass --allow-beyond-ram to run anyway"
        )


class MachineMemory:
    """``host_pages`` frames of real bytes in one shared file, split into NUMA nodes.

    A fresh daemon creates the file (space reserved) and its zero frames. A daemon taking
    over after a crash passes ``existing=True``, the recovered allocator state in
    ``frame_state`` and the zero frames it had: the guests' bytes are where they were.
    """

    def __init__(
        self,
        path: Path,
        host_pages: int,
        nodes: int,
        prefault: bool = True,
        *,
        frame_state: npt.NDArray[np.uint8] | None = None,
        failing: npt.NDArray[np.bool_] | None = None,
        existing: bool = False,
        zero_frames: list[int] | None = None,
    ) -> None:
        self.path = path
        self.host_pages = host_pages
        size = host_pages * PAGE_SIZE
        self.file: MappedFile = open_mapped(path, size) if existing else create_reserved(path, size)
        self.frames = frames_view(self.file)
        # The same frames through a read-only mapping: the source of page moves' gathers
        # (``services/page_move.copy_frames``), read-only as an array too. Its page tables
        # fill on first read only.
        try:
            self._source_file = open_read_only(path, size, same_as=self.file)
        except BaseException:
            del self.frames
            self.file.close()
            raise
        self.source = frames_view(self._source_file)
        if prefault:
            populate(self.file)
        self.allocator = FrameAllocator(host_pages, nodes, frame_state)
        #: Frames the VMs may use (``vmmem-ctl set-host-limit``); at most ``host_pages``.
        self.limit_pages = host_pages
        # Reverse map for retire and moves: which VM and BPN a used frame backs (-1: none).
        self.owner_vm = np.full(host_pages, -1, dtype=np.int32)
        self.owner_bpn = np.full(host_pages, NO_FRAME, dtype=np.int64)
        # Frames marked failing while in use: retired instead of freed when their page leaves.
        self.failing = np.zeros(host_pages, dtype=bool) if failing is None else failing
        self.freed_listeners: list[Callable[[], None]] = []
        # One shared read-only zero frame per node: reads of untouched pages cost no memory.
        if zero_frames is None:
            zero_frames = [int(self.allocate_zeroed(1, n)[0]) for n in range(nodes)]
        self.zero_frame = zero_frames
        self.owner_vm[self.zero_frame] = HOST_OWNER
        self.zero_frames = frozenset(self.zero_frame)
        self._copier: Executor | None = None

    @property
    def copier(self) -> Executor:
        """The one thread that copies frames off the event loop (``page_move.copy_off_loop``),
        started on first use. One: copies are memory-bound, and one core is the loop's."""
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmmem-copier")
        return self._copier

    @copier.setter
    def copier(self, executor: Executor) -> None:
        """Another executor (the tests' ``HeldCopies`` decide when a copy runs)."""
        self._copier = executor

    @property
    def nodes(self) -> int:
        return self.allocator.nodes

    def available(self) -> int:
        """Frames still allocatable under the host limit."""
        alloc = self.allocator
        return max(0, min(alloc.free, self.limit_pages - alloc.used))

    def can_allocate_one(self) -> bool:
        """``available() >= 1``, in the fewest steps (asked on every write fault)."""
        alloc = self.allocator
        return alloc.free > 0 and alloc.used < self.limit_pages

    def allocate_zeroed(self, n: int, node: int) -> Frames:
        """``n`` frames filled with zeros (frames are recycled between VMs)."""
        frames = self.allocator.allocate(n, node)
        if len(frames) == 1:
            self.frames[int(frames[0])] = 0  # a view: no fancy-index machinery for one frame
        elif len(frames):
            self.frames[frames] = 0
        return frames

    def allocate_zeroed_one(self, node: int) -> int:
        """``allocate_zeroed(1, node)`` as an int (the fault path's case: no arrays)."""
        mpn = self.allocator.allocate_one(node)
        # The mmap's own slice store: one memcpy, without NumPy's indexing of a row view.
        at = mpn * PAGE_SIZE
        self.file.mm[at : at + PAGE_SIZE] = _ZERO_PAGE
        return mpn

    def set_owner(self, frames: npt.NDArray[Any], vm_id: int, bpns: npt.NDArray[Any]) -> None:
        self.owner_vm[frames] = vm_id
        self.owner_bpn[frames] = bpns

    def release_or_retire(self, frames: npt.NDArray[Any]) -> None:
        """Free frames and forget their owners; frames marked failing are retired instead."""
        if len(frames) == 0:
            return
        frames = np.asarray(frames, dtype=np.int64)
        self.owner_vm[frames] = -1
        self.owner_bpn[frames] = NO_FRAME
        bad = self.failing[frames]
        if bad.any():
            self.allocator.retire_used(frames[bad])
            self.failing[frames[bad]] = False
            frames = frames[~bad]
        self.allocator.release(frames)
        for listener in self.freed_listeners:
            listener()

    def is_zero_frame(self, mpn: int) -> bool:
        return mpn in self.zero_frames

    def close(self, unlink: bool = True) -> None:
        if self._copier is not None:
            # A copy still running (its task was cancelled at shutdown) writes through these
            # mappings: it finishes before they go.
            self._copier.shutdown(wait=True)
            self._copier = None
        del self.frames, self.source
        self.file.close()
        self._source_file.close()
        if unlink:
            self.file.unlink()
