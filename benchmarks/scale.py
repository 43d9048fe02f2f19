"""A host of 1, 8 and 32 VMs: idle cost, metadata per page, RSS, faults under load, round cost.

Issue 10's scale table. For each host size, with real daemons (``vmmem-platform`` and one
``vmmem-vmm`` per VM, as subprocesses):

(a) **Idle**: after the VMs registered and settled, the CPU time (``/proc``) each process used
    over ``--idle-seconds``, as a percentage of one CPU: the daemon's per VM and each agent's.
    Aim: below 1 % of one CPU per VM, for daemon and agents alike.
(b) **Metadata**: bytes per guest page the daemon keeps for each VM, and the host's per
    frame, from the daemon's ``footprint`` op; the agent's VMM metadata per guest page
    (apart from the guest model, which stands in for the guest and the oracle), from each
    agent's ``footprint`` op. Aim: at most 24 B per guest page on each side.
(c) **RSS** of the daemon and of each agent (the machine memory mapping counts in RSS once
    touched: the daemon's figure includes the guest frames it zeroed, and a second time the
    frames its page moves read through the read-only mapping, ``MachineMemory.source``).
(d) **Loaded**: the load generator's overcommit scenario on every VM, host limit 75 % of
    the guests; the daemon's CPU per second while it runs, the fault latency p50/p99 over all
    VMs (the VMs' own percentiles, median across VMs, and the worst VM's p99), and that every
    page verified.
(e) **Round cost** in-process (no sockets): one high-priority round of one 512-page swap
    batch for one VM, with 1 and with 32 VMs registered on the same daemon, interleaved.
    Aim: 32 VMs against 1 at most 1.2x (no per-round cost grows with the number of VMs).

Usage: ``python benchmarks/scale.py [--sizes 1,8,32] [--guest 32MiB] [--json out.json]
[--quick]``. Every subprocess is stopped and every file removed in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.swap import BATCH, _expose_all, _one_batch, _want  # noqa: E402
from platform_daemon.server import PlatformServer  # noqa: E402
from shared.config import PlatformConfig  # noqa: E402
from shared.constants import PAGE_SIZE, Priority  # noqa: E402
from shared.messages import GetRequest  # noqa: E402
from shared.sizes import parse_size  # noqa: E402
from tests.procs import BIN, Daemons, ctl  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def cpu_percent(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's CPU over ``seconds`` of wall time, in % of one CPU."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: 100 * (cpu_seconds(p) - before[k]) / wall for k, p in pids.items()}


async def _gather_ctl(paths: list[Path], op: str) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(ctl(p, op) for p in paths)))


def host_run(
    n: int, guest: int, idle_seconds: float, load_seconds: float, tmp: Path
) -> dict[str, Any]:
    """One host of ``n`` VMs: idle figures, metadata, RSS, then the overcommit scenario."""
    mem_dir = Path(tempfile.mkdtemp(prefix="vmb-scale-", dir="/dev/shm"))
    run_dir = tmp / f"n{n}"
    run_dir.mkdir()
    d = Daemons(run_dir, mem_dir, run_dir / "p.sock")
    swap = Path("/var/tmp") / f"vmb-scale-{os.getpid()}-{n}.swap"
    out: dict[str, Any] = {"vms": n, "guest_bytes": guest}
    try:
        # vm00 has twice the memory of the others: the difference gives the bytes each
        # added guest page costs, apart from what a VM costs whatever its size.
        host = (n + 1) * guest + 64 * MiB
        d.start_platform(
            "--host-memory", str(host), "--swap-file", str(swap), "--swap-size", str(host)
        )
        t0 = time.monotonic()
        for i in range(n):
            d.start_agent(f"vm{i:02d}", memory=str(guest * (2 if i == 0 else 1)), vcpus=1)
        out["start_seconds"] = round(time.monotonic() - t0, 2)
        time.sleep(3.0)  # registration and the first rounds settle
        assert d.platform is not None
        pids = {"platform": d.platform.pid, **{k: p.pid for k, p in d.agents.items()}}
        idle = cpu_percent(pids, idle_seconds)
        agents = [v for k, v in idle.items() if k != "platform"]
        out["idle"] = {
            "seconds": idle_seconds,
            "daemon_percent": round(idle["platform"], 3),
            "daemon_percent_per_vm": round(idle["platform"] / n, 3),
            "agent_percent_median": round(median(agents), 3),
            "agent_percent_max": round(max(agents), 3),
        }
        out["rss_mib"] = {
            "daemon": round(rss_mib(pids["platform"]), 1),
            "agent_median": round(
                median([rss_mib(p) for k, p in pids.items() if k != "platform"]), 1
            ),
        }
        fp = asyncio.run(ctl(d.socket, "footprint"))
        agent_fp = asyncio.run(_gather_ctl([d.control_socket(k) for k in d.agents], "footprint"))
        out["metadata"] = {
            "daemon_bytes_per_page": median([v["bytes_per_page"] for v in fp["vms"]]),
            "daemon_bytes_per_added_page": slope(fp["vms"], "bytes"),
            "agent_vmm_bytes_per_added_page": slope(agent_fp, "vmm_bytes"),
            "daemon_by_owner": fp["vms"][0]["by_owner"],
            "host_bytes_per_frame": fp["host"]["bytes_per_frame"],
            "agent_vmm_bytes_per_page": median([a["vmm_bytes_per_page"] for a in agent_fp]),
            "agent_vmm_by_part": agent_fp[0]["vmm_by_part"],
            "agent_guest_model_bytes_per_page": median(
                [a["guest_model_bytes_per_page"] for a in agent_fp]
            ),
        }
        out["loaded"] = loaded(d, n, guest, load_seconds, run_dir)
    finally:
        d.stop()
        shutil.rmtree(mem_dir, ignore_errors=True)
        swap.unlink(missing_ok=True)
    return out


def slope(entries: list[dict[str, Any]], key: str) -> float | None:
    """Bytes per guest page between the largest VM and the median of the others (None with
    one VM): what a page costs beyond each VM's fixed cost."""
    if len(entries) < 2:
        return None
    big = max(entries, key=lambda e: e["guest_pages"])
    rest = [e for e in entries if e is not big]
    pages = big["guest_pages"] - median([e["guest_pages"] for e in rest])
    return round((big[key] - median([e[key] for e in rest])) / pages, 2) if pages else None


def loaded(d: Daemons, n: int, guest: int, seconds: float, run_dir: Path) -> dict[str, Any]:
    """The overcommit scenario on every VM: daemon CPU per second, fault latency, verify."""
    assert d.platform is not None
    report = run_dir / "load.json"
    limit = int(0.75 * (n + 1) * guest) // PAGE_SIZE * PAGE_SIZE
    cmd = [
        str(BIN / "vmmem-load"),
        "--socket", str(d.socket),
        "--scenario", "overcommit",
        "--host-limit", str(limit),
        "--expect-vms", str(n),
        "--duration", str(seconds),
        "--json", str(report),
        "--no-progress",
    ]  # fmt: skip
    c0, t0 = cpu_seconds(d.platform.pid), time.monotonic()
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds * 10 + 300, check=False
    )
    wall = time.monotonic() - t0
    daemon_cpu = cpu_seconds(d.platform.pid) - c0
    if not report.exists():
        return {"error": f"load generator exit {res.returncode}: {res.stderr[-500:]}"}
    rep = json.loads(report.read_text())
    vms = rep["vms"].values() if isinstance(rep["vms"], dict) else rep["vms"]
    lat = [v["fault_latency_seconds"] for v in vms if v.get("fault_latency_seconds")]
    p50 = [x["p50"] for x in lat if x.get("p50") is not None]
    p99 = [x["p99"] for x in lat if x.get("p99") is not None]
    return {
        "exit": res.returncode,
        "seconds": round(wall, 1),
        "daemon_cpu_percent": round(100 * daemon_cpu / wall, 1),
        "faults": sum(v["faults"] for v in vms),
        "fault_p50_us_median": round(median(p50) * 1e6, 1) if p50 else None,
        "fault_p99_us_median": round(median(p99) * 1e6, 1) if p99 else None,
        "fault_p99_us_worst": round(max(p99) * 1e6, 1) if p99 else None,
        "mismatches": rep["verification"]["mismatches"],
        "unreachable": rep["verification"]["unreachable"],
    }


# ---- (e) round cost with 1 and 32 VMs registered ---------------------------------------------


class _Host:
    """An in-process daemon with ``vms`` fully exposed VMs; rounds are timed on the first."""

    def __init__(self, vms: int, guest_pages: int, rounds: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="vmb-scale-", dir="/dev/shm"))
        cfg = PlatformConfig(
            socket=self.tmp / "unused.sock",
            host_memory=(vms * guest_pages + (rounds + 2) * BATCH) * PAGE_SIZE + 64 * MiB,
            numa_nodes=1,
            metrics_port=-1,
            mem_dir=self.tmp,
            swap_file=Path("/var/tmp") / f"{self.tmp.name}.swap",
            swap_size=(rounds + 4) * BATCH * PAGE_SIZE,
            slot_capacity=BATCH,
            log_level="warning",
        )
        self.server = PlatformServer(cfg)
        self.vms = []
        for i in range(vms):
            # The first VM, whose rounds are timed, has a page for every batch swapped.
            pages = max(guest_pages, (rounds + 2) * BATCH) if i == 0 else guest_pages
            self.vms.append(_expose_all(self.server, pages, 0, name=f"vm{i:02d}"))
        self.times: list[float] = []
        self.cpu: list[float] = []

    async def round(self) -> None:
        vm, agent = self.vms[0]
        server, state = self.server, self.server.rounds[vm.vm_id]
        _want(server, vm, BATCH)
        scratch: dict[str, list[float]] = {
            k: [] for k in ("get_request_us", "agent_filter_us", "complete_us")
        }
        # The swap write starts inside the round on the writer thread and holds the GIL in
        # stretches: wall time would charge it to the round. The round's own cost is the
        # event loop thread's CPU time; wall time is kept beside it.
        t0, c0 = time.perf_counter(), time.thread_time()
        got = _one_batch(server, vm, state, agent, scratch)
        end = server.engine.get_request(vm, state, GetRequest(Priority.HIGH))
        self.cpu.append((time.thread_time() - c0) * 1e6)
        self.times.append((time.perf_counter() - t0) * 1e6)
        assert got == BATCH and not end.has_work, (got, end)
        if server.tasks:
            await asyncio.wait(set(server.tasks))

    async def close(self) -> None:
        try:
            await self.server.shutdown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


async def round_cost(
    counts: list[int], guest_pages: int, reps: int, warmup: int = 10
) -> dict[str, Any]:
    hosts: dict[int, _Host] = {}
    try:
        for c in counts:
            hosts[c] = _Host(c, guest_pages, reps + warmup)
        for _ in range(reps + warmup):
            for h in hosts.values():
                await h.round()
        res: dict[str, Any] = {}
        for c, h in hosts.items():
            res[f"{c}_vms_cpu_us"] = round(median(h.cpu[warmup:]), 1)
            res[f"{c}_vms_wall_us"] = round(median(h.times[warmup:]), 1)
        lo, hi = hosts[min(counts)], hosts[max(counts)]
        res["cpu_ratio"] = round(median(hi.cpu[warmup:]) / median(lo.cpu[warmup:]), 3)
        res["wall_ratio"] = round(median(hi.times[warmup:]) / median(lo.times[warmup:]), 3)
        return res
    finally:
        for h in hosts.values():
            await h.close()


def print_table(res: dict[str, Any]) -> None:
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end")
    head = (
        f"{'VMs':>4} {'idle daemon %/VM':>17} {'idle agent % med/max':>21} {'meta B/page d/a':>16}"
    )
    print(head + f" {'host B/frame':>12} {'RSS MiB d/a':>13} {'B/added page d/a':>17}")
    for h in res["hosts"]:
        i, m, r = h["idle"], h["metadata"], h["rss_mib"]
        print(
            f"{h['vms']:>4} {i['daemon_percent_per_vm']:>17.3f} "
            f"{i['agent_percent_median']:>10.2f}/{i['agent_percent_max']:<10.2f}"
            f"{m['daemon_bytes_per_page']:>8.1f}/{m['agent_vmm_bytes_per_page']:<7.1f}"
            f"{m['host_bytes_per_frame']:>12.1f} {r['daemon']:>6.0f}/{r['agent_median']:<6.0f}"
            f" {m['daemon_bytes_per_added_page'] or 0:>8.1f}/"
            f"{m['agent_vmm_bytes_per_added_page'] or 0:<8.1f}"
        )
    print(
        f"{'VMs':>4} {'loaded daemon %':>16} {'faults':>9} {'p50 µs':>9} {'p99 µs med':>11}"
        f" {'p99 worst':>10} {'mismatch':>9}"
    )
    for h in res["hosts"]:
        ld = h["loaded"]
        if "error" in ld:
            print(f"{h['vms']:>4} {ld['error']}")
            continue
        print(
            f"{h['vms']:>4} {ld['daemon_cpu_percent']:>16.1f} {ld['faults']:>9,} "
            f"{ld['fault_p50_us_median'] or 0:>9.0f} {ld['fault_p99_us_median'] or 0:>11.0f} "
            f"{ld['fault_p99_us_worst'] or 0:>10.0f} {ld['mismatches']:>9}"
        )
    rc = res["round_cost"]
    print(
        "one high-priority round (1 x 512-page swap batch): "
        + ", ".join(f"{k} {v}" for k, v in rc.items())
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,8,32", help="host sizes in VMs (default 1,8,32)")
    p.add_argument("--guest", default="32MiB", help="memory of each VM (default 32MiB)")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--load-seconds", type=float, default=20.0)
    p.add_argument("--quick", action="store_true", help="sizes 1,8; shorter phases")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.quick:
        sizes, a.idle_seconds, a.load_seconds = [s for s in sizes if s <= 8], 5.0, 10.0
    guest = parse_size(a.guest)
    tmp = Path(tempfile.mkdtemp(prefix="vmb-scale-"))
    t0 = time.monotonic()
    try:
        hosts = []
        for n in sizes:
            hosts.append(host_run(n, guest, a.idle_seconds, a.load_seconds, tmp))
            print(f"  {n} VMs done ({time.monotonic() - t0:.0f} s)", flush=True)
        rc = asyncio.run(round_cost([1, max(sizes)], 16384, 30 if a.quick else 60))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "sizes": sizes,
        "guest_bytes": guest,
        "hosts": hosts,
        "round_cost": rc,
        "load_average": os.getloadavg(),
        "elapsed_seconds": round(time.monotonic() - t0, 1),
    }
    print_table(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
