"""Every guest read is checked while the guest runs (issue 7, section 8).

Only the final verification pass was tested: vCPUs that stopped checking their reads failed
no test. Here a frame is corrupted in machine memory behind the guest's back, with no
verification pass at all, and the running vCPUs must catch it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.constants import PAGE_SIZE

from .procs import ctl, daemons

pytestmark = pytest.mark.e2e

HOST_MEMORY = 32 << 20
GUEST_PAGES = 1024


def poll(pred: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``pred`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return value


def results(sock: Path) -> dict[str, Any]:
    return asyncio.run(ctl(sock, "results", timeout=10))


def corrupt_every_used_frame(mem_dir: Path) -> int:
    """Flip the first byte of every frame that holds anything: with one guest that wrote
    only unique bytes, those are exactly its pages (zero frames stay zero). Returns how many."""
    machine = next(p for p in mem_dir.iterdir() if p.stat().st_size == HOST_MEMORY)
    mapped = np.memmap(machine, dtype=np.uint8, mode="r+")
    frames = mapped.reshape(-1, PAGE_SIZE)
    used = np.flatnonzero(frames.any(axis=1))
    frames[used, 0] ^= 0xFF
    mapped.flush()
    del frames, mapped
    return len(used)


@pytest.mark.timeout(60)
def test_running_vcpu_catches_a_frame_corrupted_behind_its_back(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A guest writes every page, then only reads; meanwhile every frame it wrote is changed
    in machine memory. The vCPUs' own read checks count mismatches and log the pages, in
    the agent's results, without any verification pass (none is ever asked for)."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", str(HOST_MEMORY))
        d.start_agent("a", memory=str(GUEST_PAGES * PAGE_SIZE), vcpus=1)
        sock = d.control_socket("a")
        unique = {"zero": 0.0, "duplicate": 0.0, "unique": 1.0}
        fill = {
            "name": "fill",
            "duration": 30,
            "working_set": 1.0,
            "distribution": "sequential",
            "write_ratio": 1.0,
            "content": unique,
        }
        asyncio.run(ctl(sock, "run_phase", phase=fill))
        poll(lambda: results(sock)["pages_written"] == GUEST_PAGES, "every page written")
        asyncio.run(ctl(sock, "halt"))
        before = results(sock)["verification"]
        assert before["mismatches"] == 0, before

        assert corrupt_every_used_frame(mem_dir) >= GUEST_PAGES
        read = {"name": "read", "duration": 30, "working_set": 1.0, "write_ratio": 0.0}
        asyncio.run(ctl(sock, "run_phase", phase=read))
        caught = poll(
            lambda: (r := results(sock))["verification"]["mismatches"] >= 10 and r,
            "the running vCPU to catch the corrupted frames",
        )
        asyncio.run(ctl(sock, "halt"))
        assert caught["verification"]["pages_verified"] > before["pages_verified"]
        logged = caught["mismatch_log"]
        assert logged and all(0 <= m["bpn"] < GUEST_PAGES and m["version"] >= 1 for m in logged)
