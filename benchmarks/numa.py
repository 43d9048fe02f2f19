"""NUMA migration throughput against a raw NumPy copy of the same frames, in the same run.

In process (a ``PlatformServer`` without socket or metrics server, two NUMA nodes): one VM
whose pages all live on the node that is not its home node, every page with its own
content. The migration runs through the real parts a round uses: the scan, the
RoundEngine's GetRequest{LOW} (selection by the scheduler, batches of up to 512 pages), the
agent's own filters on an exposure table (the NUMA_MIGRATION release, then the VALIDATION
install of the new frames), CompleteRequest, and the asynchronous copy, with the rates set
out of the way so that the mechanism is what is measured. Then the VM's home node is
flipped and everything moves back: each repeat moves every page once in each direction.

Against, interleaved with the moves: a raw NumPy copy of the very same frames into free
frames of the target node (``frames[new] = frames[old]``, the copy the service does), once
over all pages in one call and once per 512-page batch. The figure is migrated pages per
second over raw-copy pages per second (issue 9's aim: at least 0.4x).

Usage: ``python benchmarks/numa.py [--mib 64] [--repeats 5] [--json out.json]``. Every file
is removed in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from platform_daemon.rounds import RoundState
from platform_daemon.server import PlatformServer
from platform_daemon.services.numa_migration import NumaMigrationService, locality
from platform_daemon.services.validation import ValidationService
from shared.config import PlatformConfig
from shared.constants import PAGE_SIZE, PageState, Priority, ServiceType
from shared.logs import configure_logging
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest, Message, Register
from vmm_agent.exposure import NOT_RELEASED, ExposureTable
from vmm_agent.services.numa_migration import NumaMigrationFilter
from vmm_agent.services.validation import ValidationFilter

MiB = 1 << 20
BATCH = 512


def _ignore(vm: Any, bpns: Any) -> None:
    pass


class _StubConnection:
    def __init__(self) -> None:
        self.vm: Any = None

    def send(self, message: Message, request_id: int = 0) -> None:
        pass


class Bench:
    """A daemon in process with one VM homed on node 0 and all of its pages on node 1."""

    def __init__(self, guest_bytes: int) -> None:
        self.pages = guest_bytes // PAGE_SIZE
        # Each node holds the guest, its reserve (6 %) and some slack.
        node_pages = int((self.pages + 1024) / 0.9)
        self.tmp = Path(tempfile.mkdtemp(prefix="vmb-numa-", dir="/dev/shm"))
        cfg = PlatformConfig(
            socket=self.tmp / "unused.sock",
            host_memory=2 * node_pages * PAGE_SIZE,
            numa_nodes=2,
            metrics_port=-1,
            mem_dir=self.tmp,
            log_level="warning",
        )
        self.server = PlatformServer(cfg)
        s = self.server
        conn = _StubConnection()
        info = Register(name="numa", guest_pages=self.pages, vcpus=1, home_node=0)
        s.registry.register(conn, info)  # type: ignore[arg-type]
        self.vm = conn.vm
        svc = s.services[ServiceType.NUMA_MIGRATION]
        assert isinstance(svc, NumaMigrationService)
        self.svc = svc
        svc.configure(vm_rate=1 << 24, host_rate=1 << 24)  # the mechanism, not the bound
        bpns = np.arange(self.pages, dtype=np.int64)
        frames = s.machine.allocator.allocate(self.pages, 1)
        rng = np.random.default_rng(9)
        for start in range(0, self.pages, 4096):
            chunk = frames[start : start + 4096]
            s.machine.frames[chunk] = rng.integers(0, 256, (len(chunk), PAGE_SIZE), np.uint8)
        s.faults.map_private(self.vm, bpns, frames)
        self.exposure = ExposureTable(self.pages)
        self.exposure.install(bpns, frames, np.ones(self.pages, dtype=bool))
        self.filters = {
            ServiceType.NUMA_MIGRATION: NumaMigrationFilter(self.exposure),
            ServiceType.VALIDATION: ValidationFilter(self.exposure),
        }
        self.state = RoundState()
        s.rounds[self.vm.vm_id] = self.state
        validation = s.services[ServiceType.VALIDATION]
        assert isinstance(validation, ValidationService)
        self.validation = validation

    def close(self) -> None:
        s = self.server
        for vm in list(s.vms.values()):
            s.registry.unregister(vm)
        s._close_files(unlink=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def checksum(self) -> int:
        frames = self.server.machine.frames[self.vm.p2m.frame]
        return int(np.bitwise_xor.reduce(frames.view(np.uint64), axis=None))

    async def migrate_all(self, install: bool = True) -> dict[str, float]:
        """Move every page to the VM's home node through rounds; seconds by part.

        Without ``install`` the remap's second half is left out (no VALIDATION batch): the
        pages are mapped again out of band, untimed, as the guest's faults would.
        """
        s, vm = self.server, self.vm
        self.svc.on_moved = self.validation.enqueue if install else _ignore
        spent = {"numa": 0.0, "validation": 0.0, "scan": 0.0}
        t0 = time.perf_counter()
        while True:
            if not self.svc.queued(vm):
                t = time.perf_counter()
                self.svc.scan(vm, vm.guest_pages, time.monotonic())
                spent["scan"] += time.perf_counter() - t
            t = time.perf_counter()
            req = s.engine.get_request(
                vm, self.state, GetRequest(Priority.LOW, 4_000_000_000, GET_FLAG_NEW_ROUND)
            )
            if not req.has_work:
                if locality(vm, s.machine.allocator)[1] == 0 and not s.tasks:
                    break
                continue
            service = ServiceType(req.service)
            bpns, status, mpns = vm.region.slot(req.slot).batch(req.count)
            if service in self.filters:  # (a working-set sample takes no page: left as is)
                self.filters[service].process(bpns, mpns, status)
            del bpns, status, mpns  # views of the region: none may outlive it
            s.engine.complete(vm, self.state, CompleteRequest(req.slot, req.count, req.seq))
            if s.tasks:
                await asyncio.gather(*list(s.tasks))
            if service in self.filters:
                key = "numa" if service == ServiceType.NUMA_MIGRATION else "validation"
                spent[key] += time.perf_counter() - t
        spent["total"] = time.perf_counter() - t0
        if not install:
            bpns = np.arange(self.pages, dtype=np.int64)
            vm.p2m.state[:] = PageState.EXPOSED
            self.exposure.install(bpns, vm.p2m.frame, np.ones(self.pages, dtype=bool))
            self.exposure.released_by[:] = NOT_RELEASED
        return spent

    def raw_copy(self, batch: int | None) -> float:
        """Seconds to copy the VM's frames into free frames of the other node, as the
        service copies (``frames[new] = frames[old]``), in one call or per batch."""
        machine = self.server.machine
        old = self.vm.p2m.frame.copy()
        other = 1 - int(machine.allocator.node_of(old[:1])[0])
        new = machine.allocator.allocate(len(old), other)
        try:
            step = batch or len(old)
            t0 = time.perf_counter()
            for i in range(0, len(old), step):
                machine.frames[new[i : i + step]] = machine.frames[old[i : i + step]]
            return time.perf_counter() - t0
        finally:
            machine.allocator.release(new)


async def run(guest_mib: int, repeats: int) -> dict[str, Any]:
    bench = Bench(guest_mib * MiB)
    try:
        pages = bench.pages
        before = bench.checksum()
        for _ in range(2):  # warm-up: first calls of NumPy paths (np.unique imports numpy.ma)
            bench.raw_copy(None)
            await bench.migrate_all()
            bench.vm.home_node = 1 - bench.vm.home_node
        moves: list[float] = []  # the migration: scan, release batches, copy, remap, free
        remaps: list[float] = []  # ... and the install half (VALIDATION batches) too
        parts: dict[str, list[float]] = {"numa": [], "validation": [], "scan": []}
        raw_all: list[float] = []
        raw_batch: list[float] = []
        for i in range(4 * repeats):  # ABAB: each kind both ways, interleaved with the copies
            install = i % 4 >= 2
            raw_all.append(pages / bench.raw_copy(None))
            raw_batch.append(pages / bench.raw_copy(BATCH))
            spent = await bench.migrate_all(install)
            (remaps if install else moves).append(pages / spent["total"])
            for k in parts:
                if install or k != "validation":
                    parts[k].append(spent[k] / pages * 1e6)
            assert locality(bench.vm, bench.server.machine.allocator) == (pages, 0), i
            assert (bench.exposure.frame == bench.vm.p2m.frame).all()  # every page mapped
            bench.vm.home_node = 1 - bench.vm.home_node  # and back again
        assert bench.checksum() == before, "content changed"
        rate, remap = statistics.median(moves), statistics.median(remaps)
        raw1, raw512 = statistics.median(raw_all), statistics.median(raw_batch)
        return {
            "guest_pages": pages,
            "moves": len(moves) + len(remaps),
            "migrated_pages_per_s": rate,
            "remapped_pages_per_s": remap,
            "raw_copy_pages_per_s": raw1,
            "raw_copy_512_pages_per_s": raw512,
            "ratio_to_raw_copy": rate / raw1,
            "ratio_to_raw_copy_512": rate / raw512,
            "remap_ratio_to_raw_copy": remap / raw1,
            "us_per_page": {k: statistics.median(v) for k, v in parts.items()},
            "raw_copy_us_per_page": 1e6 / raw1,
        }
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="guest memory in MiB (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="round trips home and back (5)")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    args = p.parse_args(argv)
    configure_logging("json", "warning")
    res = asyncio.run(run(args.mib, args.repeats))
    us = res["us_per_page"]
    print(
        f"guest {res['guest_pages']:,} pages, {res['moves']} moves of every page\n"
        f"migration   {res['migrated_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"(release batches and copy {us['numa']:.2f} µs/page, scan {us['scan']:.2f})\n"
        f"+ install   {res['remapped_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"(VALIDATION batches {us['validation']:.2f} µs/page; "
        f"{res['remap_ratio_to_raw_copy']:.2f}x the raw copy)\n"
        f"raw copy    {res['raw_copy_pages_per_s'] / 1e3:8.1f} k pages/s one call, "
        f"{res['raw_copy_512_pages_per_s'] / 1e3:.1f} k per 512-page batch "
        f"({res['raw_copy_us_per_page']:.2f} µs/page)\n"
        f"ratio       {res['ratio_to_raw_copy']:.2f}x the raw copy "
        f"({res['ratio_to_raw_copy_512']:.2f}x the batched one; aim ≥ 0.4x)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
