"""VMs that come and go leak nothing in the daemon: descriptors, mappings and memory stay flat.

A real ``vmmem-platform`` process and a small client speaking the wire protocol directly
(``RpcClient`` + ``Register``, as ``benchmarks/fault_rtt.py`` does), so 500 VMs cost 500
connections, not 500 agent processes. The daemon is observed from outside, through
``/proc/<pid>``: what an operator would look at.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.layout import ControlRegion, region_size
from shared.messages import Fault, FaultReply, Register, Registered
from shared.shm import MappingInUseError, create_mapped
from tests.procs import Daemons, daemons
from vmm_agent.rpc import RpcClient

#: VMs registered and closed before the baseline is taken: caches, pools and lazily built
#: tables fill up here (the first metrics children, the event loop's buffers).
WARMUP_VMS = 50
CHURN_VMS = 500
#: RSS may move this much after the warm-up: allocator noise, not a per-VM leak (a leak of
#: even 8 KiB per VM would add ~3.5 MiB over the 450 VMs after the baseline).
RSS_TOLERANCE = 3 << 20
GUEST_PAGES = 256
TIMEOUT = 10.0


@dataclass(frozen=True)
class Usage:
    """What the daemon holds, read from /proc."""

    fds: int
    deleted_fds: int
    deleted_maps: int
    rss: int


def usage(pid: int, mem_dir: Path) -> Usage:
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except FileNotFoundError:  # closed between listdir and readlink
            continue
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    rss_kib = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return Usage(
        fds=len(targets),
        deleted_fds=sum(t.startswith(str(mem_dir)) and t.endswith("(deleted)") for t in targets),
        deleted_maps=sum(str(mem_dir) in m and m.endswith("(deleted)") for m in maps),
        rss=rss_kib * 1024,
    )


async def register_and_leave(d: Daemons, index: int) -> None:
    """One VM's whole life: register, touch a page (a private frame), close the socket."""
    link = await RpcClient.connect(str(d.socket))
    try:
        reg = await link.request(
            Register(name=f"churn{index}", guest_pages=GUEST_PAGES, vcpus=1, pid=os.getpid()),
            TIMEOUT,
        )
        assert isinstance(reg, Registered)
        reply = await link.request(Fault(index % GUEST_PAGES, True, 0), TIMEOUT)
        assert isinstance(reply, FaultReply)
    finally:
        link.close()
    await asyncio.wait_for(asyncio.shield(link.closed), TIMEOUT)


def settled(pid: int, mem_dir: Path, want_fds: int | None = None) -> Usage:
    """Poll until every VM is released (no control region left) and the descriptor count is
    back to ``want_fds`` or, without it, has not moved for 5 readings (the last connection's
    socket closes just after its region goes); return the last reading either way."""
    deadline = time.monotonic() + TIMEOUT
    counts: list[int] = []
    while True:
        now = usage(pid, mem_dir)
        counts.append(now.fds)
        regions = [p for p in mem_dir.iterdir() if "-vm" in p.name]
        steady = len(counts) >= 5 and len(set(counts[-5:])) == 1
        if not regions and (now.fds == want_fds if want_fds is not None else steady):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.timeout(10)
def test_a_region_mapping_closes_at_once_or_loudly(short_tmp: Path) -> None:
    """A strict close of a control region's mapping raises, naming the file, while the
    region's views live; once the region releases them, the close unmaps at once and gives
    back the descriptor the mapping held."""
    fds_before = len(os.listdir("/proc/self/fd"))
    path = short_tmp / "region"
    mapped = create_mapped(path, region_size(4, 16))
    region = ControlRegion.initialize(
        mapped.mm, vm_id=1, generation=1, slot_count=4, capacity=16, guest_pages=16
    )
    region.pending = 5
    with pytest.raises(MappingInUseError, match=str(path)):
        mapped.close(strict=True)
    assert not mapped.mm.closed
    region.release()
    assert mapped.close(strict=True)
    assert mapped.mm.closed
    assert len(os.listdir("/proc/self/fd")) == fds_before
    mapped.unlink()


@pytest.mark.timeout(120)
def test_500_vms_register_and_leave_without_leaks(short_tmp: Path, mem_dir: Path) -> None:
    """500 VMs register, fault a page and leave, one after the other. After a warm-up of 50,
    the daemon's descriptor count is back to exactly the same number, no descriptor or mapping
    of a deleted control region remains, and RSS stays within 3 MiB."""
    with daemons(short_tmp, mem_dir) as d:
        proc = d.start_platform("--host-memory", "16MiB", "--log-level", "warning")
        pid = proc.pid

        async def churn(first: int, count: int) -> None:
            for i in range(first, first + count):
                await register_and_leave(d, i)

        asyncio.run(churn(0, WARMUP_VMS))
        base = settled(pid, mem_dir)
        t0 = time.monotonic()
        asyncio.run(churn(WARMUP_VMS, CHURN_VMS - WARMUP_VMS))
        elapsed = time.monotonic() - t0
        end = settled(pid, mem_dir, want_fds=base.fds)
        print(
            f"churn: {CHURN_VMS - WARMUP_VMS} VMs in {elapsed:.1f}s; fds {base.fds} -> {end.fds}; "
            f"rss {base.rss / 2**20:.1f} -> {end.rss / 2**20:.1f} MiB; "
            f"deleted fds {end.deleted_fds}, deleted maps {end.deleted_maps}"
        )
        assert proc.poll() is None, d.dump_logs()
        assert end.deleted_fds == 0 and end.deleted_maps == 0, end
        assert base.deleted_fds == 0 and base.deleted_maps == 0, base
        assert end.fds == base.fds, (base, end)
        assert end.rss - base.rss <= RSS_TOLERANCE, (base, end)
