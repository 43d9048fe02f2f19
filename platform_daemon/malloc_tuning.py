"""The daemon's one glibc malloc setting: a fixed mmap threshold (docs/reliability.md §9).

Why: swap I/O runs in the event loop's thread pool, and each swap-out batch gathers its
frames into one buffer of up to 2 MiB (a read-back, up to 17 pages) in whichever pool thread
runs it. glibc serves a buffer that big with a mapping of its own, returned when freed, but
the first such mapping freed raises the threshold to its size ("dynamic mmap threshold"),
and twice that becomes the trim threshold: from then on every batch buffer is carved from
the arena of the thread that asked (one arena per pool thread, six on two CPUs), and each
arena keeps up to 4 MiB of freed memory, plus holes between live blocks, for good. The soak
saw the daemon's anonymous memory grow 15-18 MiB this way in three minutes, almost all of it
free memory held by the arenas (mallinfo2: 15 MiB free of 31 MiB, six pool arenas at 1.7-2.8
MiB each, while the blocks in use grew by 1 MiB).

Setting M_MMAP_THRESHOLD explicitly turns that adjustment off (mallopt(3)): buffers of 128
KiB and more are always mappings of their own and go back to the kernel when freed, and the
trim threshold stays at its 128 KiB default. The cost is one mmap/munmap and the first-touch
page faults per buffer of 32 pages or more, in a pool thread: a 2 MiB gather alone took
0.15-0.35 ms reusing arena memory and 4.4 ms mapped afresh on the loaded 2-CPU test VM
(0.64 against 0.9 ms a batch with six threads). Steady swap batches are small (4.6 pages a
write on average in the soak's load) and pay nothing; a paired 3-minute run wrote 21,527
pages against 23,450 without the setting, swap-out latency 25.0 against 21.9 ms on
average, within what the shared machine's load varies by.
"""

from __future__ import annotations

import ctypes

#: mallopt(3) parameter number (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: glibc's own starting value: only big buffers (swap batches, p2m copies) are mapped.
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc mallopt
    (another C library), which leaves the allocator as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
