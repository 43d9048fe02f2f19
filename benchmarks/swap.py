"""Swap throughput and round cost, against this machine's own ``pwrite``/``pread``.

DESIGN.md ("Performance rules") asks for figures as ratios against the machine measured in the
same run. This script measures:

(a) **Through the real daemons** (``vmmem-platform`` + one ``vmmem-vmm`` as subprocesses): the
    agent writes every page of a 1 GiB guest (sequential, unique content), the host limit is
    shrunk (ctl ``set_host_limit``) so memsched must swap most of the guest out, and the
    daemon's ``status`` is sampled to get pages swapped out per second. The limit is then
    raised again and the agent's ``verify`` reads every page back (a swap-in per fault, with
    read-ahead of swapped neighbours since verify asks for fault-around), giving pages
    swapped in per second (and proving nothing was lost). The swap-out is run with the swap
    file's new page cache landing in "cold" memory (freed long ago, which this VM has handed
    back to the hypervisor: see ``raw_io``) and in "warm" memory (freed just before), each as
    shipped and with the agent polling its pending word every 1 ms instead of 50 ms (a
    diagnosis: it removes the idle time between rounds). The daemon runs with its default
    slots, which scale with the guest (``slot_capacity_for``: 4096 pages for this one; every
    run before 2026-12-02 14:15 UTC passed ``--slot-capacity 512``, and every run before
    17:20 had a 256 MiB guest).
    Next to it, in the same run and directory: raw ``os.pwrite`` of 512-page (2 MiB) blocks
    to a fresh sparse file (cold and warm memory) and rewrites of it, and raw ``os.pread`` of
    single 4 KiB pages (a swap-in without read-ahead) and of 16-page runs (with it). Ratios
    are daemon rate / raw rate in the same memory condition, the raw rate being the best of
    the raw runs before and after the daemon runs (the machine's limit in this run).
    A breakdown of one 512-page swap write in-process (the gather copy the daemon no longer
    makes, reorder, pwrite, checksums, the daemon's write from machine memory and its writer
    thread hop) and of one single-page swap read says where the write path's time goes;
    the daemon's Prometheus histograms (executor write time, batch time) and the CPU time of
    the daemon's threads, the agent and the machine (``/proc``) say where it went in the run.

(b) **In-process, no sockets**: a ``PlatformServer`` (metrics off) with a stub connection and
    one VM whose pages are all exposed, timing one complete high-priority round for one
    512-page swap batch (GetRequest that opens the round and issues the batch, the agent's
    swap filter, CompleteRequest, the GetRequest that closes the round) for 256 MiB and
    2 GiB guests. The asynchronous disk write is excluded from the round and timed apart.
    The ratio 2 GiB / 256 MiB must stay ~1 (no per-round cost grows with guest size). The
    same setup, run back to back with the writes overlapping, gives the daemon-side swap-out
    capacity without any socket, in the batches the daemon's default slots take.

Usage: ``python benchmarks/swap.py [--json out.json] [--quick] [--dir /var/tmp] [--guest-mib 1024]``
(``--quick``, two of the four daemon runs and fewer repetitions, takes ~50 s; the full run
~80 s). Every subprocess is stopped and every file removed
in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``tests/procs.py`` is not an installed package
    sys.path.insert(0, str(ROOT))

from platform_daemon.gil_tuning import shorten_switch_interval  # noqa: E402
from platform_daemon.server import PlatformServer  # noqa: E402
from platform_daemon.swapfile import SwapFile  # noqa: E402
from shared.config import PlatformConfig  # noqa: E402
from shared.constants import PAGE_SIZE, PageState, Priority  # noqa: E402
from shared.layout import slot_capacity_for  # noqa: E402
from shared.logs import configure_logging  # noqa: E402
from shared.messages import CompleteRequest, GetRequest, Message, Register  # noqa: E402
from tests.procs import Daemons, free_port  # noqa: E402
from vmm_agent.exposure import ExposureTable  # noqa: E402
from vmm_agent.rpc import RpcClient  # noqa: E402
from vmm_agent.services.swap import SwapFilter  # noqa: E402

MiB = 1 << 20
BATCH = 512  # pages per PageList batch: 2 MiB
GUEST = 1024 * MiB


# ---- small helpers -----------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timed_us(fn: Callable[[], object], repeats: int) -> list[float]:
    """Microseconds of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def filesystem_of(directory: Path) -> dict[str, str]:
    """``df`` of ``directory`` (what ``df -T`` shows): device, filesystem type, mount point."""
    try:
        out = subprocess.run(
            ["df", "--output=source,fstype,target", str(directory)],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
        source, fstype, target = out[-1].split(maxsplit=2)
        return {"source": source, "fstype": fstype, "mount": target}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": str(exc)}


def random_pages(n: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


# ---- raw disk rates ------------------------------------------------------------------------------


def _write_pass(fd: int, buf: memoryview, pages: int) -> tuple[float, float]:
    """One pass of 2 MiB ``pwrite`` calls over ``pages`` pages: (pages/s, median µs per call)."""
    samples = []
    t_all = time.perf_counter()
    for off in range(0, pages * PAGE_SIZE, BATCH * PAGE_SIZE):
        t0 = time.perf_counter()
        os.pwrite(fd, buf, off)
        samples.append(time.perf_counter() - t0)
    return pages / (time.perf_counter() - t_all), median(samples) * 1e6


#: Seconds after which this VM's freed memory has been handed back to the hypervisor.
COLD_SETTLE = 3.0


def raw_io(directory: Path, pages: int, repeats: int, read_samples: int) -> dict[str, float]:
    """Raw rates of the kernel in ``directory``, same shapes as the swap path.

    - ``pwrite_cold``: 2 MiB ``pwrite`` calls into a new sparse file (created like the swap
      file: ``ftruncate``, blocks allocated on first write), ``pages`` pages in all, after
      ``COLD_SETTLE`` seconds of rest. This VM has virtio-balloon free page reporting: memory
      the guest kernel freed more than ~2 s ago has been returned to the host, and the first
      touch of it costs a hypervisor fault (~8 µs a page, measured as system time here), so
      new page cache is ~10x slower than when it reuses memory freed just before;
    - ``pwrite_fresh``: the same into a new file right after the cold file was dropped (its
      memory is reused: the rate of the disk path itself);
    - ``pwrite_rewrite``: the same offsets again (page cache holds them: a reused swap slot);
    - ``pread_4k``: single 4 KiB ``pread`` calls at random page offsets (page cache), one per
      page as a swap-in fault without read-ahead does;
    - ``pread_64k``: 16-page ``pread`` calls at random offsets (a fault with read-ahead).

    Medians over ``repeats`` files, in pages per second (and µs per call, and for the cold
    pass, kernel µs per page).
    """
    block = np.ascontiguousarray(random_pages(BATCH, 11))
    buf = block.data.cast("B")
    one, run16 = bytearray(PAGE_SIZE), bytearray(16 * PAGE_SIZE)
    out: dict[str, list[float]] = {
        k: []
        for k in ("fresh", "fresh_call", "rewrite", "rewrite_call", "pread", "pread_call", "p16")
    }
    rng = np.random.default_rng(12)
    time.sleep(COLD_SETTLE)
    fd, name = tempfile.mkstemp(prefix="vmb-swap-raw-", dir=str(directory))
    try:
        os.ftruncate(fd, pages * PAGE_SIZE)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cold, cold_call = _write_pass(fd, buf, pages)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        os.unlink(name)
    for _ in range(repeats):
        fd, name = tempfile.mkstemp(prefix="vmb-swap-raw-", dir=str(directory))
        try:
            os.ftruncate(fd, 2 * pages * PAGE_SIZE)  # sparse, like SwapFile
            rate, call = _write_pass(fd, buf, pages)
            out["fresh"].append(rate)
            out["fresh_call"].append(call)
            rate, call = _write_pass(fd, buf, pages)
            out["rewrite"].append(rate)
            out["rewrite_call"].append(call)
            offsets = (rng.integers(0, pages, read_samples) * PAGE_SIZE).tolist()
            t_all = time.perf_counter()
            for off in offsets:
                os.preadv(fd, [one], off)
            elapsed = time.perf_counter() - t_all
            out["pread"].append(read_samples / elapsed)
            out["pread_call"].append(elapsed / read_samples * 1e6)
            offsets = (rng.integers(0, pages - 16, read_samples // 16) * PAGE_SIZE).tolist()
            t_all = time.perf_counter()
            for off in offsets:
                os.preadv(fd, [run16], off)
            out["p16"].append(len(offsets) * 16 / (time.perf_counter() - t_all))
        finally:
            os.close(fd)
            os.unlink(name)
    return {
        "pwrite_cold_pages_per_s": cold,
        "pwrite_cold_us_per_2MiB": cold_call,
        "pwrite_cold_kernel_us_per_page": (ru1.ru_stime - ru0.ru_stime) / pages * 1e6,
        "pwrite_fresh_pages_per_s": median(out["fresh"]),
        "pwrite_fresh_us_per_2MiB": median(out["fresh_call"]),
        "pwrite_rewrite_pages_per_s": median(out["rewrite"]),
        "pwrite_rewrite_us_per_2MiB": median(out["rewrite_call"]),
        "pread_4k_pages_per_s": median(out["pread"]),
        "pread_4k_us_per_page": median(out["pread_call"]),
        "pread_64k_pages_per_s": median(out["p16"]),
        "pages": pages,
        "repeats": repeats,
    }


# ---- in-process breakdown of the swap file's own paths ----------------------------------------


def recycle_memory(directory: Path, mib: int) -> float:
    """Write and drop a ``mib`` MiB file, so that the next ~2 s of new page cache reuses
    memory the hypervisor still backs (see ``raw_io``); returns its rate in pages/s."""
    block = np.ascontiguousarray(random_pages(BATCH, 13))
    fd, name = tempfile.mkstemp(prefix="vmb-swap-recycle-", dir=str(directory))
    try:
        os.ftruncate(fd, mib * MiB)
        rate, _ = _write_pass(fd, block.data.cast("B"), mib * MiB // PAGE_SIZE)
    finally:
        os.close(fd)
        os.unlink(name)
    return rate


async def swapfile_breakdown(directory: Path, repeats: int) -> dict[str, float]:
    """Microseconds per 512-page write (and per single-page read) and what they are made of.

    The "machine memory" is a 64 MiB array of random pages; a batch gathers 512 frames at a
    random place (consecutive, as a sequential fill allocates them). Every write goes to
    fresh slots of a new sparse swap file, in reused memory (``recycle_memory`` just before);
    the three ways of writing take turns, so each sees the same conditions.
    """
    pool = random_pages(16384, 21)
    rng = np.random.default_rng(22)
    path = directory / f"vmb-swap-breakdown-{os.getpid()}"
    swap = SwapFile(path, 4 * repeats * BATCH * PAGE_SIZE)
    loop = asyncio.get_running_loop()
    try:

        def frames() -> npt.NDArray[np.int64]:
            start = int(rng.integers(0, len(pool) - BATCH))
            return np.arange(start, start + BATCH, dtype=np.int64)

        batch = pool[frames()]
        slots = np.arange(BATCH, dtype=np.int64)
        gather = timed_us(lambda: pool[frames()], repeats)
        reorder = timed_us(lambda: batch[np.argsort(slots, kind="stable")], repeats)
        digest = xxhash.xxh3_64_intdigest
        hashing = timed_us(
            lambda: np.fromiter((digest(p) for p in batch), np.uint64, BATCH), repeats
        )
        recycle_memory(directory, 3 * repeats * 2 + 64)
        pwrite, direct, executor = [], [], []
        checked: list[npt.NDArray[np.int64]] = []  # slots with a checksum, for the reads
        for _ in range(repeats):
            s, f = swap.allocate(BATCH), frames()
            t0 = time.perf_counter()
            os.pwrite(swap.fd, pool[f].data.cast("B"), int(s[0]) * PAGE_SIZE)
            pwrite.append((time.perf_counter() - t0) * 1e6)
            s, f = swap.allocate(BATCH), frames()
            t0 = time.perf_counter()
            swap.write_frames(pool, f, s)  # straight from the "machine memory", as the daemon
            direct.append((time.perf_counter() - t0) * 1e6)
            checked.append(s)
            s, f = swap.allocate(BATCH), frames()
            t0 = time.perf_counter()
            await asyncio.wrap_future(swap.submit_write(pool, f, s))  # on the writer thread
            executor.append((time.perf_counter() - t0) * 1e6)
        # Reads: single pages from the slots just written (page cache), as swap-in does.
        picks = rng.choice(np.concatenate(checked), size=repeats * 8).astype(np.int64)
        it = iter(picks.tolist())
        read_direct = timed_us(lambda: swap.read_pages(np.array([next(it)])), repeats * 4)
        read_exec = []
        for _ in range(repeats * 4):
            slot = np.array([next(it)])
            t0 = time.perf_counter()
            await loop.run_in_executor(None, swap.read_pages, slot)
            read_exec.append((time.perf_counter() - t0) * 1e6)
    finally:
        swap.close()
    return {
        "write_gather_us": median(gather),
        "write_reorder_copy_us": median(reorder),
        "write_checksums_us": median(hashing),
        "write_pwrite_fresh_us": median(pwrite),
        "write_frames_us": median(direct),
        "write_frames_on_writer_us": median(executor),
        "read_one_page_us": median(read_direct),
        "read_one_page_in_executor_us": median(read_exec),
        "repeats": repeats,
    }


# ---- (a) the real daemons ------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of every thread of ``pid``, by thread id."""
    out = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) / _TICK, int(fields[12]) / _TICK)
    return out


def cpu_snapshot(platform_pid: int, agent_pid: int) -> dict[str, float]:
    """CPU seconds so far (user and system): the daemon's event-loop thread, its other
    threads (the executor doing the swap I/O), the agent, and the whole machine (all CPUs,
    every process, including whatever else runs on it)."""
    daemon = _thread_cpu(platform_pid)
    loop = daemon.pop(platform_pid, (0.0, 0.0))
    agent = _thread_cpu(agent_pid).values()
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return {
        "daemon_loop_user": loop[0],
        "daemon_loop_sys": loop[1],
        "daemon_threads_user": sum(u for u, _ in daemon.values()),
        "daemon_threads_sys": sum(s for _, s in daemon.values()),
        "agent": sum(u + s for u, s in agent),
        "machine": busy / _TICK,
    }


class Sampler:
    """Polls the daemon's ``status`` over one connection and keeps a time series, with the
    CPU time the daemon, the agent and the machine have used so far."""

    def __init__(self, client: RpcClient, interval: float, pids: tuple[int, int]) -> None:
        self.client = client
        self.interval = interval
        self.pids = pids
        self.samples: list[dict[str, Any]] = []

    async def sample(self, t0: float) -> dict[str, Any]:
        # The counters only: ~0.4 ms of the daemon's CPU a sample, not ~1.4 (at 100 Hz).
        st = await self.client.ctl("status", brief=True)
        vm = st["vms"][0]
        row = {
            "cpu": cpu_snapshot(*self.pids),
            "t": time.perf_counter() - t0,
            "swapped_out": vm["stats"]["swapped_out"],
            "swapped_in": vm["stats"]["swapped_in"],
            "cancelled": vm["stats"]["swap_cancelled"],
            "pages": vm["pages"],
            "free_state": st["host"]["free_state"],
        }
        self.samples.append(row)
        return row

    async def until(
        self, t0: float, done: Callable[[dict[str, Any]], bool], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            row = await self.sample(t0)
            if done(row):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not settle: {row}")
            await asyncio.sleep(self.interval)


def series_rate(samples: list[dict[str, Any]], key: str, window: float) -> dict[str, Any]:
    """Rates of counter ``key`` over a time series: overall, while active, and best window."""
    t = np.array([s["t"] for s in samples])
    v = np.array([s[key] for s in samples], dtype=np.float64)
    v = v - v[0]
    total = float(v[-1])
    if total <= 0:
        return {"pages": 0.0}
    moving = np.flatnonzero(np.diff(v) > 0)
    first = int(moving[0])  # last sample before the first change
    last = int(np.flatnonzero(v >= total)[0])  # first sample at the final value
    best: float | None = None  # only when the active time holds two windows or more
    if t[last] - t[first] >= 2 * window:
        best = 0.0
        for i in range(first, last):
            j = int(np.searchsorted(t, t[i] + window))
            if j > last:
                break
            best = max(best, (v[j] - v[i]) / (t[j] - t[i]))
    cpu0, cpu1, span = samples[first]["cpu"], samples[last]["cpu"], float(t[last] - t[first])
    return {
        "pages": total,
        # CPUs busy on average while pages moved (2.0 = both CPUs of this machine all along).
        "cpu_while_active": {k: (cpu1[k] - cpu0[k]) / span for k in cpu0},
        "cpu_us_per_page": {k: (cpu1[k] - cpu0[k]) / total * 1e6 for k in cpu0},
        "seconds_from_start": float(t[last]),
        "pages_per_s_from_start": total / float(t[last]),
        "seconds_active": float(t[last] - t[first]),
        "pages_per_s_active": total / float(t[last] - t[first]),
        f"pages_per_s_best_{int(window * 1000)}ms": best,
        "started_after_s": float(t[first]),
    }


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the daemon's Prometheus endpoint, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_delta(
    before: dict[Any, float], after: dict[Any, float], name: str, **labels: str
) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def batch_outcomes(before: dict[Any, float], after: dict[Any, float]) -> dict[str, float]:
    keys = {k for k in after if k[0] == "vmmem_platform_batch_pages_total"}
    out = {}
    for name, labels in keys:
        lab = dict(labels)
        if lab.get("service") == "swap":
            out[lab["outcome"]] = after[(name, labels)] - before.get((name, labels), 0.0)
    return out


async def _ctl(path: Path, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    client = await RpcClient.connect(str(path))
    try:
        return await client.ctl(op, timeout=timeout, **args)
    finally:
        client.close()


async def _fill(d: Daemons, guest_pages: int, timeout: float) -> float:
    """Write every guest page once (sequential, unique content); seconds it took."""
    ctl_path = d.control_socket("a")
    phase = {
        "name": "fill",
        "duration": timeout,
        "working_set": 1.0,
        "write_ratio": 1.0,
        "distribution": "sequential",
        "content": {"zero": 0, "duplicate": 0, "unique": 1},
    }
    t0 = time.perf_counter()
    await _ctl(ctl_path, "run_phase", phase=phase)
    deadline = time.monotonic() + timeout
    while (await _ctl(ctl_path, "progress"))["touched"] < guest_pages:
        if time.monotonic() > deadline:
            raise TimeoutError("fill phase did not touch every page")
        await asyncio.sleep(0.05)
    await _ctl(ctl_path, "halt")
    return time.perf_counter() - t0


async def _daemon_scenario(
    d: Daemons,
    port: int,
    guest_pages: int,
    host: str,
    limit: str,
    with_swap_in: bool,
    interval: float,
    memory: str,
    directory: Path,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["fill_seconds"] = await _fill(d, guest_pages, 120.0)
    agent_ctl = d.control_socket("a")
    client = await RpcClient.connect(str(d.socket))
    try:
        assert d.platform is not None
        sampler = Sampler(client, interval, (d.platform.pid, d.agents["a"].pid))
        m0 = scrape(port)
        a0 = await _ctl(agent_ctl, "results")
        if memory == "cold":  # the swap file's new page cache: memory the host must back anew
            await asyncio.sleep(COLD_SETTLE)
        else:  # memory freed just now, still backed
            recycle_memory(directory, 2 * GUEST // MiB)
        t0 = time.perf_counter()
        await sampler.sample(t0)
        await client.ctl("set_host_limit", size=limit)

        def out_settled(row: dict[str, Any]) -> bool:
            series = sampler.samples
            if row["pages"]["in_flight"] or row["swapped_out"] == 0:
                return False
            if row["pages"]["exposed"] == 0:
                return True
            same = [s for s in series if s["swapped_out"] == row["swapped_out"]]
            return bool(row["t"] - same[0]["t"] >= 1.0)  # nothing more for ten memsched ticks

        await sampler.until(t0, out_settled, 120.0)
        m1 = scrape(port)
        a1 = await _ctl(agent_ctl, "results")
        out["swap_out"] = series_rate(sampler.samples, "swapped_out", 0.25)
        out["swap_out"]["resident_after"] = sampler.samples[-1]["pages"]["exposed"]
        n_out = metric_delta(m0, m1, "vmmem_swap_io_seconds_count", direction="out")
        io_out = metric_delta(m0, m1, "vmmem_swap_io_seconds_sum", direction="out")
        bt_n = metric_delta(m0, m1, "vmmem_platform_batch_seconds_count", service="swap")
        bt_s = metric_delta(m0, m1, "vmmem_platform_batch_seconds_sum", service="swap")
        out["swap_out"]["diagnosis"] = {
            "writes": n_out,
            "write_in_executor_mean_us": io_out / n_out * 1e6 if n_out else None,
            "write_busy_seconds": io_out,
            "batches": bt_n,
            "batch_platform_mean_us": bt_s / bt_n * 1e6 if bt_n else None,
            "batch_outcomes_pages": batch_outcomes(m0, m1),
            "agent_rounds": a1["rounds"] - a0["rounds"],
        }
        if with_swap_in:
            sampler.samples = []
            t1 = time.perf_counter()
            await sampler.sample(t1)
            await client.ctl("set_host_limit", size=host)
            verify = asyncio.ensure_future(_ctl(agent_ctl, "verify", timeout=600.0))
            while not verify.done():
                await sampler.sample(t1)
                await asyncio.wait({verify}, timeout=interval)
            result = verify.result()
            await sampler.sample(t1)
            m2 = scrape(port)
            out["verify"] = result
            out["swap_in"] = series_rate(sampler.samples, "swapped_in", 0.25)
            out["swap_in"]["pages_per_s_verify"] = (
                out["swap_in"]["pages"] / result["seconds"] if result["seconds"] else None
            )
            n_in = metric_delta(m1, m2, "vmmem_swap_io_seconds_count", direction="in")
            io_in = metric_delta(m1, m2, "vmmem_swap_io_seconds_sum", direction="in")
            f_n = metric_delta(
                m1, m2, "vmmem_platform_fault_service_seconds_count", reason="swap_in"
            )
            f_s = metric_delta(m1, m2, "vmmem_platform_fault_service_seconds_sum", reason="swap_in")
            out["swap_in"]["diagnosis"] = {
                "reads": n_in,
                "read_in_executor_mean_us": io_in / n_in * 1e6 if n_in else None,
                "fault_service_mean_us": f_s / f_n * 1e6 if f_n else None,
                "agent_fault_latency_s": (await _ctl(agent_ctl, "results"))[
                    "fault_latency_seconds"
                ],
            }
    finally:
        client.close()
    return out


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the subprocesses started inside (then restore them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def daemon_run(
    directory: Path,
    label: str,
    extra: Sequence[str],
    limit: str,
    with_swap_in: bool,
    interval: float,
    agent_env: dict[str, str] | None = None,
    memory: str = "cold",
) -> dict[str, Any]:
    """Start the daemons, run one scenario, always stop them and remove their files.

    ``agent_env`` sets ``VMMEM_*`` settings of the agent only (e.g. its poll interval, which
    has no flag).
    """
    tmp = Path(tempfile.mkdtemp(prefix="vmb-swap-", dir="/tmp"))  # short socket paths
    swap_path = directory / f"vmb-swap-{os.getpid()}-{label}.swap"
    host = f"{max(512, 2 * GUEST // MiB)}MiB"
    swap_size = f"{max(1024, GUEST // MiB)}MiB"
    d = Daemons(tmp, Path("/dev/shm"), tmp / "p.sock")
    port = free_port()
    try:
        d.start_platform(
            "--host-memory",
            host,
            "--swap-file",
            str(swap_path),
            "--swap-size",
            swap_size,
            # Swap only: the guest's memory is all its programs' (the fill), so its balloon
            # can take nothing, and memsched would first give it the share a low working-set
            # estimate leaves it room for, then hand that share to swap a window (1 s) later
            # (balance.py): the figure here is the swap path's rate, not that policy's delay.
            "--no-balloon",
            "--log-level",
            "warning",
            *extra,
            metrics_port=port,
        )
        with _environ(**(agent_env or {})):
            d.start_agent("a", "--log-level", "warning", memory=f"{GUEST // MiB}MiB", vcpus=2)
        result = asyncio.run(
            _daemon_scenario(
                d, port, GUEST // PAGE_SIZE, host, limit, with_swap_in, interval, memory, directory
            )
        )
        result["config"] = {
            "host_memory": host,
            "guest_memory": f"{GUEST // MiB}MiB",
            "limit": limit,
            "swap_size": swap_size,
            "extra_flags": list(extra),
            "slot_capacity": slot_capacity_for(GUEST // PAGE_SIZE),
            "balloon": False,
            "agent_env": agent_env or {},
            "memory": memory,
        }
        return result
    except BaseException:
        print(d.dump_logs(), file=sys.stderr)
        raise
    finally:
        d.stop()
        with contextlib.suppress(FileNotFoundError):
            swap_path.unlink()  # the daemon removes it at exit; a killed one does not
        shutil.rmtree(tmp, ignore_errors=True)


# ---- (b) one round, in process ---------------------------------------------------------------


class _StubConnection:
    """Stands in for a PlatformConnection: the engine and memsched only send through it."""

    vm: Any = None

    def send(self, message: Message, request_id: int = 0) -> None:
        pass


def _server(
    tmp: Path, directory: Path, guest_pages: int, swap_pages: int, slot_capacity: int | None
) -> PlatformServer:
    """A daemon without socket or metrics; its shared files in ``tmp`` (own subdirectory of
    /dev/shm, so several can live in this process at once). ``slot_capacity`` None: the
    daemon's default for the guest's size."""
    cfg = PlatformConfig(
        socket=tmp / "unused.sock",
        host_memory=guest_pages * PAGE_SIZE + 64 * MiB,
        numa_nodes=1,
        metrics_port=-1,
        mem_dir=tmp,
        swap_file=directory / f"{tmp.name}.swap",
        swap_size=swap_pages * PAGE_SIZE,
        slot_capacity=slot_capacity,
        log_level="warning",
    )
    return PlatformServer(cfg)


def _expose_all(
    server: PlatformServer, guest_pages: int, content_pages: int, name: str = "bench"
) -> tuple[Any, Any]:
    """Register one VM and expose every page on its own frame; real bytes in the first ones."""
    conn = _StubConnection()
    server.registry.register(conn, Register(name=name, guest_pages=guest_pages, vcpus=1))  # type: ignore[arg-type]
    vm = conn.vm
    frames = server.machine.allocator.allocate(guest_pages, vm.home_node)
    bpns = np.arange(guest_pages, dtype=np.int64)
    server.faults.map_private(vm, bpns, frames)
    fill = random_pages(BATCH, 31)
    for start in range(0, content_pages, BATCH):  # write (not just map) what will be swapped
        chunk = frames[start : start + BATCH]
        server.machine.frames[chunk] = fill[: len(chunk)]
    exposure = ExposureTable(guest_pages)
    exposure.install(bpns, frames, np.ones(guest_pages, dtype=bool))
    return vm, SwapFilter(exposure)


def _want(server: PlatformServer, vm: Any, pages: int) -> None:
    """Set the VM's swap target so that exactly ``pages`` more are wanted."""
    svc = server.services_swap()
    ms = server.memsched
    ms.reclaiming = True
    swapped = vm.stats.swapped_out - vm.stats.swapped_in
    ms.swap_targets[vm.vm_id] = swapped + svc.in_flight.get(vm.vm_id, 0) + pages


def _one_batch(
    server: PlatformServer, vm: Any, state: Any, agent: SwapFilter, times: dict[str, list[float]]
) -> int:
    """GetRequest (issue) → agent filter → CompleteRequest; pages accepted."""
    clock = time.perf_counter
    t0 = clock()
    req = server.engine.get_request(vm, state, GetRequest(Priority.HIGH))
    t1 = clock()
    if not req.has_work:
        return 0
    slot = vm.region.slot(req.slot)
    bpns, status, mpns = slot.batch(req.count)
    accepted = agent.process(bpns, mpns, status)
    t2 = clock()
    server.engine.complete(vm, state, CompleteRequest(req.slot, req.count, req.seq, 0))
    t3 = clock()
    times["get_request_us"].append((t1 - t0) * 1e6)
    times["agent_filter_us"].append((t2 - t1) * 1e6)
    times["complete_us"].append((t3 - t2) * 1e6)
    return len(accepted)


class _RoundBench:
    """One in-process daemon with one fully exposed VM, for timing rounds."""

    def __init__(
        self, directory: Path, guest_bytes: int, rounds: int, slot_capacity: int | None = BATCH
    ) -> None:
        self.guest_pages = guest_bytes // PAGE_SIZE
        self.tmp = Path(tempfile.mkdtemp(prefix="vmb-swap-", dir="/dev/shm"))
        self.server: PlatformServer | None = None
        self.server = _server(
            self.tmp, directory, self.guest_pages, (rounds + 4) * BATCH, slot_capacity
        )
        self.vm, self.agent = _expose_all(self.server, self.guest_pages, (rounds + 2) * BATCH)
        self.state = self.server.rounds[self.vm.vm_id]
        self.times: dict[str, list[float]] = {
            k: []
            for k in ("get_request_us", "agent_filter_us", "complete_us", "close_us", "round_us")
        }
        self.times["write_us"] = []

    async def round(self) -> None:
        """One full round for one 512-page batch; then its write, timed apart."""
        server, vm, state, times = self.server, self.vm, self.state, self.times
        assert server is not None
        _want(server, vm, BATCH)
        t0 = time.perf_counter()
        got = _one_batch(server, vm, state, self.agent, times)
        t1 = time.perf_counter()
        end = server.engine.get_request(vm, state, GetRequest(Priority.HIGH))  # closes it
        t2 = time.perf_counter()
        assert got == BATCH and not end.has_work and not state.open, (got, end)
        times["close_us"].append((t2 - t1) * 1e6)
        times["round_us"].append((t2 - t0) * 1e6)
        if server.tasks:  # the swap write complete() started
            await asyncio.wait(set(server.tasks))
            times["write_us"].append((time.perf_counter() - t2) * 1e6)

    def summary(self, skip: int) -> dict[str, Any]:
        kept = {k: v[skip:] for k, v in self.times.items()}
        return {
            "guest_pages": self.guest_pages,
            "reps": len(kept["round_us"]),
            **{k: median(v) for k, v in kept.items()},
            "round_p90_us": float(np.quantile(kept["round_us"], 0.9)),
        }

    async def close(self) -> None:
        try:
            if self.server is not None:
                await self.server.shutdown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


async def round_costs(
    directory: Path, sizes: dict[str, int], reps: int, warmup: int = 10
) -> dict[str, Any]:
    """Rounds on VMs of each size, interleaved (ABAB…) so machine noise hits all alike."""
    benches: dict[str, _RoundBench] = {}
    try:
        for label, size in sizes.items():
            benches[label] = _RoundBench(directory, size, warmup + reps)
        for _ in range(warmup + reps):
            for bench in benches.values():
                await bench.round()
        for bench in benches.values():
            assert bench.vm.stats.swapped_out == (warmup + reps) * BATCH, bench.vm.stats
        return {label: bench.summary(warmup) for label, bench in benches.items()}
    finally:
        for bench in benches.values():
            await bench.close()


async def _pipeline(directory: Path, guest_bytes: int, batches: int) -> dict[str, Any]:
    """Daemon-side swap-out capacity: ``batches`` x 512 pages, in the batches the daemon's
    default slots for this guest take, back to back, writes overlapping, no sockets."""
    bench = _RoundBench(directory, guest_bytes, batches, slot_capacity=None)
    recycle_memory(directory, 2 * batches * BATCH * PAGE_SIZE // MiB)
    try:
        server, vm = bench.server, bench.vm
        assert server is not None
        _want(server, vm, batches * BATCH)
        t0 = time.perf_counter()
        while vm.stats.swapped_out < batches * BATCH:
            if not _one_batch(server, vm, bench.state, bench.agent, bench.times):
                await asyncio.sleep(0.0005)  # round over or slots busy: let writes land
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - t0
        return {
            "pages": batches * BATCH,
            "seconds": elapsed,
            "pages_per_s": batches * BATCH / elapsed,
        }
    finally:
        await bench.close()


async def _swap_in_capacity(directory: Path, guest_bytes: int, batches: int) -> dict[str, Any]:
    """Daemon-side swap-in capacity, no sockets: swap ``batches`` batches out, then fault
    every swapped page back in order through the page-cache path (``try_swap_in_now``) with
    the agent's fault-around, as a guest walking its memory does; CPU time per page."""
    bench = _RoundBench(directory, guest_bytes, batches, slot_capacity=None)
    try:
        server, vm = bench.server, bench.vm
        assert server is not None
        _want(server, vm, batches * BATCH)
        while vm.stats.swapped_out < batches * BATCH:
            if not _one_batch(server, vm, bench.state, bench.agent, bench.times):
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0)
        server.memsched.reclaiming = False
        svc = server.services_swap()
        state = vm.p2m.state
        swapped = int(PageState.SWAPPED)
        faults = pages = 0
        t0, c0 = time.perf_counter(), time.process_time()
        # Plain ints: ``state[bpn] != PageState.SWAPPED`` (a NumPy scalar against an IntEnum)
        # cost ~1.3 µs per page here, half of the CPU per page this loop used to report.
        for bpn in np.flatnonzero(state == swapped).tolist():
            if state.item(bpn) != swapped:
                continue  # read ahead by an earlier fault
            reply = svc.try_swap_in_now(vm, bpn, 16)
            assert reply is not None, "not in the page cache"
            faults, pages = faults + 1, pages + len(reply.bpns)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "pages": pages,
            "faults": faults,
            "pages_per_s": pages / wall,
            "cpu_us_per_page": cpu / pages * 1e6,
        }
    finally:
        await bench.close()


# ---- report -----------------------------------------------------------------------------------


def _fmt(x: Any, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if isinstance(x, float | int) and abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    return f"{x:.3g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def print_table(res: dict[str, Any]) -> None:
    fs = res["filesystem"]
    print(
        f"swap directory {res['directory']}: {fs.get('fstype')} on {fs.get('source')} "
        f"(mount {fs.get('mount')}); {os.cpu_count()} CPUs; daemon runs: a "
        f"{res.get('guest_mib', 256)} MiB guest, host limit 64 MiB"
    )
    raw = res["raw"]
    rows: list[tuple[str, Any, str]] = []
    cold, fresh, rewrite, pread = (
        raw["pwrite_cold_pages_per_s"],
        raw["pwrite_fresh_pages_per_s"],
        raw["pwrite_rewrite_pages_per_s"],
        raw["pread_4k_pages_per_s"],
    )
    rows += [
        ("raw pwrite 2 MiB, new file, cold memory", cold, "pages/s"),
        ("raw pwrite 2 MiB, new file, reused memory", fresh, "pages/s"),
        ("raw pwrite 2 MiB, rewrite (page cache)", rewrite, "pages/s"),
        ("raw pread 4 KiB, one page per call", pread, "pages/s"),
        ("raw pread 64 KiB, 16 pages per call", raw["pread_64k_pages_per_s"], "pages/s"),
    ]
    for label, run in res["daemon"].items():
        so = run["swap_out"]
        ref_name = "cold" if run["config"]["memory"] == "cold" else "reused"
        ref = cold if ref_name == "cold" else fresh
        diag = so["diagnosis"]
        rows += [
            (
                f"daemon swap-out [{label}] from limit change",
                so["pages_per_s_from_start"],
                "pages/s",
            ),
            (f"daemon swap-out [{label}] while active", so["pages_per_s_active"], "pages/s"),
            (f"  ratio active / raw pwrite {ref_name}", so["pages_per_s_active"] / ref, ""),
            (
                f"  best 250 ms / raw pwrite {ref_name}",
                so["pages_per_s_best_250ms"] and so["pages_per_s_best_250ms"] / ref,
                "",
            ),
            ("  seconds before the first page went out", so["started_after_s"], "s"),
            (
                "  agent rounds / swap writes (batches)",
                f"{diag['agent_rounds']}/{diag['writes']:.0f}",
                "",
            ),
            ("  executor kernel time per page", so["cpu_us_per_page"]["daemon_threads_sys"], "us"),
        ]
        if "swap_in" in run:
            si = run["swap_in"]
            rows += [
                (f"daemon swap-in [{label}] (verify)", si["pages_per_s_active"], "pages/s"),
                ("  ratio / raw pread 4 KiB", si["pages_per_s_active"] / pread, ""),
                (
                    "  ratio / raw pread 64 KiB",
                    si["pages_per_s_active"] / raw["pread_64k_pages_per_s"],
                    "",
                ),
                ("  verify mismatches", run["verify"]["mismatches"], ""),
            ]
    pipe = res["inprocess"]["pipeline_256MiB"]
    rows += [
        ("in-process swap-out capacity (no sockets)", pipe["pages_per_s"], "pages/s"),
        ("  ratio / raw pwrite reused", pipe["pages_per_s"] / fresh, ""),
        ("  ratio / raw pwrite cold", pipe["pages_per_s"] / cold, ""),
    ]
    sin = res["inprocess"].get("swap_in_256MiB")
    if sin is not None:
        rows += [
            ("in-process swap-in capacity (page cache)", sin["pages_per_s"], "pages/s"),
            (
                "  ratio / raw pread 4 KiB",
                sin["pages_per_s"] / res["raw"]["pread_4k_pages_per_s"],
                "",
            ),
            ("  pages per fault", sin["pages"] / sin["faults"], ""),
            ("  CPU per page", sin["cpu_us_per_page"], "us"),
        ]
    bd = res["breakdown"]
    rows += [
        ("512-page write: gather frames (no longer done)", bd["write_gather_us"], "us"),
        ("512-page write: reorder copy (old write_pages)", bd["write_reorder_copy_us"], "us"),
        ("512-page write: xxh3 checksums", bd["write_checksums_us"], "us"),
        ("512-page write: pwrite (fresh)", bd["write_pwrite_fresh_us"], "us"),
        ("512-page write: SwapFile.write_frames", bd["write_frames_us"], "us"),
        ("512-page write: same on the writer thread", bd["write_frames_on_writer_us"], "us"),
        ("1-page read: SwapFile.read_pages", bd["read_one_page_us"], "us"),
        ("1-page read: same via run_in_executor", bd["read_one_page_in_executor_us"], "us"),
    ]
    for key in ("round_256MiB", "round_2GiB"):
        r = res["inprocess"][key]
        rows += [
            (f"one round, 1 x 512-page batch, {key[6:]} guest", r["round_us"], "us"),
            (
                "  get_request / filter / complete / close",
                "/".join(
                    f"{r[k]:.0f}"
                    for k in ("get_request_us", "agent_filter_us", "complete_us", "close_us")
                ),
                "us",
            ),
            ("  its swap write (apart)", r["write_us"], "us"),
        ]
    rows.append(("round ratio 2 GiB / 256 MiB", res["inprocess"]["round_ratio"], ""))
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"  {name:<{width}}  {_fmt(value):>12} {unit}")


def main(argv: list[str] | None = None) -> int:
    global GUEST
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="directory of the swap file and the raw I/O test (default /var/tmp)",
    )
    p.add_argument(
        "--guest-mib",
        type=int,
        default=1024,
        help="guest of the daemon runs (default 1024, a steady state: its swap-out lasts"
        " ~0.3 s; at 256 it lasts 0.07-0.1 s, mostly the pipeline's start and end)",
    )
    args = p.parse_args(argv)
    GUEST = args.guest_mib * MiB  # the daemon runs' guest and the raw I/O's size
    configure_logging("console", "warning")  # the in-process daemon's info lines are noise here
    shorten_switch_interval()  # the in-process runs' GIL as the daemon's (platform_daemon/cli.py)
    quick = args.quick
    directory: Path = args.dir.resolve()
    res: dict[str, Any] = {
        "directory": str(directory),
        "filesystem": filesystem_of(directory),
        "quick": quick,
        "cpus": os.cpu_count(),
        "guest_mib": GUEST // MiB,
    }
    raw_pages = GUEST // PAGE_SIZE
    raw_reps = 2 if quick else 3
    reads = 8192 if quick else 32768
    t_start = time.perf_counter()
    raws = [raw_io(directory, raw_pages, raw_reps, reads)]
    res["breakdown"] = asyncio.run(swapfile_breakdown(directory, 30 if quick else 100))
    poll_1ms = {"VMMEM_POLL_INTERVAL": "0.001"}
    runs: list[tuple[str, bool, dict[str, str], str]] = [  # label, swap-in, agent env, memory
        ("default_cold", True, {}, "cold"),
        ("default_warm", False, {}, "warm"),
        # Diagnosis: the agent polls its pending word every millisecond instead of every
        # 50 ms, so a round that ends with work still pending is followed at once by the
        # next one (see docs/performance.md, "Swap").
        ("poll_1ms_warm", False, poll_1ms, "warm"),
        ("poll_1ms_cold", False, poll_1ms, "cold"),
    ]
    if quick:
        runs = [r for r in runs if r[0] in ("default_cold", "poll_1ms_warm")]
    res["daemon"] = {
        label: daemon_run(directory, label, [], "64MiB", swap_in, 0.01, env, memory)
        for label, swap_in, env, memory in runs
    }
    raws.append(raw_io(directory, raw_pages, raw_reps, reads))  # after: the same conditions
    res["raw_runs"] = raws
    # The machine's limit is its best state in this run: the free page reporting of this VM
    # swings a raw rate 2x between runs minutes apart ("This VM's memory" in
    # docs/performance.md), and a median with a cold run in it would flatter every ratio.
    res["raw"] = {k: max(r[k] for r in raws) for k in raws[0]}
    reps = 30 if quick else 100
    rounds = asyncio.run(round_costs(directory, {"256MiB": 256 * MiB, "2GiB": 2048 * MiB}, reps))
    res["inprocess"] = {
        "round_256MiB": rounds["256MiB"],
        "round_2GiB": rounds["2GiB"],
        "pipeline_256MiB": asyncio.run(_pipeline(directory, 256 * MiB, 32 if quick else 96)),
        "swap_in_256MiB": asyncio.run(_swap_in_capacity(directory, 256 * MiB, 32 if quick else 96)),
    }
    ip = res["inprocess"]
    ip["round_ratio"] = ip["round_2GiB"]["round_us"] / ip["round_256MiB"]["round_us"]
    res["elapsed_seconds"] = time.perf_counter() - t_start
    print_table(res)
    print(f"  (elapsed {res['elapsed_seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
