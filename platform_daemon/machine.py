"""Machine memory: the shared frames file, the allocator and the frame → owner reverse map."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PAGE_SIZE
from shared.shm import MappedFile, create_mapped, frames_view

from .allocator import FrameAllocator, Frames

#: owner_vm value of frames the host itself holds (the shared zero frames).
HOST_OWNER = -2


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


class MachineMemory:
    """``host_pages`` frames of real bytes in one shared file, split into NUMA nodes."""

    def __init__(self, path: Path, host_pages: int, nodes: int, prefault: bool = True) -> None:
        self.path = path
        self.host_pages = host_pages
        self.file: MappedFile = create_mapped(path, host_pages * PAGE_SIZE)
        self.frames = frames_view(self.file)
        if prefault:
            populate(self.file)
        self.allocator = FrameAllocator(host_pages, nodes)
        #: Frames the VMs may use (``vmmem-ctl set-host-limit``); at most ``host_pages``.
        self.limit_pages = host_pages
        # Reverse map for retire and moves: which VM and BPN a used frame backs (-1: none).
        self.owner_vm = np.full(host_pages, -1, dtype=np.int32)
        self.owner_bpn = np.full(host_pages, NO_FRAME, dtype=np.int64)
        # Frames marked failing while in use: retired instead of freed when their page leaves.
        self.failing = np.zeros(host_pages, dtype=bool)
        self.freed_listeners: list[Callable[[], None]] = []
        # One shared read-only zero frame per node: reads of untouched pages cost no memory.
        self.zero_frame = [int(self.allocate_zeroed(1, n)[0]) for n in range(nodes)]
        self.owner_vm[self.zero_frame] = HOST_OWNER
        self.zero_frames = frozenset(self.zero_frame)

    @property
    def nodes(self) -> int:
        return self.allocator.nodes

    def available(self) -> int:
        """Frames still allocatable under the host limit."""
        alloc = self.allocator
        return max(0, min(alloc.free, self.limit_pages - alloc.used))

    def allocate_zeroed(self, n: int, node: int) -> Frames:
        """``n`` frames filled with zeros (frames are recycled between VMs)."""
        frames = self.allocator.allocate(n, node)
        if len(frames) == 1:
            self.frames[int(frames[0])] = 0  # a view: no fancy-index machinery for one frame
        elif len(frames):
            self.frames[frames] = 0
        return frames

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
        del self.frames
        self.file.close()
        if unlink:
            self.file.unlink()

    @staticmethod
    def default_path(mem_dir: Path) -> Path:
        return mem_dir / f"vmmem-{os.getpid()}-machine"
