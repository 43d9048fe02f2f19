"""Shared-memory files: create or open a file and map it as NumPy arrays.

Both daemons map the machine-memory file as a ``(host_pages, 4096) uint8`` array and the
per-VM control region as bytes. Files are created with mode 0600: only the daemons' user
may read guest memory.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .constants import PAGE_SIZE
from .errors import VMMemError


class MappingInUseError(VMMemError):
    """A mapping could not be closed: a view of it is still alive somewhere."""


@dataclass
class MappedFile:
    """An open, mapped file; ``close()`` unmaps it (``unlink()`` also removes the name)."""

    path: Path
    mm: mmap.mmap
    #: ``(st_dev, st_ino)`` of the file mapped, when known: a second mapping by path checks
    #: it maps the same file (the name may have been replaced meanwhile).
    ident: tuple[int, int] | None = None

    def close(self, *, strict: bool = False) -> bool:
        """Unmap now, and release the descriptor the mapping keeps; True when done.

        While a NumPy view or memoryview of the mapping lives, it cannot be unmapped. With
        ``strict`` that raises MappingInUseError naming the file: a mapping that must go now
        (a closed VM's control region) would otherwise stay, with the descriptor of its
        deleted file, until the garbage collector frees the view. Without ``strict`` (a
        mapping that lives as long as its process) it returns False and the mapping goes
        with the last view.
        """
        try:
            self.mm.close()
        except BufferError:
            if strict:
                raise MappingInUseError(
                    f"{self.path}: cannot unmap, a view of the mapping is still in use"
                ) from None
            return False
        return True

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def create_mapped(path: Path, size: int) -> MappedFile:
    """Create (or truncate) ``path`` with mode 0600, size it, and map it read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ident = file_ident(fd)
    finally:
        os.close(fd)
    return MappedFile(path, mm, ident)


def open_mapped(path: Path, size: int | None = None, *, read_only: bool = False) -> MappedFile:
    """Map an existing file read-write (or ``read_only``); ``size`` (if given) must match
    the file."""
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        actual = os.fstat(fd).st_size
        if size is not None and actual != size:
            raise ValueError(f"{path}: {actual} bytes, expected {size}")
        prot = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
        mm = mmap.mmap(fd, actual, mmap.MAP_SHARED, prot)
        ident = file_ident(fd)
    finally:
        os.close(fd)
    return MappedFile(path, mm, ident)


def file_ident(fd: int) -> tuple[int, int]:
    """Which file ``fd`` is: its device and inode."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_read_only(path: Path, size: int, same_as: MappedFile) -> MappedFile:
    """A second, read-only mapping of the file ``same_as`` maps, ``size`` bytes, by its
    path; raises VMMemError if the path names another file now.

    The platform copies frames from this mapping into the read-write one: the two are the
    same memory, but NumPy, seeing two address ranges, gathers straight into the
    destination instead of through a temporary (it buffers a gather whose source and
    destination are views of one mapping, since they might overlap).
    """
    mapped = open_mapped(path, size, read_only=True)
    if same_as.ident is not None and mapped.ident != same_as.ident:
        mapped.close()
        raise VMMemError(f"{path} was replaced while the daemon mapped it")
    return mapped


def frames_view(mapped: MappedFile) -> npt.NDArray[np.uint8]:
    """The mapping as an array of 4 KiB frames."""
    pages = len(mapped.mm) // PAGE_SIZE
    return np.frombuffer(mapped.mm, dtype=np.uint8, count=pages * PAGE_SIZE).reshape(
        pages, PAGE_SIZE
    )
