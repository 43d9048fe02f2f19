"""Low-priority rounds, page sharing and working-set sampling, against this machine's limits.

Every figure is a ratio against something measured in the same run (DESIGN.md, "Performance
rules"), or a fraction of a known truth:

(a) **Machine limits.** xxh3-64 over the very frames the scan hashes (one call per page on
    a memoryview slice, the fastest a Python loop can hash pages); a raw Unix-socket
    ping-pong between two processes (blocking ``send``/``recv``, no event loop), back to back
    and after 100 ms of idleness. The second is what a low-priority round pays: rounds start
    every 100 ms, after both processes slept, and this VM takes long to wake an idle vCPU.
(b) **Sharing scan rate**, in process (a ``PlatformServer`` without socket, one 256 MiB VM,
    every page exposed with unique content, the worst case): pages hashed per second by the
    scanner (``PageSharingService.scan``), first pass (no hints yet), second pass (every page
    enters the unstable table) and steady state (third pass), against raw xxh3 over the same
    frames, interleaved. CPU time per page beside the ratio.
(c) **Sharing found, identical guests**, in process: four guests with the same content
    (zero pages, corpus pages, and pages unique to the guest image but identical across the
    four); the scanner runs one, two and three full scans' worth of allowance (the default
    scan period equals the default sampling period, so three scans are three sampling
    periods' worth), candidates merged as the daemon would; pages shared / shareable pages.
(d) **One low-priority round, 2 GiB guest against 256 MiB**, in process: a round with a new
    working-set sample (drawn and handed out) and a page-sharing batch of 512 candidates
    (GetRequest, the agent's filter, CompleteRequest), daemon and agent sides; the merge
    that follows is asynchronous and timed apart. One scan step (256 pages) is timed too.
    Sizes interleaved (ABAB) so machine noise hits both alike.
(e) **Overrun of the time bound at 1, 4 and 8 VMs**, real daemons (16 MiB guests, page
    sharing kept busy with a 2 s scan period): rounds during a steady phase, in two machine
    states: *quiet* (guests think between accesses: the two CPUs are far from saturated) and
    *busy* (guests never think: 1 + N processes want the two CPUs). Overrun p99 as a fraction
    of the bound, beside the monitor's CPU time per round (its own work, which excludes
    waiting for the daemon, the other CPU and the scheduler) and the idle ping-pong of (a).
(f) **Sampling accuracy after three periods**, real daemons: one 64 MiB guest with a steady
    working set (uniform over half its memory; zipf over all of it), 0.4 s periods (of guest
    time), 100- and 1000-page samples: |estimate - true fraction touched in the period| for
    every period after the third, as a fraction of guest memory.
(g) **Time bound with all six types queued**, real daemons (``--hugepages``,
    ``--hold-read-ahead``, a swap file, two NUMA nodes, 0.5 s sampling and 2 s share-scan
    periods): a filler VM fills node 0 and the two 64 MiB guests (home node 0) then write
    all their memory, most of it on node 1; the filler leaves and the guests run on while
    NUMA migration brings their pages home, its moves queue remap validations, promotion
    collapses fully private regions, defrag compacts what sharing and migration scattered,
    and a last stretch under a host limit 8 MiB below use, the guests walking their memory,
    makes swap-ins read ahead (validations of held pages). Per round: time used against the
    bound, overrun p99 as a fraction of it, the monitor's CPU over it; per type: pages handed
    out per second and pages deferred (the daemon's counts over the steady window), and how
    often its bit was set in the pending word. Where the overrun goes
    (``benchmarks/overrun_split.py``): each round's steps on the agent's side joined with the
    daemon's batch trace (ctl op ``lowprio_trace``), both threads' waits for a CPU (run delay
    from ``/proc/thread-self/schedstat``), the overrun less those waits, the CPU-time overrun,
    the last batch's type and its predicted vs measured work, and a raw ping-pong after 100 ms
    idle run beside the rounds, under the same load.

Usage: ``python benchmarks/lowprio.py [--json out.json] [--quick] [--only-all-six]``
(``--quick``: fewer repetitions and shorter phases; ``--only-all-six``: (g) alone, ~1.5 min,
30 s of steady phase with ``--quick``). Every subprocess is stopped and every file removed in
``finally`` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``tests/procs.py`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.overrun_split import print_split, summarize  # noqa: E402
from platform_daemon.server import PlatformServer  # noqa: E402
from platform_daemon.services.page_sharing import SCAN_CHUNK, PageSharingService  # noqa: E402
from platform_daemon.services.sampling import SamplingService  # noqa: E402
from platform_daemon.shared_frames import frames_saved, merged_pages  # noqa: E402
from shared.config import PlatformConfig  # noqa: E402
from shared.constants import PAGE_SIZE, Priority, ServiceType  # noqa: E402
from shared.logs import configure_logging  # noqa: E402
from shared.messages import (  # noqa: E402
    GET_FLAG_NEW_ROUND,
    CompleteRequest,
    GetRequest,
    Message,
    Register,
)
from shared.sizes import parse_size  # noqa: E402
from tests.procs import Daemons  # noqa: E402
from vmm_agent.exposure import ExposureTable  # noqa: E402
from vmm_agent.load.lowprio_report import PhaseWindow, rounds_in  # noqa: E402
from vmm_agent.rpc import RpcClient  # noqa: E402
from vmm_agent.sampler import Sampler  # noqa: E402
from vmm_agent.services import build_services  # noqa: E402
from vmm_agent.touches import TouchLog  # noqa: E402

MiB = 1 << 20
BATCH = 512


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    return float(np.quantile(xs, q)) if len(xs) else float("nan")


# ---- (a) machine limits ----------------------------------------------------------------------


def raw_pingpong(gaps: Sequence[float], n: int) -> dict[str, dict[str, float]]:
    """Round trips of 30-byte frames between two processes, blocking sockets, after each gap."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo
        a.close()
        while data := b.recv(64):
            b.sendall(data)
        os._exit(0)
    b.close()
    out: dict[str, dict[str, float]] = {}
    try:
        for gap in gaps:
            times = []
            for _ in range(n if gap == 0 else max(20, n // 20)):
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                a.sendall(b"x" * 30)
                a.recv(64)
                times.append(time.perf_counter() - t0)
            out[f"gap_{gap * 1000:g}ms"] = {
                "p50_us": median(times) * 1e6,
                "p99_us": quantile(times, 0.99) * 1e6,
                "n": len(times),
            }
    finally:
        a.close()
        os.waitpid(pid, 0)
    return out


def raw_hash_rate(view: memoryview, frames: Sequence[int]) -> float:
    """Pages per second through xxh3-64 over the given frames, as fast as Python hashes."""
    h = xxhash.xxh3_64_intdigest
    t0 = time.perf_counter()
    for f in frames:
        h(view[f * PAGE_SIZE : (f + 1) * PAGE_SIZE])
    return len(frames) / (time.perf_counter() - t0)


# ---- in-process daemons ---------------------------------------------------------------------


class _StubConnection:
    """What registration needs of a connection; sends nothing."""

    def __init__(self) -> None:
        self.vm: Any = None

    def send(self, message: Message, request_id: int = 0) -> None:
        pass


@contextmanager
def in_process_server(host_bytes: int) -> Any:
    """A daemon without socket or metrics server; its files in a fresh /dev/shm directory."""
    tmp = Path(tempfile.mkdtemp(prefix="vmb-low-", dir="/dev/shm"))
    cfg = PlatformConfig(
        socket=tmp / "unused.sock",
        host_memory=host_bytes,
        numa_nodes=1,
        metrics_port=-1,
        mem_dir=tmp,
        prefault=False,
        log_level="warning",
        # One batch geometry for every guest size: the round costs compare 256 MiB with
        # 2 GiB guests, which the default (slots scaled to the guest) would give 2048- and
        # 4096-page slots.
        slot_capacity=512,
    )
    server = PlatformServer(cfg)
    try:
        yield server
    finally:
        for vm in list(server.vms.values()):
            server.registry.unregister(vm)
        server.machine.close()
        shutil.rmtree(tmp, ignore_errors=True)


def add_vm(server: PlatformServer, name: str, pages: int) -> Any:
    """Register a VM and expose every page on its own frame (content is the caller's)."""
    conn = _StubConnection()
    server.registry.register(conn, Register(name=name, guest_pages=pages, vcpus=1))  # type: ignore[arg-type]
    vm = conn.vm
    frames = server.machine.allocator.allocate(pages, vm.home_node)
    server.faults.map_private(vm, np.arange(pages, dtype=np.int64), frames)
    return vm


def sharing_service(server: PlatformServer) -> PageSharingService:
    svc = server.services[ServiceType.PAGE_SHARING]
    assert isinstance(svc, PageSharingService)
    return svc


def merge_candidates(server: PlatformServer, vm: Any) -> int:
    """Hand out every queued candidate and merge it, as a round and the merge task would."""
    svc = sharing_service(server)
    merged = 0
    while svc.pending_work(vm, 0.0):
        sel = svc.select_work(vm, BATCH, BATCH, 0.0)
        if len(sel.bpns):
            svc.mark_in_flight(vm, sel.bpns)
            svc.merge(vm, sel.bpns)
            merged += len(sel.bpns)
    return merged


# ---- (b) scan rate ------------------------------------------------------------------------


def scan_rate(guest_bytes: int, repeats: int) -> dict[str, Any]:
    pages = guest_bytes // PAGE_SIZE
    with in_process_server(guest_bytes + 64 * MiB) as server:
        vm = add_vm(server, "scan", pages)
        rng = np.random.default_rng(5)
        for start in range(0, pages, 4096):  # unique content: every page is hashed, none merges
            chunk = vm.p2m.frame[start : start + 4096]
            server.machine.frames[chunk] = rng.integers(0, 256, (len(chunk), PAGE_SIZE), np.uint8)
        svc = sharing_service(server)
        view = memoryview(server.machine.file.mm)
        frames = vm.p2m.frame.tolist()
        passes: dict[str, list[float]] = {"first": [], "second": [], "steady": []}
        raw: list[float] = []
        cpu: dict[str, list[float]] = {k: [] for k in passes}
        for _ in range(repeats):
            svc.scans.pop(vm.vm_id, None)
            svc.unstable.clear()
            for name in passes:
                raw.append(raw_hash_rate(view, frames))
                t0, c0 = time.perf_counter(), time.process_time()
                hashed = 0
                while hashed < pages:
                    hashed += svc.scan(vm, SCAN_CHUNK)
                passes[name].append(hashed / (time.perf_counter() - t0))
                cpu[name].append((time.process_time() - c0) / hashed * 1e6)
        raw_rate = median(raw)
        return {
            "guest_pages": pages,
            "raw_xxh3_pages_per_s": raw_rate,
            **{f"{name}_pages_per_s": median(rates) for name, rates in passes.items()},
            **{f"{name}_ratio": median(rates) / raw_rate for name, rates in passes.items()},
            **{f"{name}_cpu_us_per_page": median(c) for name, c in cpu.items()},
            "raw_cpu_us_per_page": 1e6 / raw_rate,
        }


# ---- (c) identical guests ---------------------------------------------------------------------


def identical_guests(guests: int, guest_bytes: int, periods: int) -> dict[str, Any]:
    pages = guest_bytes // PAGE_SIZE
    with in_process_server(guests * guest_bytes + 64 * MiB) as server:
        rng = np.random.default_rng(11)
        corpus = rng.integers(0, 256, (8, PAGE_SIZE), np.uint8)
        image = np.zeros((pages, PAGE_SIZE), np.uint8)  # the guest image all four booted
        kind = rng.random(pages)
        image[(kind >= 0.2) & (kind < 0.5)] = corpus[rng.integers(0, 8, pages)][
            (kind >= 0.2) & (kind < 0.5)
        ]
        unique = kind >= 0.5
        image[unique] = rng.integers(0, 256, (int(unique.sum()), PAGE_SIZE), np.uint8)
        vms = [add_vm(server, f"g{i}", pages) for i in range(guests)]
        for vm in vms:
            server.machine.frames[vm.p2m.frame] = image
        svc = sharing_service(server)
        shareable = guests * pages  # every page's content occurs in all four guests
        found: list[dict[str, Any]] = []
        for period in range(1, periods + 1):
            # One full scan each: the hand goes round once (merged pages are not hashed
            # again, so the allowance of a scan period is one pass, not guest_pages hashes).
            target = {vm.vm_id: svc._scan_state(vm).passes + 1 for vm in vms}
            while any(svc.scans[vm.vm_id].passes < target[vm.vm_id] for vm in vms):
                for vm in vms:  # round robin, as the scanner task does
                    if svc.scans[vm.vm_id].passes < target[vm.vm_id]:
                        svc.scan(vm, SCAN_CHUNK)
                        merge_candidates(server, vm)
            shared = sum(merged_pages(vm.p2m) for vm in vms)
            found.append(
                {
                    "scans": period,
                    "shared_pages": shared,
                    "found_fraction": shared / shareable,
                    "frames_saved": frames_saved([vm.p2m for vm in vms], server.shared),
                }
            )
        # Nothing lost: every page still holds the image.
        for vm in vms:
            assert np.array_equal(server.machine.frames[vm.p2m.frame], image)
        return {
            "guests": guests,
            "guest_pages": pages,
            "shareable_pages": shareable,
            "after": found,
        }


# ---- (d) one round, by guest size ---------------------------------------------------------


class _LowRound:
    """A daemon with one fully exposed VM and the agent's side of its batches."""

    def __init__(self, guest_bytes: int) -> None:
        self.pages = guest_bytes // PAGE_SIZE
        self._ctx = in_process_server(guest_bytes + 64 * MiB)
        self.server = self._ctx.__enter__()
        self.vm = add_vm(self.server, "round", self.pages)
        rng = np.random.default_rng(3)
        corpus = rng.integers(0, 256, (8, PAGE_SIZE), np.uint8)
        # Duplicates in the first 64 Ki pages (the rest stays zero): candidates for every round.
        head = self.vm.p2m.frame[: min(self.pages, 1 << 16)]
        self.server.machine.frames[head] = corpus[np.arange(len(head)) % 8]
        self.exposure = ExposureTable(self.pages)
        self.exposure.install(
            np.arange(self.pages, dtype=np.int64),
            self.vm.p2m.frame.copy(),
            np.ones(self.pages, bool),
        )
        self.agent = build_services(
            self.exposure, Sampler(self.exposure, self.vm.region, TouchLog(self.pages))
        )
        self.state = self.server.rounds[self.vm.vm_id]
        self.times: dict[str, list[float]] = {"round_us": [], "scan_step_us": [], "merge_us": []}

    async def round(self) -> None:
        server, vm, svc = self.server, self.vm, sharing_service(self.server)
        sampling = server.services[ServiceType.SAMPLING]
        assert isinstance(sampling, SamplingService)
        while svc.pending_work(vm, 0.0) < BATCH:  # background work, timed on its own
            t0 = time.perf_counter()
            svc.scan(vm, SCAN_CHUNK)
            self.times["scan_step_us"].append((time.perf_counter() - t0) * 1e6)
        sampling.vms.setdefault(vm.vm_id, sampling._state(vm)).period_end = 0.0  # sample due
        server.engine.refresh_pending(vm)
        t0 = time.perf_counter()
        flags = GET_FLAG_NEW_ROUND
        batches = 0
        while True:
            req = server.engine.get_request(vm, self.state, GetRequest(Priority.LOW, 8000, flags))
            flags = 0
            if not req.has_work:
                break
            slot = vm.region.slot(req.slot)
            bpns, status, mpns = slot.batch(req.count)
            self.agent[ServiceType(req.service)].process(bpns, mpns, status)
            server.engine.complete(vm, self.state, CompleteRequest(req.slot, req.count, req.seq))
            batches += 1
            if req.last:
                break
        self.times["round_us"].append((time.perf_counter() - t0) * 1e6)
        assert batches >= 2, batches  # the sample and a sharing batch
        t1 = time.perf_counter()
        if server.tasks:
            await asyncio.wait(set(server.tasks))
        self.times["merge_us"].append((time.perf_counter() - t1) * 1e6)
        # The merged pages are resident now: expose them again so later rounds find work.
        back = np.flatnonzero(vm.p2m.state == 5)
        vm.p2m.state[back] = 1
        self.exposure.install(back, vm.p2m.frame[back], np.zeros(len(back), bool))

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


async def round_costs(sizes: dict[str, int], reps: int, warmup: int = 5) -> dict[str, Any]:
    benches = {label: _LowRound(size) for label, size in sizes.items()}
    try:
        for _ in range(warmup + reps):
            for bench in benches.values():
                await bench.round()
        return {
            label: {
                "guest_pages": b.pages,
                **{k: median(v[warmup:]) for k, v in b.times.items()},
                "round_p90_us": quantile(b.times["round_us"][warmup:], 0.9),
            }
            for label, b in benches.items()
        }
    finally:
        for bench in benches.values():
            bench.close()


# ---- (e), (f): real daemons ---------------------------------------------------------------


async def _ctl(path: Path, op: str, **args: Any) -> dict[str, Any]:
    client = await RpcClient.connect(str(path))
    try:
        return await client.ctl(op, timeout=120, **args)
    finally:
        client.close()


@contextmanager
def real_daemons(host: str) -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="vmb", dir="/tmp"))
    mem = Path(tempfile.mkdtemp(prefix="vmb-low-", dir="/dev/shm"))
    d = Daemons(tmp, mem, tmp / "p.sock")
    try:
        d.start_platform("--host-memory", host)
        yield d
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


FILL = {
    "name": "fill",
    "working_set": 1.0,
    "distribution": "sequential",
    "write_ratio": 1.0,
    "content": {"zero": 0.2, "duplicate": 0.5, "unique": 0.3},
}


async def _agent_rounds(path: Path, start: float, end: float) -> list[dict[str, Any]]:
    """The agent's recorded low-priority rounds that started in ``start..end``."""

    async def ask(after: float) -> dict[str, Any]:
        return await _ctl(path, "lowprio", after=after)

    got = await rounds_in(ask, start, end)
    assert got is not None
    rounds: list[dict[str, Any]] = got["rounds"]
    return rounds


async def _phase(d: Daemons, names: list[str], phase: dict[str, Any]) -> tuple[float, float]:
    await asyncio.gather(*(_ctl(d.control_socket(n), "run_phase", phase=phase) for n in names))
    start = time.monotonic()
    await asyncio.sleep(phase["duration"])
    await asyncio.gather(*(_ctl(d.control_socket(n), "halt") for n in names))
    return start, time.monotonic()


async def _overrun_run(vms: int, think_us: float, seconds: float) -> dict[str, Any]:
    with real_daemons("256MiB") as d:
        names = [f"v{i}" for i in range(vms)]
        for name in names:
            d.start_agent(name, memory="16MiB")
        # Work for every round: a sample every 0.5 s, sharing scanning each guest every 2 s.
        await _ctl(d.socket, "set_lowprio", share_scan_period=2.0, sample_period=0.5)
        await _phase(d, names, {**FILL, "duration": 1.5})
        run = {
            "name": "run",
            "duration": seconds,
            "working_set": 0.5,
            "distribution": "uniform",
            "write_ratio": 0.1,
            "content": {"zero": 0.2, "duplicate": 0.5, "unique": 0.3},
            "think_us": think_us,
        }
        start, end = await _phase(d, names, run)
        rounds: list[dict[str, Any]] = []
        for name in names:
            rounds += await _agent_rounds(d.control_socket(name), start, end)
        worked = [r for r in rounds if r["batches"]]
        ratio = [r["overrun"] / r["bound"] for r in rounds]
        cpu_over = [max(0.0, r["cpu"] - r["bound"]) / r["bound"] for r in rounds]
        return {
            "vms": vms,
            "think_us": think_us,
            "rounds": len(rounds),
            "rounds_with_batches": len(worked),
            "bound_ms": median([r["bound"] for r in rounds]) * 1e3,
            "used_p50_ms": median([r["used"] for r in rounds]) * 1e3,
            "used_p99_ms": quantile([r["used"] for r in rounds], 0.99) * 1e3,
            "overrun_p50_fraction": quantile(ratio, 0.5),
            "overrun_p99_fraction": quantile(ratio, 0.99),
            "cpu_p50_ms": median([r["cpu"] for r in rounds]) * 1e3,
            "cpu_p99_ms": quantile([r["cpu"] for r in rounds], 0.99) * 1e3,
            "cpu_overrun_p99_fraction": quantile(cpu_over, 0.99),
            "gap_p99_ms": quantile([r["gap"] for r in rounds], 0.99) * 1e3,
        }


async def _sampling_run(sample_pages: int, distribution: str, periods: int) -> dict[str, Any]:
    period = 0.4
    with real_daemons("128MiB") as d:
        d.start_agent("s", memory="64MiB")
        await _ctl(d.socket, "set_lowprio", sample_period=period, sample_pages=sample_pages)
        working_set = 0.5 if distribution == "uniform" else 1.0
        # Periods run on guest time. The first one lasts while the guest first touches its
        # memory (seconds on a busy machine); after that twice the wall time is ample.
        phase = {
            "name": "steady",
            "duration": 8.0 + 2 * (periods + 3) * period,
            "working_set": working_set,
            "distribution": distribution,
            "write_ratio": 0.1,
        }
        start, end = await _phase(d, ["s"], phase)
        history = (await _ctl(d.socket, "sampling"))["s"]
        sampling = (await _ctl(d.control_socket("s"), "results"))["sampling"]
        truth, windows = sampling["truth"], sampling["truth_windows"]
        # Both the platform's period and the monitor's truth window inside the phase (the
        # load report's rule: a truth window may end after the phase, see sampling_report).
        inside = PhaseWindow("steady", start, end).holds
        rows = [
            (p["estimate"], truth[str(p["sample_id"])])
            for p in history
            if inside(p["started"], p["ended"])
            and p["estimate"] is not None
            and str(p["sample_id"]) in truth
            and inside(*windows[str(p["sample_id"])])
        ]
        settled = rows[3 : 3 + periods]
        errors = [abs(e - t) for e, t in settled]
        return {
            "sample_pages": sample_pages,
            "distribution": distribution,
            "periods_measured": len(errors),
            "truth_median": median([t for _, t in settled]),
            "error_median": median(errors),
            "error_p90": quantile(errors, 0.9),
            "error_max": max(errors) if errors else float("nan"),
        }


# ---- (g) all six types queued ---------------------------------------------------------------

SIX = ("sampling", "numa_migration", "defrag_2m", "page_sharing", "validation", "promotion_2m")


def _queued(status: dict[str, Any]) -> dict[str, Any]:
    """Per type: whether its bit is set in any VM's pending word (what the agent sees: work
    waiting); ``all``: whether one VM's word has all six set at once; ``most``: the most of
    the six one VM's word has set."""
    words = [int(v["pending"]) for v in status["vms"]]
    bits = {name: ServiceType[name.upper()].bit for name in SIX}
    out: dict[str, Any] = {name: any(w & bit for w in words) for name, bit in bits.items()}
    every = sum(bits.values())
    out["all"] = any(w & every == every for w in words)
    out["most"] = max((bin(w & every).count("1") for w in words), default=0)
    return out


def _served(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Pages handed out and pages deferred per type, summed over the VMs."""
    out = {name: (0, 0) for name in SIX}
    for vm in status["vms"]:
        for name, st in vm["lowprio"].get("types", {}).items():
            if name in out:
                a, b = out[name]
                out[name] = (a + st["served_pages"], b + st["deferred_pages"])
    return out


async def _wait_gone(d: Daemons, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vms = (await _ctl(d.socket, "list_vms"))["vms"]
        if all(v["name"] != name for v in vms):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} still registered {timeout:g} s after SIGTERM")


async def _collect_traces(d: Daemons, traces: dict[str, dict[int, dict[str, Any]]]) -> None:
    """Merge the daemon's latest low-priority batch trace into ``traces`` (by VM, seq)."""
    got = await _ctl(d.socket, "lowprio_trace")
    for name, entries in got.items():
        if name in traces:
            traces[name].update((int(e["seq"]), e) for e in entries)


async def _all_six_run(seconds: float, guest: str = "64MiB") -> dict[str, Any]:
    """The run of (g); see the module docstring."""
    tmp = Path(tempfile.mkdtemp(prefix="vmb", dir="/tmp"))
    mem = Path(tempfile.mkdtemp(prefix="vmb-low-", dir="/dev/shm"))
    d = Daemons(tmp, mem, tmp / "p.sock")
    names = ["g0", "g1"]
    try:
        d.start_platform(
            *("--host-memory", "288MiB", "--numa-nodes", "2", "--hugepages", "--hold-read-ahead"),
            *("--swap-file", str(tmp / "swap"), "--swap-size", "256MiB"),
            *("--sample-period", "0.5", "--share-scan-period", "2"),
        )
        status = await _ctl(d.socket, "status")
        free0 = int(status["host"]["nodes"][0]["free"])
        d.start_agent("filler", "--home-node", "0", memory=str(free0 * PAGE_SIZE), vcpus=1)
        fill = {**FILL, "content": {"zero": 0.0, "duplicate": 0.0, "unique": 1.0}, "duration": 60.0}
        await _ctl(d.control_socket("filler"), "run_phase", phase=fill)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = await _ctl(d.control_socket("filler"), "results")
            if res["pages_written"] >= free0:
                break
            await asyncio.sleep(0.2)
        await _ctl(d.control_socket("filler"), "halt")
        for name in names:
            d.start_agent(name, "--home-node", "0", memory=guest)
        # g0 writes unique pages only (every region fully private: 2M promotion's work, each
        # collapse freeing 512 frames scattered among g1's), g1 a sharing-heavy mix (merges
        # free frames scattered on node 0: fragmentation, 2M defrag's work).
        content = {
            "g0": {"zero": 0.0, "duplicate": 0.0, "unique": 1.0},
            "g1": {"zero": 0.2, "duplicate": 0.5, "unique": 0.3},
        }

        async def each(phase: dict[str, Any]) -> None:
            await asyncio.gather(
                *(
                    _ctl(d.control_socket(n), "run_phase", phase={**phase, "content": content[n]})
                    for n in names
                )
            )

        await each({**FILL, "duration": 60.0})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            written = [(await _ctl(d.control_socket(n), "results"))["pages_written"] for n in names]
            if sum(written) >= len(names) * parse_size(guest) // PAGE_SIZE:
                break
            await asyncio.sleep(0.2)
        await asyncio.gather(*(_ctl(d.control_socket(n), "halt") for n in names))
        crowded = await _ctl(d.socket, "status")
        filler = d.agents.pop("filler")
        filler.terminate()
        filler.wait(15)
        await _wait_gone(d, "filler")
        run = {
            "name": "run",
            "duration": seconds,
            "working_set": 1.0,
            "distribution": "uniform",
            "write_ratio": 0.05,
            "think_us": 100.0,
        }
        await each(run)
        start = time.monotonic()
        before = await _ctl(d.socket, "status")
        # The machine's wake-up tail under this very load: a raw ping-pong after 100 ms idle,
        # beside the rounds, for the whole steady phase (one sample per ~0.1 s).
        loaded_pingpong = asyncio.ensure_future(
            asyncio.to_thread(raw_pingpong, [0.1], 20 * int(seconds * 9))
        )
        traces: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
        traced_at = start
        samples: list[dict[str, Any]] = []
        local: list[float] = []
        limited, limited_at = False, float("inf")
        while (now := time.monotonic()) < start + seconds:
            if not limited and now > start + 0.7 * seconds:  # swap-ins, read-ahead held
                in_use = int((await _ctl(d.socket, "status"))["host"]["used"])
                await _ctl(d.socket, "set_host_limit", size=str((in_use - 2048) * PAGE_SIZE))
                limited = True
                limited_at = time.monotonic()
                # Walking guests: their swap-in faults ask for fault-around, so swap reads
                # ahead and the held pages queue read-ahead validations.
                await asyncio.gather(*(_ctl(d.control_socket(n), "halt") for n in names))
                await each({**run, "name": "walk", "distribution": "sequential"})
            if now - traced_at > 3.0:  # the daemon keeps its last 512 batches per VM
                await _collect_traces(d, traces)
                traced_at = now
            st = await _ctl(d.socket, "status")
            samples.append(_queued(st))
            local.append(min(v["numa"]["local_fraction"] or 0.0 for v in st["vms"]))
            await asyncio.sleep(0.25)
        end = time.monotonic()
        after = await _ctl(d.socket, "status")
        await _collect_traces(d, traces)
        pingpong_loaded = (await loaded_pingpong)["gap_100ms"]
        await asyncio.gather(*(_ctl(d.control_socket(n), "halt") for n in names))
        rounds: list[dict[str, Any]] = []
        checked = mismatches = 0
        for name in names:
            rounds += [
                {**r, "vm": name} for r in await _agent_rounds(d.control_socket(name), start, end)
            ]
            res = await _ctl(d.control_socket(name), "results")
            checked += res["pages_checked"]
            mismatches += res["mismatches"] + res["page_check_mismatches"]
        s0, s1 = _served(before), _served(after)
        span = end - start
        types = {
            name: {
                "pages_per_s": (s1[name][0] - s0[name][0]) / span,
                "pages_deferred": s1[name][1] - s0[name][1],
                "pending_fraction": sum(q[name] for q in samples) / max(1, len(samples)),
            }
            for name in SIX
        }
        ratio = [r["overrun"] / r["bound"] for r in rounds]
        cpu_over = [max(0.0, r["cpu"] - r["bound"]) / r["bound"] for r in rounds]
        used = [r["used"] / r["bound"] for r in rounds]
        # Before and under the host limit: swapping adds high-priority work and I/O.
        calm = [x for x, r in zip(ratio, rounds, strict=True) if r["started"] < limited_at]
        pressed = [x for x, r in zip(ratio, rounds, strict=True) if r["started"] >= limited_at]
        hp = [v["hugepages"] for v in after["vms"]]
        ra = [v["readahead"] for v in after["vms"]]
        return {
            "seconds": span,
            "guests": f"{len(names)} x {guest}",
            "filler_pages": free0,
            "rounds": len(rounds),
            "rounds_with_batches": sum(1 for r in rounds if r["batches"]),
            "outcomes": {
                o: sum(r["outcome"] == o for r in rounds) for o in {"done", "bound", "preempted"}
            },
            "bound_ms": median([r["bound"] for r in rounds]) * 1e3,
            # Which rounds overrun: those the plan ended ("bound") answer to the slack; those
            # that ran out of work ("done") or were pre-empted do not.
            "over_10pct_by_outcome": {
                o: sum(r["outcome"] == o and x > 0.1 for x, r in zip(ratio, rounds, strict=True))
                for o in ("done", "bound", "preempted")
            },
            "slack_p50_p99_ms": [
                quantile([r.get("slack", 0.0) for r in rounds], q) * 1e3 for q in (0.5, 0.99)
            ],
            "used_p50_fraction": quantile(used, 0.5),
            "used_p99_fraction": quantile(used, 0.99),
            "overrun_p50_fraction": quantile(ratio, 0.5),
            "overrun_p99_fraction": quantile(ratio, 0.99),
            "overrun_p99_before_limit": quantile(calm, 0.99),
            "overrun_p99_under_limit": quantile(pressed, 0.99),
            "rounds_before_after_limit": [len(calm), len(pressed)],
            "cpu_p50_ms": median([r["cpu"] for r in rounds]) * 1e3,
            "cpu_p99_ms": quantile([r["cpu"] for r in rounds], 0.99) * 1e3,
            "cpu_overrun_p99_fraction": quantile(cpu_over, 0.99),
            "gap_p99_ms": quantile([r["gap"] for r in rounds], 0.99) * 1e3,
            "types": types,
            "status_samples": len(samples),
            "all_six_pending_fraction": sum(q["all"] for q in samples) / max(1, len(samples)),
            "five_pending_fraction": sum(q["most"] >= 5 for q in samples) / max(1, len(samples)),
            "swapped_out_in": [
                sum(v["stats"][k] for v in after["vms"]) - sum(v["stats"][k] for v in before["vms"])
                for k in ("swapped_out", "swapped_in")
            ],
            "readahead_held_validated": [
                sum(r["held"] for r in ra),
                sum(r["validated"] for r in ra),
            ],
            "local_fraction_crowded": {
                v["name"]: v["numa"]["local_fraction"] for v in crowded["vms"]
            },
            "local_fraction_start_end": [local[0], local[-1]] if local else None,
            "coverage_end": [v["coverage"] for v in hp],
            "splits_end": sum(v["splits"] for v in hp),
            "defrag_host": after["hugepages"].get("defrag"),
            "pages_checked": checked,
            "mismatches": mismatches,
            "pingpong_loaded": pingpong_loaded,
            "split": summarize(
                [r for r in rounds if r["batches"]],
                {n: list(t.values()) for n, t in traces.items()},
            ),
        }
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


# ---- main -----------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]["pingpong"]
    print(
        "machine: ping-pong back to back p50/p99 "
        f"{_fmt(m['gap_0ms']['p50_us'], 0)}/{_fmt(m['gap_0ms']['p99_us'], 0)} us, "
        f"after 100 ms idle {_fmt(m['gap_100ms']['p50_us'], 0)}/"
        f"{_fmt(m['gap_100ms']['p99_us'], 0)} us"
    )
    s = res["scan"]
    print(
        f"scan: raw xxh3 {_fmt(s['raw_xxh3_pages_per_s'] / 1e6)} M pages/s; scanner first "
        f"{_fmt(s['first_ratio'])}x, second {_fmt(s['second_ratio'])}x, steady "
        f"{_fmt(s['steady_ratio'])}x; CPU/page steady {_fmt(s['steady_cpu_us_per_page'])} us "
        f"(raw {_fmt(s['raw_cpu_us_per_page'])} us)"
    )
    for row in res["identical"]["after"]:
        print(
            f"identical guests: after {row['scans']} scan(s) {row['found_fraction']:.1%} of "
            f"shareable pages shared, {row['frames_saved']:,} frames saved"
        )
    rc = res["rounds"]
    small, big = rc["256MiB"], rc["2GiB"]
    print(
        f"one round: 256 MiB {_fmt(small['round_us'], 0)} us, 2 GiB {_fmt(big['round_us'], 0)}"
        f" us, ratio {_fmt(big['round_us'] / small['round_us'])}; scan step "
        f"{_fmt(big['scan_step_us'] / small['scan_step_us'])}x"
    )
    for row in res["overrun"]:
        print(
            f"overrun, {row['vms']} VMs, think {row['think_us']:g} us: p99 "
            f"{row['overrun_p99_fraction']:.1%} of a {_fmt(row['bound_ms'])} ms bound (p50 "
            f"{row['overrun_p50_fraction']:.1%}); round p50 {_fmt(row['used_p50_ms'])} ms; "
            f"monitor CPU p50/p99 {_fmt(row['cpu_p50_ms'], 3)}/{_fmt(row['cpu_p99_ms'], 3)} "
            f"ms, CPU over the bound p99 {row['cpu_overrun_p99_fraction']:.1%}"
        )
    for row in res["sampling"]:
        print(
            f"sampling {row['sample_pages']} pages, {row['distribution']}: error after 3 "
            f"periods median {row['error_median']:.1%}, p90 {row['error_p90']:.1%}, max "
            f"{row['error_max']:.1%} of guest memory ({row['periods_measured']} periods, "
            f"truth ~{row['truth_median']:.0%})"
        )


def print_all_six(row: dict[str, Any]) -> None:
    print(
        f"all six queued, {row['guests']}, {_fmt(row['seconds'], 0)} s, {row['rounds']} rounds "
        f"({row['rounds_with_batches']} with batches; {row['outcomes']}): time used p50/p99 "
        f"{row['used_p50_fraction']:.0%}/{row['used_p99_fraction']:.0%} of a "
        f"{_fmt(row['bound_ms'])} ms bound; overrun p99 {row['overrun_p99_fraction']:.1%} of "
        f"it (p50 {row['overrun_p50_fraction']:.1%}); monitor CPU p50/p99 "
        f"{_fmt(row['cpu_p50_ms'], 3)}/{_fmt(row['cpu_p99_ms'], 3)} ms, CPU over the bound p99 "
        f"{row['cpu_overrun_p99_fraction']:.1%}"
    )
    slack = row["slack_p50_p99_ms"]
    print(
        f"  rounds over 10 % by outcome {row['over_10pct_by_outcome']}; slack p50/p99 "
        f"{_fmt(slack[0], 2)}/{_fmt(slack[1], 2)} ms"
    )
    calm, pressed = row["rounds_before_after_limit"]
    print(
        f"  overrun p99 before the host limit {row['overrun_p99_before_limit']:.1%} ({calm} "
        f"rounds), under it {row['overrun_p99_under_limit']:.1%} ({pressed} rounds)"
    )
    pp = row["pingpong_loaded"]
    print(
        f"  raw ping-pong after 100 ms idle, during the run: p50/p99 {_fmt(pp['p50_us'], 0)}/"
        f"{_fmt(pp['p99_us'], 0)} us ({pp['n']} samples), p99 "
        f"{pp['p99_us'] / 1e3 / row['bound_ms']:.0%} of the bound"
    )
    print_split(row["split"])
    for name, t in row["types"].items():
        print(
            f"  {name}: {_fmt(t['pages_per_s'], 0)} pages/s handed out, "
            f"{t['pages_deferred']:,} deferred, pending in {t['pending_fraction']:.0%} of "
            "status samples"
        )
    print(
        f"  one VM's pending word with all six bits: {row['all_six_pending_fraction']:.0%} of "
        f"{row['status_samples']} samples, five or more {row['five_pending_fraction']:.0%}; "
        f"swapped out/in {row['swapped_out_in']}, read-ahead "
        f"held/validated {row['readahead_held_validated']}"
    )
    print(
        f"  local fraction with node 0 crowded {row['local_fraction_crowded']}, worst VM "
        f"{row['local_fraction_start_end']}, coverage at the end "
        f"{row['coverage_end']}, splits {row['splits_end']}, defrag {row['defrag_host']}; "
        f"pages checked {row['pages_checked']:,}, mismatches {row['mismatches']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write every figure as JSON")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, shorter phases")
    p.add_argument(
        "--only-all-six", action="store_true", help="run only (g), the six types queued at once"
    )
    args = p.parse_args(argv)
    configure_logging("json", "warning")
    quick = args.quick
    res: dict[str, Any] = {"quick": quick, "load_before": os.getloadavg()}
    if args.only_all_six:
        res["machine"] = {"pingpong": raw_pingpong([0, 0.1], 400)}
        res["all_six"] = asyncio.run(_all_six_run(30.0 if quick else 60.0))
        res["load_after"] = os.getloadavg()
        m = res["machine"]["pingpong"]["gap_100ms"]
        print(
            f"load average before {res['load_before']}, after {res['load_after']}; ping-pong "
            f"after 100 ms idle p50/p99 {_fmt(m['p50_us'], 0)}/{_fmt(m['p99_us'], 0)} us"
        )
        print_all_six(res["all_six"])
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    res["machine"] = {"pingpong": raw_pingpong([0, 0.1], 400 if quick else 2000)}
    res["scan"] = scan_rate(256 * MiB, 2 if quick else 5)
    res["identical"] = identical_guests(4, 64 * MiB, 3)
    res["rounds"] = asyncio.run(
        round_costs({"256MiB": 256 * MiB, "2GiB": 2048 * MiB}, 20 if quick else 60)
    )
    seconds = 4.0 if quick else 8.0
    res["overrun"] = [
        asyncio.run(_overrun_run(vms, think, seconds))
        for think in (200.0, 0.0)
        for vms in (1, 4, 8)
    ]
    res["sampling"] = [
        asyncio.run(_sampling_run(n, dist, 8 if quick else 15))
        for n in (100, 1000)
        for dist in ("uniform", "zipf")
    ]
    res["all_six"] = asyncio.run(_all_six_run(30.0 if quick else 60.0))
    res["load_after"] = os.getloadavg()
    print_table(res)
    print_all_six(res["all_six"])
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
