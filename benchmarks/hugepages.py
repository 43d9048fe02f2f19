"""2M promotion throughput against a raw copy of the same frames, in the same run.

In process (a ``PlatformServer`` with ``hugepages`` on, no socket, no metrics server): one
VM homed on node 0 whose every page is backed by a private frame of its own, scattered (no
region is on an aligned run). Promotion runs through the real parts a round uses: the
scan, the RoundEngine's GetRequest{LOW} (one region, 512 pages, per batch), the agent's own
filters on an exposure table (the PROMOTION_2M release, then the VALIDATION install that
arms the large mapping), CompleteRequest and the asynchronous collapse. Between repeats
every page is moved to a random free frame again, untimed.

Against, interleaved with the promotions: a raw NumPy copy of the very same scattered
frames into aligned runs (``frames[run] = frames[old]``, the gather the service does), and a
raw contiguous 2 MiB copy (``frames[a:a+512] = frames[b:b+512]``, the issue's "raw 2 MiB
memcpy"). The figures are promoted pages per second over each (issue 9's aim: at least
0.3x the raw 2 MiB copy).

Usage: ``python benchmarks/hugepages.py [--mib 32] [--repeats 5] [--json out.json]``.
Every file is removed in ``finally`` blocks.
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
from platform_daemon.services.promotion import PromotionService
from shared.config import PlatformConfig
from shared.constants import PAGE_SIZE, PAGES_PER_2M, Priority, ServiceType
from shared.logs import configure_logging
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest, Message, Register
from vmm_agent.exposure import NOT_RELEASED, ExposureTable
from vmm_agent.services.promotion import PromotionFilter
from vmm_agent.services.validation import ValidationFilter

MiB = 1 << 20
R = PAGES_PER_2M


class _StubConnection:
    def __init__(self) -> None:
        self.vm: Any = None

    def send(self, message: Message, request_id: int = 0) -> None:
        pass


class Bench:
    """A daemon in process with one VM homed on node 0, every page on its own frame."""

    def __init__(self, guest_bytes: int) -> None:
        self.pages = guest_bytes // PAGE_SIZE // R * R
        node_pages = 3 * self.pages  # room for the scattered frames and the runs
        self.tmp = Path(tempfile.mkdtemp(prefix="vmb-huge-", dir="/dev/shm"))
        cfg = PlatformConfig(
            socket=self.tmp / "unused.sock",
            host_memory=2 * node_pages * PAGE_SIZE,
            numa_nodes=2,
            metrics_port=-1,
            mem_dir=self.tmp,
            log_level="warning",
            hugepages=True,
        )
        self.server = s = PlatformServer(cfg)
        conn = _StubConnection()
        s.registry.register(conn, Register(name="huge", guest_pages=self.pages, vcpus=1))  # type: ignore[arg-type]
        self.vm = conn.vm
        svc = s.services[ServiceType.PROMOTION_2M]
        assert isinstance(svc, PromotionService)
        self.svc = svc
        self.exposure = ExposureTable(self.pages)
        self.filters = {
            ServiceType.PROMOTION_2M: PromotionFilter(self.exposure),
            ServiceType.VALIDATION: ValidationFilter(self.exposure),
        }
        self.state = RoundState()
        s.rounds[self.vm.vm_id] = self.state
        self.rng = np.random.default_rng(11)
        bpns = np.arange(self.pages, dtype=np.int64)
        frames = s.machine.allocator.allocate(self.pages, 0)
        for start in range(0, self.pages, 4096):
            chunk = frames[start : start + 4096]
            s.machine.frames[chunk] = self.rng.integers(0, 256, (len(chunk), PAGE_SIZE), np.uint8)
        s.faults.map_private(self.vm, bpns, frames)
        self.exposure.install(bpns, frames, np.ones(self.pages, dtype=bool))
        self.scatter()

    def close(self) -> None:
        s = self.server
        for vm in list(s.vms.values()):
            s.registry.unregister(vm)
        s._close_files(unlink=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def checksum(self) -> int:
        frames = self.server.machine.frames[self.vm.p2m.frame]
        return int(np.bitwise_xor.reduce(frames.view(np.uint64), axis=None))

    def scatter(self) -> None:
        """Untimed: every page to a random free frame of node 0, small pages again."""
        s, vm = self.server, self.vm
        old = vm.p2m.frame.copy()
        free = s.machine.allocator.allocate(self.pages, 0)
        new = self.rng.permutation(free)
        s.machine.frames[new] = s.machine.frames[old]
        bpns = np.arange(self.pages, dtype=np.int64)
        vm.p2m.flags[:] = 0
        s.faults.map_private(vm, bpns, new)
        s.machine.release_or_retire(old)
        self.exposure.large[:] = False
        self.exposure.install(bpns, new, np.ones(self.pages, dtype=bool))
        self.exposure.released_by[:] = NOT_RELEASED

    async def promote_all(self) -> float:
        """Seconds to promote every region through rounds (scan, batches, copy, install)."""
        s, vm = self.server, self.vm
        t0 = time.perf_counter()
        while not self.exposure.large.all():
            if not self.svc.queued(vm):
                self.svc.scan(vm, vm.guest_pages // R, time.monotonic())
            req = s.engine.get_request(
                vm, self.state, GetRequest(Priority.LOW, 4_000_000_000, GET_FLAG_NEW_ROUND)
            )
            if not req.has_work:
                continue
            service = ServiceType(req.service)
            bpns, status, mpns = vm.region.slot(req.slot).batch(req.count)
            if service in self.filters:
                self.filters[service].process(bpns, mpns, status)
            del bpns, status, mpns  # views of the region: none may outlive it
            s.engine.complete(vm, self.state, CompleteRequest(req.slot, req.count, req.seq))
            if s.tasks:
                await asyncio.gather(*list(s.tasks))
        return time.perf_counter() - t0

    def raw_gather(self) -> float:
        """Seconds to copy the VM's scattered frames into aligned runs, region by region."""
        machine, old = self.server.machine, self.vm.p2m.frame.copy()
        runs = [machine.allocator.allocate_run(1) for _ in range(self.pages // R)]
        try:
            t0 = time.perf_counter()
            for i, run in enumerate(runs):
                assert run is not None
                machine.frames[run] = machine.frames[old[i * R : (i + 1) * R]]
            return time.perf_counter() - t0
        finally:
            for run in runs:
                if run is not None:
                    machine.allocator.release(run)

    def raw_memcpy(self) -> float:
        """Seconds to copy as many contiguous 2 MiB runs as the guest has regions."""
        machine = self.server.machine
        runs = [machine.allocator.allocate_run(1) for _ in range(1 + self.pages // R)]
        try:
            src = runs[0]
            assert src is not None
            t0 = time.perf_counter()
            for run in runs[1:]:
                assert run is not None
                machine.frames[run[0] : run[0] + R] = machine.frames[src[0] : src[0] + R]
            return time.perf_counter() - t0
        finally:
            for run in runs:
                if run is not None:
                    machine.allocator.release(run)


async def run(guest_mib: int, repeats: int) -> dict[str, Any]:
    bench = Bench(guest_mib * MiB)
    try:
        pages = bench.pages
        before = bench.checksum()
        await bench.promote_all()  # warm-up
        bench.scatter()
        promo, gather, memcpy = [], [], []
        for _ in range(repeats):
            gather.append(pages / bench.raw_gather())
            memcpy.append(pages / bench.raw_memcpy())
            promo.append(pages / await bench.promote_all())
            assert (bench.exposure.frame == bench.vm.p2m.frame).all()
            assert bench.checksum() == before, "content changed"
            bench.scatter()
        rate, g, m = (statistics.median(x) for x in (promo, gather, memcpy))
        return {
            "guest_pages": pages,
            "repeats": repeats,
            "promoted_pages_per_s": rate,
            "raw_gather_pages_per_s": g,
            "raw_memcpy_2m_pages_per_s": m,
            "ratio_to_raw_gather": rate / g,
            "ratio_to_raw_memcpy_2m": rate / m,
        }
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=32, help="guest memory in MiB (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="promotions of every region (5)")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    args = p.parse_args(argv)
    configure_logging("json", "warning")
    res = asyncio.run(run(args.mib, args.repeats))
    print(
        f"guest {res['guest_pages']:,} pages, {res['repeats']} promotions of every region\n"
        f"promotion       {res['promoted_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"(release, copy, install, arm)\n"
        f"raw gather      {res['raw_gather_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"({res['ratio_to_raw_gather']:.2f}x)\n"
        f"raw 2 MiB copy  {res['raw_memcpy_2m_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"({res['ratio_to_raw_memcpy_2m']:.2f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
