"""Fault round trip against the real platform daemon, as ratios to this machine's own limits.

Usage::

    python benchmarks/fault_rtt.py [--json out.json] [--quick] [--cpus 0,1]

The script starts a real ``vmmem-platform`` subprocess (512 MiB of machine memory in a
directory under ``/dev/shm``, its socket under ``/tmp``), then for each placement of the two
processes (``same``: daemon and client pinned to one CPU; ``cross``: one CPU each) runs, in the
same run and interleaved over several repeats:

- the raw ping-pong of ``benchmarks/machine_limits.py`` (two uvloop processes, ~30-byte
  frames, placed the same way), and its blocking-socket variant;
- a client subprocess, pinned like the ping-pong client, that registers VMs with the real
  protocol (``RpcClient`` + ``Register``, machine memory and control region mapped as
  ``vmm_agent/agent.py`` does) and drives the agent's own ``FaultPath``:

  (a) fault round trip, one fault at a time, on untouched pages: write faults (first touch,
      a private zeroed frame) and read faults (the node's shared zero frame), as a vCPU sees
      it (``FaultPath.ensure``), and on the bare wire (``RpcClient.request_nowait``);
  (b) pages resolved per second by a sequential walk with fault-around off (``around=0``,
      one page per fault) and on (the agent's sequential hint, ``around=16``), with one and
      with several faults outstanding at once (one task per vCPU, each walking its range).

It also reads the CPU time both processes of each pair spend per round trip (their CPU
clocks, ``machine_limits.CpuMeter``) and scrapes the daemon's own
``vmmem_platform_fault_service_seconds`` histogram, so the table shows where a round trip
goes: client, daemon, daemon handler. Results are medians over the
repeats (ratios: medians of each repeat's ratio to the ping-pong run beside it); the headlines
are ``fault p50 / raw ping-pong p50`` (aim: within 3x) and the CPU per round trip of both
processes against the ping-pong's (aim: within 2.5x; it does not depend on wakeup latency).
The daemon is always stopped and its files removed, even on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import machine_limits as ml  # noqa: E402
from shared.constants import PAGE_SIZE  # noqa: E402
from shared.layout import ControlRegion  # noqa: E402
from shared.messages import Fault, Register, Registered  # noqa: E402
from shared.shm import frames_view, open_mapped  # noqa: E402
from vmm_agent.exposure import ExposureTable  # noqa: E402
from vmm_agent.fault_path import FaultPath  # noqa: E402
from vmm_agent.rpc import RpcClient  # noqa: E402

THIS = Path(__file__).resolve()
BIN = Path(sys.executable).parent
HOST_MEMORY = "512MiB"
AROUND = 16
#: Faults outstanding at once in the concurrent runs (one task each, like vCPUs).
CONCURRENCY = 8

QUICK = {"reps": 3, "rtt": 400, "warmup": 50, "faults": 200, "pingpong": 1500, "limits": 3}
FULL = {"reps": 5, "rtt": 3000, "warmup": 200, "faults": 2000, "pingpong": 5000, "limits": 5}


# ---- the client subprocess (the VMM side) ----------------------------------------------------


class BenchVM:
    """One registered VM: the agent's link, mappings, exposure table and fault path."""

    async def open(self, sock: str, name: str, guest_pages: int) -> BenchVM:
        """Register as ``vmm_agent/agent.py`` does and map machine memory and the region."""
        self.link = await RpcClient.connect(sock, on_message=lambda _m: None)
        reg: Registered = await self.link.request(
            Register(name=name, guest_pages=guest_pages, vcpus=CONCURRENCY, pid=os.getpid()),
            timeout=10,
        )
        self.machine = open_mapped(Path(reg.machine_memory_path), reg.host_pages * PAGE_SIZE)
        self.frames = frames_view(self.machine)
        self.region_file = open_mapped(Path(reg.control_region_path))
        self.region = ControlRegion(self.region_file.mm)
        if self.region.vm_id != reg.vm_id or self.region.generation != reg.generation:
            raise RuntimeError("control region does not belong to this VM")
        self.exposure = ExposureTable(guest_pages)
        self.faults = FaultPath(self.link, self.exposure, 64, around=AROUND)
        return self

    async def close(self) -> None:
        """Disconnect: the daemon releases every frame of the VM."""
        self.link.close()
        await asyncio.wait_for(asyncio.shield(self.link.closed), 5)
        del self.frames
        del self.region
        self.machine.close()
        self.region_file.close()

    def check(self, bpns: np.ndarray, write: bool) -> None:
        """Every faulted page is exposed: private zeroed writable frames, or the zero frame."""
        frames = self.exposure.frame[bpns]
        if np.any(frames < 0):
            raise RuntimeError(f"{int(np.count_nonzero(frames < 0))} pages left unexposed")
        writable = self.exposure.writable[bpns]
        if write:
            if not writable.all() or len(np.unique(frames)) != len(frames):
                raise RuntimeError("write faults did not map private writable frames")
            if np.any(self.frames[frames[:: max(1, len(frames) // 64)]]):
                raise RuntimeError("a freshly mapped frame is not zero")
        elif writable.any() or len(np.unique(frames)) > 8:
            raise RuntimeError("read faults did not map the shared zero frame")


async def _one_at_a_time(
    spec: dict[str, Any], name: str, write: bool, bare: bool
) -> dict[str, Any]:
    """Faults one at a time on new untouched pages: FaultPath.ensure, or the bare RpcClient."""
    n, warmup = spec["rtt"], spec["warmup"]
    vm = await BenchVM().open(spec["socket"], name, n + warmup)
    clock = time.perf_counter_ns
    samples = np.empty(n, dtype=np.int64)
    meter = ml.CpuMeter(spec["daemon_pid"])
    ensure, request = vm.faults.ensure, vm.link.request_nowait
    try:
        for i in range(-warmup, n):
            if i == 0:
                vm.faults.reset_latencies()
                meter.start()
            t0 = clock()
            if bare:
                await request(Fault(i + warmup, write, 0))
            else:
                await ensure(i + warmup, write)
            if i >= 0:
                samples[i] = clock() - t0
        cpu = meter.per(n, peer="daemon")
        vm.check(np.arange(n + warmup), write)
        inner = vm.faults.latency_quantiles()
    finally:
        await vm.close()
    out = {**ml.quantiles_us(samples), **cpu}
    if not bare:
        out["request_p50_us"] = inner["p50"] * 1e6
        out["request_p99_us"] = inner["p99"] * 1e6
    return out


async def _walk(
    spec: dict[str, Any], name: str, write: bool, around: bool, tasks: int
) -> dict[str, Any]:
    """A sequential walk of ``tasks`` contiguous ranges at once; pages resolved per second."""
    pages = spec["faults"] * ((AROUND + 1) if around else 1)
    pages -= pages % tasks
    vm = await BenchVM().open(spec["socket"], name, pages)
    exposure, fp = vm.exposure, vm.faults
    per = pages // tasks

    async def vcpu(lo: int, hi: int) -> None:
        frame, writable = exposure.frame, exposure.writable
        for bpn in range(lo, hi):  # the vCPU's own check, as vmm_agent/vcpu.py does it
            if frame[bpn] < 0 or (write and not writable[bpn]):
                await fp.ensure(bpn, write, sequential=around)

    try:
        meter = ml.CpuMeter(spec["daemon_pid"])
        t0 = time.perf_counter()
        await asyncio.gather(*(vcpu(k * per, (k + 1) * per) for k in range(tasks)))
        elapsed = time.perf_counter() - t0
        cpu = meter.per(max(1, fp.faults), peer="daemon")
        vm.check(np.arange(pages), write)
    finally:
        await vm.close()
    return {
        "pages": pages,
        "faults": fp.faults,
        "seconds": elapsed,
        "pages_per_s": pages / elapsed,
        "faults_per_s": fp.faults / elapsed,
        "pages_per_fault": pages / max(1, fp.faults),
        **cpu,
    }


def walk_key(write: bool, around: bool, tasks: int) -> str:
    kind = "write" if write else "read"
    return f"{kind}, around={AROUND if around else 0}, {tasks} outstanding"


async def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything the client measures in one placement; every VM has a unique name."""
    tag = spec["tag"]
    out: dict[str, Any] = {"rtt": {}, "walk": {}}
    for write in (True, False):
        kind = "write" if write else "read"
        out["rtt"][kind] = await _one_at_a_time(spec, f"{tag}-{kind}", write, bare=False)
    out["rtt"]["write_bare"] = await _one_at_a_time(spec, f"{tag}-bare", True, bare=True)
    for write in (True, False):
        for around in (False, True):
            for tasks in (1, CONCURRENCY):
                name = f"{tag}-walk{len(out['walk'])}"
                out["walk"][walk_key(write, around, tasks)] = await _walk(
                    spec, name, write, around, tasks
                )
    return out


# ---- the orchestrator ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """The real platform daemon as a subprocess; ``stop()`` always leaves nothing behind."""

    def __init__(self, workdir: Path, mem_dir: Path) -> None:
        self.socket = workdir / "p.s"
        self.log = workdir / "platform.log"
        self.port = free_port()
        cmd = [str(BIN / "vmmem-platform"), "--socket", str(self.socket), "--mem-dir",
               str(mem_dir), "--metrics-port", str(self.port), "--host-memory", HOST_MEMORY,
               "--max-fault-around", str(AROUND), "--log-format", "json",
               "--log-level", "warning"]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError("daemon socket did not appear")
            time.sleep(0.02)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def fault_service(self) -> dict[str, tuple[float, float]]:
        """(sum seconds, count) of the daemon's fault handler histogram, by reason."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, list[float]] = {}
        for line in text.splitlines():
            for suffix, idx in (("_sum", 0), ("_count", 1)):
                head = f"vmmem_platform_fault_service_seconds{suffix}{{"
                if line.startswith(head):
                    reason = line.split('reason="', 1)[1].split('"', 1)[0]
                    out.setdefault(reason, [0.0, 0.0])[idx] = float(line.rsplit(" ", 1)[1])
        return {k: (v[0], v[1]) for k, v in out.items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_client(cpu: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The client subprocess, pinned to ``cpu``; its measurements as a dict."""
    cmd = [sys.executable, str(THIS), "_client", str(cpu), json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"fault client failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def service_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean daemon handler time per fault (µs) by reason, between two scrapes."""
    out = {}
    for reason, (s1, c1) in after.items():
        s0, c0 = before.get(reason, (0.0, 0.0))
        if c1 > c0:
            out[f"{reason}_mean_us"] = (s1 - s0) / (c1 - c0) * 1e6
    return out


def _median_tree(runs: list[Any]) -> Any:
    """Median, leaf by leaf, of a list of same-shaped nested dicts."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _median_tree([r[k] for r in runs if k in r]) for k in first}
    if isinstance(first, int | float):
        return float(statistics.median(runs))
    return first


def machine_info() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "affinity": ml.cpus(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _limits(workdir: Path, quick: bool, repeats: int) -> dict[str, Any]:
    total = (16 if quick else 64) << 20
    return {
        "memcpy": ml.memcpy_rate(rounds=8 if quick else 32, repeats=repeats),
        "hash": ml.hash_rate(pages=2048 if quick else 4096, repeats=repeats),
        "pwrite": ml.pwrite_rate(workdir, total=total, repeats=repeats),
    }


def run_benchmark(quick: bool, cpu_list: list[int] | None) -> dict[str, Any]:
    """Start the daemon, measure every placement ``reps`` times (interleaved), stop it."""
    cfg = QUICK if quick else FULL
    avail = cpu_list or ml.cpus()
    placements = ["same", "cross"] if len(avail) > 1 else ["same"]
    workdir = Path(tempfile.mkdtemp(prefix="vmb-", dir="/tmp"))
    mem_dir = Path(tempfile.mkdtemp(prefix="vmb-", dir="/dev/shm"))
    started = time.time()
    load_before = os.getloadavg()
    daemon: Daemon | None = None
    reps: dict[str, list[dict[str, Any]]] = {p: [] for p in placements}
    try:
        limits = _limits(workdir, quick, cfg["limits"])
        daemon = Daemon(workdir, mem_dir)
        for rep in range(cfg["reps"]):
            for placement in placements:
                server_cpu, client_cpu = ml.placement_cpus(placement, avail)
                ml.pin_process(daemon.proc.pid, server_cpu)
                pp = ml.pingpong(placement, cfg["pingpong"], 1, cpu_list=avail)
                ppb = ml.pingpong_blocking(placement, cfg["pingpong"], 1, cpu_list=avail)
                spec = {
                    "tag": f"{placement}{rep}",
                    "socket": str(daemon.socket),
                    "daemon_pid": daemon.proc.pid,
                    **{k: cfg[k] for k in ("rtt", "warmup", "faults")},
                }
                before = daemon.fault_service()
                res = run_client(client_cpu, spec)
                res["daemon_handler"] = service_means(before, daemon.fault_service())
                res["pingpong"], res["pingpong_blocking"] = pp, ppb
                res["cpus"] = {"daemon": server_cpu, "client": client_cpu}
                reps[placement].append(res)
                print(
                    f"  rep {rep + 1}/{cfg['reps']} {placement}: ping-pong {pp['p50_us']:.1f} µs,"
                    f" write fault {res['rtt']['write']['p50_us']:.1f} µs",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if daemon is not None:
            daemon.stop()
            if daemon.proc.returncode not in (0, -signal.SIGTERM):
                print(f"daemon exit {daemon.proc.returncode}:\n{daemon.logs()}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(mem_dir, ignore_errors=True)
    for runs in reps.values():  # ratios per repeat (the ping-pong ran beside it), then medians
        for res in runs:
            res["ratios"] = ratios(res)
    results = {p: _median_tree(r) for p, r in reps.items()}
    for res in results.values():
        pp = res["pingpong"]
        for w in res["walk"].values():  # pages resolved in the time of one raw ping-pong
            w["pages_per_pingpong"] = w["pages_per_s"] * pp["p50_us"] * 1e-6
    return {
        "benchmark": "fault_rtt",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "config": {
            **cfg,
            "host_memory": HOST_MEMORY,
            "around": AROUND,
            "concurrency": CONCURRENCY,
            "placements": placements,
            "cpus": avail,
        },
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": time.time() - started,
        "limits": limits,
        "results": results,
        "repeats": reps,
    }


def both_cpu(q: dict[str, float]) -> float:
    """CPU µs per round trip of both processes together (client and daemon or echo server)."""
    return q["client_cpu_us"] + q.get("server_cpu_us", q.get("daemon_cpu_us", float("nan")))


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """One repeat's ratios to the raw uvloop ping-pong measured beside it: wall p50 (aim
    <= 3x) and CPU of both processes per round trip (aim <= 2.5x; the figure that does not
    depend on the machine's wakeup latency)."""
    pp = res["pingpong"]
    out = {}
    for k, q in res["rtt"].items():
        out[f"{k}_p50/pingpong_p50"] = q["p50_us"] / pp["p50_us"]
        out[f"{k}_cpu/pingpong_cpu"] = both_cpu(q) / both_cpu(pp)
    out["write_p99/pingpong_p99"] = res["rtt"]["write"]["p99_us"] / pp["p99_us"]
    return out


RTT_ROWS = (
    ("raw ping-pong, uvloop (reference)", ("pingpong",)),
    ("raw ping-pong, blocking sockets", ("pingpong_blocking",)),
    ("write fault, FaultPath.ensure", ("rtt", "write")),
    ("read fault (zero frame), ensure", ("rtt", "read")),
    ("write fault, bare RpcClient request", ("rtt", "write_bare")),
)


def format_table(report: dict[str, Any]) -> str:
    """The human summary: absolute medians, ratios to the raw ping-pong, CPU per message."""
    res, lim = report["results"], report["limits"]
    lines = [
        f"fault_rtt  {report['date']}  {report['machine']['cpus']} CPUs  "
        f"medians of {report['config']['reps']} repeats  "
        f"load {report['loadavg_before'][0]:.2f} -> {report['loadavg_after'][0]:.2f}"
    ]
    for place, r in res.items():
        cpus = r["cpus"]
        lines.append(
            f"\n[{place}] daemon on CPU {cpus['daemon']:.0f}, client on CPU {cpus['client']:.0f}"
        )
        lines.append(
            f"  {'round trip, one fault at a time':<40}{'p50 µs':>8}{'p99 µs':>9}{'x pp':>6}"
            f"{'client CPU':>11}{'peer CPU':>9}{'both CPU':>9}{'CPU x pp':>9}"
        )
        for label, path in RTT_ROWS:
            q = r
            for key in path:
                q = q[key]
            peer = q.get("server_cpu_us", q.get("daemon_cpu_us", float("nan")))
            if path[0] == "rtt":  # medians of the per-repeat ratios
                wall = r["ratios"][f"{path[1]}_p50/pingpong_p50"]
                cpu = r["ratios"][f"{path[1]}_cpu/pingpong_cpu"]
            else:
                wall = q["p50_us"] / r["pingpong"]["p50_us"]
                cpu = both_cpu(q) / both_cpu(r["pingpong"])
            lines.append(
                f"  {label[:40]:<40}{q['p50_us']:>8.1f}{q['p99_us']:>9.1f}{wall:>6.2f}"
                f"{q['client_cpu_us']:>11.1f}{peer:>9.1f}{both_cpu(q):>9.1f}{cpu:>9.2f}"
            )
        w = r["rtt"]["write"]
        lines.append(
            f"  {'write fault, FaultPath request only':<40}{w['request_p50_us']:>8.1f}"
            f"{w['request_p99_us']:>9.1f}{w['request_p50_us'] / r['pingpong']['p50_us']:>6.2f}"
        )
        handler = r["daemon_handler"].get("first_touch_mean_us", float("nan"))
        lines.append(f"  {'daemon handler (histogram), mean':<40}{handler:>8.1f}")
    lines.append(
        "  (x pp: p50 / raw uvloop ping-pong p50 of the same placement, aim <= 3;"
        " CPU: µs of CPU per round trip;\n   both CPU: client + daemon (or echo server);"
        " CPU x pp: both CPU / the ping-pong's, aim <= 2.5; ratios are medians over repeats)"
    )
    head = "".join(f"{p + ' pages/s':>15}{'faults/s':>10}{'pg/pp':>7}" for p in res)
    lines.append(f"\n{'pages resolved (sequential walk)':<36}{head}")
    for key in next(iter(res.values()))["walk"]:
        cells = ""
        for r in res.values():
            w = r["walk"][key]
            cells += f"{w['pages_per_s']:>15,.0f}{w['faults_per_s']:>10,.0f}"
            cells += f"{w['pages_per_pingpong']:>7.2f}"
        lines.append(f"{key:<36}{cells}")
    lines.append("  (pg/pp: pages resolved in the time of one raw ping-pong p50, same placement)")
    mc = lim["memcpy"]
    lines.append("\nmachine limits (same run, medians)")
    lines.append(
        f"  memcpy contiguous {mc['contiguous_pages_per_s'] / 1e6:.2f} M pages/s, gather of"
        f" 512 random frames {mc['gather_pages_per_s'] / 1e6:.2f} M pages/s"
    )
    lines.append(
        f"  xxh3_64 {lim['hash']['xxh3_64_pages_per_s'] / 1e6:.2f} M pages/s,"
        f" pwrite 2 MiB blocks {lim['pwrite']['bytes_per_s'] / 1e9:.2f} GB/s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        cpu, spec = int(argv[1]), json.loads(argv[2])
        os.sched_setaffinity(0, {cpu})
        import uvloop

        print(json.dumps(uvloop.run(client_main(spec))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--json", type=Path, help="write the full report (every repeat) here")
    p.add_argument("--quick", action="store_true", help="fewer repeats and samples (< 30 s)")
    p.add_argument("--cpus", help="CPUs to place the processes on, e.g. 0,1 (default: all)")
    args = p.parse_args(argv)
    cpu_list = [int(c) for c in args.cpus.split(",")] if args.cpus else None
    report = run_benchmark(args.quick, cpu_list)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
