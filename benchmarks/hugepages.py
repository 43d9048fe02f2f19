"""2M promotion throughput against a raw copy of the same frames, in the same run.

In process (a ``PlatformServer`` with ``hugepages`` on, no socket, no metrics server): one
VM homed on node 0 whose every page is backed by a private frame of its own, scattered (no
region is on an aligned run). Promotion runs through the real parts a round uses: the
scan, the RoundEngine's GetRequest{LOW} (one region, 512 pages, per batch), the agent's own
filters on an exposure table (the PROMOTION_2M release, then the VALIDATION install that
arms the large mapping), CompleteRequest and the asynchronous collapse. Between repeats
every page is moved to a random free frame again, untimed.

Against, interleaved with the promotions: a raw NumPy copy of the very same scattered
frames into aligned runs (one ``np.take`` per region from the machine's read-only second
mapping straight into the run: the fastest NumPy way, the one ``services/page_move.py``
uses), and a raw contiguous 2 MiB copy
(``frames[a:a+512] = frames[b:b+512]``, the issue's "raw 2 MiB memcpy"). The figures are
promoted pages per second over each, per repeat, and their medians (issue 9's aim: at least
0.3x the raw 2 MiB copy). The process fixes glibc's mmap threshold as the daemon does
(``platform_daemon/malloc_tuning.py``): a 2 MiB temporary then costs a fresh mapping, as in
the daemon.

Rounds are made as the agent makes them: a GetRequest{LOW} with GET_FLAG_NEW_ROUND and the
whole bound (8 ms, a VM of latency sensitivity 0), later requests with what is left of it,
until the daemon says the round is over (no work, or the LAST flag) or the bound is used up.
Between a CompleteRequest and the next GetRequest the event loop turns once, so the spawned
collapses take their steps while the next batch is handed out; their copies run on the
daemon's copier thread (``MachineMemory.copier``), overlapping the loop's work. The loop
waits for a collapse only when no batch is to be had.

Where the time goes: per region, the daemon's part on the event loop (its GetRequest and
CompleteRequest handling, the collapses' steps, the waits for a collapse), the agent's part
(its filters), for the PROMOTION_2M release and the VALIDATION install; beside them the copy
(on the copier thread, overlapping) and the CPU time of the process, both threads.
``--slot-capacity`` (the daemon's ``slot_capacity``; by default the daemon's own for the
guest's size: 512 pages, one region per batch, up to 64 MiB, 2048 at 256 MiB) shows what
larger PageLists buy.

Usage: ``python benchmarks/hugepages.py [--mib 256] [--repeats 3] [--slot-capacity N]
[--json out.json]``. Every file is removed in ``finally`` blocks.
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

from platform_daemon.gil_tuning import shorten_switch_interval
from platform_daemon.malloc_tuning import fix_mmap_threshold
from platform_daemon.rounds import RoundState
from platform_daemon.server import PlatformServer
from platform_daemon.services import page_move
from platform_daemon.services.promotion import PromotionService
from shared.config import PlatformConfig
from shared.constants import PAGE_SIZE, PAGES_PER_2M, Priority, ServiceType
from shared.logs import configure_logging
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest, Message, Register
from shared.timebound import BASE_BOUND_SECONDS
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

    def __init__(self, guest_bytes: int, slot_capacity: int | None = None) -> None:
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
            slot_capacity=slot_capacity,
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
        #: Seconds by part of the last ``promote_all``.
        self.spent: dict[str, float] = {}
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
        """Seconds to promote every region through rounds (scan, batches, copy, install);
        ``spent`` gets the parts: the daemon's on the event loop (get, complete, and the
        collapse's steps with the waits for the copier), the copy (on the copier thread,
        overlapping the rest), the agent's (its filters), and the CPU time of the process
        (both threads). As in the daemon, a batch's collapse runs while the next batch is
        handed out: the loop only waits for a collapse when no batch is to be had."""
        s, vm = self.server, self.vm
        spent = dict.fromkeys(
            (
                "daemon_get",
                "daemon_complete",
                "collapse",
                "wait",
                "copy",
                "agent_release",
                "agent_install",
            ),
            0.0,
        )
        copy = page_move.run_copy

        def timed_copy(*args: Any) -> None:  # on the copier thread
            t = time.perf_counter()
            copy(*args)
            spent["copy"] += time.perf_counter() - t

        page_move.run_copy = timed_copy  # type: ignore[assignment]
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            started: float | None = None  # the round's start, as the agent keeps it
            while not self.exposure.large.all():
                if not self.svc.queued(vm):
                    self.svc.scan(vm, vm.guest_pages // R, time.monotonic())
                t = time.perf_counter()
                # Rounds as the agent makes them: a new one opens with the whole bound,
                # later requests carry what is left of it.
                if started is None:
                    started, flags, left = t, GET_FLAG_NEW_ROUND, BASE_BOUND_SECONDS
                else:
                    flags, left = 0, BASE_BOUND_SECONDS - (t - started)
                    if left <= 0:
                        started = None  # the bound is used up: the next request opens one
                        continue
                get = GetRequest(Priority.LOW, int(left * 1e6), flags)
                req = s.engine.get_request(vm, self.state, get)
                t1 = time.perf_counter()
                spent["daemon_get"] += t1 - t
                if not req.has_work:  # nothing to hand out until a collapse is done
                    started = None
                    if s.tasks:
                        await asyncio.wait(list(s.tasks), return_when=asyncio.FIRST_COMPLETED)
                    spent["wait"] += time.perf_counter() - t1
                    continue
                if req.last:
                    started = None
                service = ServiceType(req.service)
                bpns, status, mpns = vm.region.slot(req.slot).batch(req.count)
                if service in self.filters:
                    self.filters[service].process(bpns, mpns, status)
                t2 = time.perf_counter()
                key = "agent_release" if service == ServiceType.PROMOTION_2M else "agent_install"
                spent[key] += t2 - t1
                del bpns, status, mpns  # views of the region: none may outlive it
                s.engine.complete(vm, self.state, CompleteRequest(req.slot, req.count, req.seq))
                t3 = time.perf_counter()
                spent["daemon_complete"] += t3 - t2
                await asyncio.sleep(0)  # the loop turns, as between two messages
                spent["collapse"] += time.perf_counter() - t3
            if s.tasks:
                await asyncio.gather(*list(s.tasks))
            total = time.perf_counter() - t0
            spent["cpu"] = time.process_time() - cpu0
        finally:
            page_move.run_copy = copy
        spent["total"] = total
        self.spent = spent
        return total

    def raw_gather(self) -> float:
        """Seconds to copy the VM's scattered frames into aligned runs, region by region."""
        machine, old = self.server.machine, self.vm.p2m.frame.copy()
        runs = [machine.allocator.allocate_run(1) for _ in range(self.pages // R)]
        try:
            t0 = time.perf_counter()
            for i, run in enumerate(runs):
                assert run is not None
                dest = machine.frames[run[0] : run[0] + R]
                np.take(machine.source, old[i * R : (i + 1) * R], axis=0, out=dest, mode="clip")
            return time.perf_counter() - t0
        finally:
            for run in runs:
                if run is not None:
                    machine.allocator.release(run)

    def raw_memcpy(self, distinct_sources: bool = False) -> float:
        """Seconds to copy as many contiguous 2 MiB runs as the guest has regions: from one
        source run each time (it stays in the caches: the issue's raw 2 MiB memcpy), or with
        ``distinct_sources`` from a different run each time, as promotion's copies are (each
        region's frames are read once)."""
        machine = self.server.machine
        regions = self.pages // R
        count = 2 * regions if distinct_sources else 1 + regions
        runs = [machine.allocator.allocate_run(1) for _ in range(count)]
        try:
            assert all(run is not None for run in runs)
            sources = runs[:regions] if distinct_sources else runs[:1] * regions
            t0 = time.perf_counter()
            for src, run in zip(sources, runs[-regions:], strict=True):
                assert src is not None and run is not None
                machine.frames[run[0] : run[0] + R] = machine.frames[src[0] : src[0] + R]
            return time.perf_counter() - t0
        finally:
            for run in runs:
                if run is not None:
                    machine.allocator.release(run)


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


async def run(guest_mib: int, repeats: int, slot_capacity: int | None = None) -> dict[str, Any]:
    fix_mmap_threshold()  # as the daemon does (platform_daemon/cli.py)
    shorten_switch_interval()  # the copier thread and the loop share the GIL as in the daemon
    bench = Bench(guest_mib * MiB, slot_capacity)
    try:
        pages = bench.pages
        regions = pages // R
        before = bench.checksum()
        await bench.promote_all()  # warm-up
        bench.scatter()
        load_before = load()
        promo, gather, memcpy, ratios, ratios_g = [], [], [], [], []
        memcpy_distinct, ratios_d = [], []
        parts: dict[str, list[float]] = {}
        for _ in range(repeats):
            g = pages / bench.raw_gather()
            m = pages / bench.raw_memcpy()
            d = pages / bench.raw_memcpy(distinct_sources=True)
            p = pages / await bench.promote_all()
            memcpy_distinct.append(d)
            ratios_d.append(p / d)
            promo.append(p)
            gather.append(g)
            memcpy.append(m)
            ratios.append(p / m)
            ratios_g.append(p / g)
            for k, v in bench.spent.items():
                parts.setdefault(k, []).append(v / regions * 1e3)
            assert (bench.exposure.frame == bench.vm.p2m.frame).all()
            assert bench.checksum() == before, "content changed"
            bench.scatter()
        med = statistics.median
        return {
            "guest_pages": pages,
            "repeats": repeats,
            "slot_capacity": bench.vm.region.slot_capacity,
            "load_before": load_before,
            "load_after": load(),
            "promoted_pages_per_s": med(promo),
            "raw_gather_pages_per_s": med(gather),
            "raw_memcpy_2m_pages_per_s": med(memcpy),
            "ratio_to_raw_gather": med(ratios_g),
            "ratio_to_raw_memcpy_2m": med(ratios),
            "ratios_to_raw_memcpy_2m": ratios,
            "raw_memcpy_2m_distinct_pages_per_s": med(memcpy_distinct),
            "ratio_to_raw_memcpy_2m_distinct": med(ratios_d),
            "ms_per_region": {k: med(v) for k, v in parts.items()},
        }
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 256 MiB: a guest whose default slots carry four regions a batch (docs/performance.md
    # gives 32 and 128 MiB too, where one or two regions a batch make the round the limit).
    p.add_argument("--mib", type=int, default=256, help="guest memory in MiB (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="promotions of every region (3)")
    p.add_argument(
        "--slot-capacity", type=int, help="pages per PageList slot (default: the daemon's)"
    )
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    args = p.parse_args(argv)
    configure_logging("json", "warning")
    res = asyncio.run(run(args.mib, args.repeats, args.slot_capacity))
    ms = res["ms_per_region"]
    print(
        f"guest {res['guest_pages']:,} pages, {res['repeats']} promotions of every region, "
        f"slots of {res['slot_capacity']} pages, load {res['load_before']} -> "
        f"{res['load_after']}\n"
        f"promotion       {res['promoted_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"(release, copy, install, arm)\n"
        f"raw gather      {res['raw_gather_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"({res['ratio_to_raw_gather']:.2f}x)\n"
        f"raw 2 MiB copy  {res['raw_memcpy_2m_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"({res['ratio_to_raw_memcpy_2m']:.2f}x, median of per-repeat ratios "
        f"{', '.join(f'{r:.2f}' for r in res['ratios_to_raw_memcpy_2m'])})\n"
        f"  from distinct sources {res['raw_memcpy_2m_distinct_pages_per_s'] / 1e3:8.1f} k pages/s "
        f"({res['ratio_to_raw_memcpy_2m_distinct']:.2f}x)\n"
        f"per region (ms): wall {ms['total']:.2f} = daemon get {ms['daemon_get']:.2f} "
        f"+ complete {ms['daemon_complete']:.2f} + collapse steps {ms['collapse']:.2f} "
        f"+ waits for a collapse {ms['wait']:.2f} + agent release {ms['agent_release']:.2f} "
        f"+ install {ms['agent_install']:.2f}; copy {ms['copy']:.2f} on the copier "
        f"thread, overlapping; CPU {ms['cpu']:.2f} (both threads)"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
