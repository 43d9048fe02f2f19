"""The daemon's own memory under swap: freed swap buffers go back to the kernel.

Why (docs/reliability.md §9): swap batches of up to 2 MiB are allocated in the thread
pool's threads; with glibc's dynamic mmap threshold they were carved from those threads'
arenas after the first one, and each arena kept megabytes of freed memory for good, which
the soak saw as the daemon growing 15-18 MiB. ``malloc_tuning`` fixes the threshold.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .procs import ctl, daemons

pytestmark = pytest.mark.e2e

#: glibc reserves each non-main arena as one 64 MiB-aligned mapping of 64 MiB (HEAP_MAX_SIZE
#: on 64-bit), made readable and writable from its start as the arena grows.
ARENA_RESERVE = 64 << 20


def thread_arena_rss_kib(pid: int) -> list[int]:
    """Resident KiB of each glibc thread arena of ``pid``, from /proc/PID/smaps: an anonymous
    read-write mapping at a 64 MiB boundary followed by the inaccessible rest of its 64 MiB
    reservation (thread stacks and other mappings do not have that shape)."""
    maps: list[tuple[int, int, str, bool, int]] = []  # start, end, perms, anonymous, rss
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            start, end = (int(x, 16) for x in head[0].split("-"))
            maps.append((start, end, head[1], len(head) == 5, 0))
        elif head[0] == "Rss:" and maps:
            start, end, perms, anon, _ = maps[-1]
            maps[-1] = (start, end, perms, anon, int(head[1]))
    return [
        rss
        for (start, end, perms, anon, rss), nxt in itertools.pairwise(maps)
        if anon
        and perms == "rw-p"
        and start % ARENA_RESERVE == 0
        and nxt[0] == end
        and nxt[2] == "---p"
        and nxt[1] - start == ARENA_RESERVE
    ]


def resident(status: dict[str, Any]) -> int:
    """Pages of all VMs that have a frame (exposed to their guests or not)."""
    return sum(vm["pages"]["exposed"] + vm["pages"]["resident"] for vm in status["vms"])


def wait_status(
    socket: Path, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while not pred(st := asyncio.run(ctl(socket, "status"))):
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s: {st}"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_swap_batches_leave_no_freed_memory_in_the_thread_arenas(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Two guests writing all of their memory; three times the host limit drops to a
    quarter of what they hold, and the daemon swaps megabytes out at once, in batches of
    hundreds of pages spread over the thread pool. The pool threads' arenas then hold
    little (at most 1 MiB each; about 0.1 MiB measured): the batch buffers were mappings of
    their own, returned when freed. Without the fixed mmap threshold each arena kept 2-4 MiB.
    """
    with daemons(short_tmp, mem_dir) as d:
        platform = d.start_platform(
            "--host-memory", "64MiB", "--swap-file", str(short_tmp / "swap"), "--swap-size", "64MiB"
        )
        fill = {"duration": 60, "working_set": 1.0, "write_ratio": 0.7, "distribution": "uniform"}
        for name in ("a", "b"):
            d.start_agent(name, memory="16MiB")
            asyncio.run(ctl(d.control_socket(name), "run_phase", phase=fill))
        # Each time the limit drops under what the guests hold, the daemon swaps out
        # megabytes at once: batches of hundreds of pages, the buffers that piled up.
        for _ in range(3):
            wait_status(d.socket, lambda st: resident(st) >= 7000, "the guests to fill memory")
            asyncio.run(ctl(d.socket, "set_host_limit", size="8MiB"))
            wait_status(d.socket, lambda st: resident(st) <= 2500, "swap-outs to the limit")
            asyncio.run(ctl(d.socket, "set_host_limit", size="64MiB"))
        arenas = thread_arena_rss_kib(platform.pid)
        st = asyncio.run(ctl(d.socket, "status"))
        out = sum(vm["stats"]["swapped_out"] for vm in st["vms"])
        # The pool's threads ran the batches: their arenas exist (the parser finds them).
        assert arenas, "no glibc thread arena found in the daemon's smaps"
        assert max(arenas) <= 1024, f"thread arenas hold {arenas} KiB after {out} swap-outs"
        for name in ("a", "b"):
            asyncio.run(ctl(d.control_socket(name), "halt"))
