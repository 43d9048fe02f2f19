"""The per-VM p2m: BPN → frame, swap slot, state and in-flight op, as NumPy arrays.

A few bytes per guest page and never a Python object per page: every service selects,
filters and updates batches of BPNs with vectorised operations on these arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PageState

NO_OP = 0xFF
NO_SLOT = -1

#: p2m flag: the frame is shared read-only (a write must copy it first).
FLAG_SHARED = 1
#: p2m flag: page sharing merged this page into its shared frame (with FLAG_SHARED). Tells
#: merged pages from untouched ones that a read mapped to the zero frame.
FLAG_MERGED = 2


class P2M:
    """Mapping state of every page of one VM.

    The arrays live in process memory, or in ``buffer`` (a p2m file mapped by
    ``persist.P2MFile``, so that a daemon started after a crash finds them).
    """

    #: (name, dtype) of each array, in buffer order: widest first, so all stay aligned.
    #: 15 bytes per guest page. Frames and swap slots are int32 (NO_FRAME / NO_SLOT: -1):
    #: the configuration refuses a host of more than MAX_P2M_NUMBERS frames or swap slots
    #: (8 TiB each, ``shared.config``), so every value stored here fits, and the int64
    #: arrays the services assign into these columns (allocator results, targets) are
    #: never truncated. Arithmetic on values read from here must not stay int32 when it
    #: can pass 2**31: a byte offset is ``.astype(np.int64) * PAGE_SIZE`` or a Python int.
    #: The layout is the p2m file's too (``persist.P2M_FORMAT_VERSION``).
    FIELDS: tuple[tuple[str, type], ...] = (
        ("frame", np.int32),
        ("swap_slot", np.int32),
        ("epoch", np.uint32),
        ("state", np.uint8),
        ("op", np.uint8),
        ("flags", np.uint8),
    )

    def __init__(self, guest_pages: int, buffer: Any = None, offset: int = 0) -> None:
        self.guest_pages = guest_pages
        self.frame: npt.NDArray[np.int32]
        self.state: npt.NDArray[np.uint8]
        self.op: npt.NDArray[np.uint8]
        self.swap_slot: npt.NDArray[np.int32]
        self.flags: npt.NDArray[np.uint8]
        # Incremented each time a page's in-flight op starts, so an async completion can tell
        # whether the page it worked on was cancelled (and maybe restarted) in the meantime.
        self.epoch: npt.NDArray[np.uint32]
        if buffer is None:
            for name, dtype in self.FIELDS:
                setattr(self, name, np.zeros(guest_pages, dtype=dtype))
            self.reset()
        else:  # a file's contents are adopted as they are (recovery reads them)
            for name, dtype in self.FIELDS:
                setattr(self, name, np.frombuffer(buffer, dtype, guest_pages, offset))
                offset += guest_pages * np.dtype(dtype).itemsize

    @classmethod
    def buffer_size(cls, guest_pages: int) -> int:
        return sum(guest_pages * np.dtype(dtype).itemsize for _, dtype in cls.FIELDS)

    def reset(self) -> None:
        """Every page untouched."""
        self.frame[:] = NO_FRAME
        self.state[:] = 0
        self.op[:] = NO_OP
        self.swap_slot[:] = NO_SLOT
        self.flags[:] = 0
        self.epoch[:] = 0

    def detach(self) -> None:
        """Let go of the buffer: every array becomes a read-only view of "nothing mapped".

        Why: the buffer's mapping can only be closed once no array refers to it; a task
        still holding the VM after it left reads an empty p2m, and a write raises at once.
        """
        n = self.guest_pages
        for name, dtype in self.FIELDS:
            fill = NO_FRAME if name in ("frame", "swap_slot") else (NO_OP if name == "op" else 0)
            setattr(self, name, np.broadcast_to(np.array(fill, dtype=dtype), (n,)))

    def counts(self) -> dict[str, int]:
        """Pages by state (a scan: for scrapes and status, not hot paths)."""
        # One compare per state: ~4x faster than bincount, which widens every byte to intp
        # first (30 against 97 µs for a 256 MiB guest).
        state = self.state
        return {s.name.lower(): int(np.count_nonzero(state == s.value)) for s in PageState}

    def private_frames(self) -> npt.NDArray[np.int64]:
        """Frames backing a page of their own (large pages included; not shared or zero
        frames): what the VM's release gives back to the pool."""
        mask = (self.frame != NO_FRAME) & ((self.flags & FLAG_SHARED) == 0)
        frames: npt.NDArray[np.int64] = self.frame[mask].astype(np.int64)
        return frames
