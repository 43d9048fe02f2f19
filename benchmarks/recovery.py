"""How long a daemon crash holds the guests up, and what the takeover costs, by host size.

For each size: a real daemon with a real swap file, four guests filling their memory under a
host limit of three quarters of it (so pages are swapping and swap writes are in flight), a
SIGKILL, and a new daemon started at once on the same socket, memory directory and swap
file. Reported, per size:

- **takeover**: the new daemon's own account (``platform_recovered``): reconciling the
  state files (every p2m, frame state and swap slot, vectorised) and adopting them (owners,
  merged frames re-hashed, control regions), in seconds and in guest pages per second;
- **machine limit** of the same run: one NumPy pass over the same number of bytes (the p2m
  arrays are 15 bytes per guest page), the floor for anything that reads them all;
- **startup**: process start to ``platform_started`` (Python and imports, machine memory
  mapped and prefaulted, takeover, socket bound), seen from the benchmark's log polling;
- **guest stall**: each agent's ``platform_resumed`` downtime, from losing the connection
  to carrying on (kill → exit → new process → takeover → reconnect backoff → resume);
- after the run, every page each guest wrote is read back (``verify``): 0 mismatches is
  the precondition of every figure, the benchmark fails otherwise.

Usage: ``python benchmarks/recovery.py [--quick] [--json out.json]``. Every process is stopped
and every file removed in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``tests/procs.py`` is not an installed package
    sys.path.insert(0, str(ROOT))

from platform_daemon.p2m import P2M  # noqa: E402
from tests.procs import Daemons  # noqa: E402
from vmm_agent.rpc import RpcClient  # noqa: E402

MiB = 1 << 20
P2M_BYTES_PER_PAGE = P2M.buffer_size(1)


async def _ctl(path: Path, op: str, **args: Any) -> dict[str, Any]:
    client = await RpcClient.connect(str(path))
    try:
        return await client.ctl(op, timeout=300, **args)
    finally:
        client.close()


def ctl(path: Path, op: str, **args: Any) -> dict[str, Any]:
    return asyncio.run(_ctl(path, op, **args))


def events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
    return out


def wait(pred: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)
    return value


def numpy_pass_seconds(nbytes: int) -> float:
    """One vectorised pass (a sum) over ``nbytes``: the floor for reading the p2ms."""
    data = np.ones(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        int(data.sum(dtype=np.uint64))
        best = min(best, time.perf_counter() - t0)
    return best


def one_size(guest_mib: int, vms: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="vmr", dir="/tmp"))
    mem = Path(tempfile.mkdtemp(prefix="vmr-mem-", dir="/dev/shm"))
    d = Daemons(tmp, mem, tmp / "p.sock")
    host = guest_mib * vms + 64
    args = [
        "--host-memory",
        f"{host}MiB",
        "--swap-file",
        str(tmp / "swap"),
        "--swap-size",
        f"{guest_mib * vms}MiB",
    ]
    names = [f"g{i}" for i in range(vms)]
    try:
        d.start_platform(*args)
        for name in names:
            d.start_agent(name, memory=f"{guest_mib}MiB", vcpus=2)
        ctl(d.socket, "set_host_limit", size=f"{guest_mib * vms * 3 // 4}MiB")
        phase = {
            "name": "fill",
            "duration": 3600.0,
            "working_set": 1.0,
            "write_ratio": 0.7,
            "distribution": "sequential",
        }
        for name in names:
            ctl(d.control_socket(name), "run_phase", phase=phase)
        # Swapping under way (a few thousand pages out: writes are in flight from then on).
        wait(lambda: ctl(d.socket, "status")["swap"]["used"] > 4096, timeout=600)
        assert d.platform is not None
        d.platform.send_signal(signal.SIGKILL)
        d.platform.wait(30)
        t0 = time.monotonic()
        d.start_platform(*args, log="platform2")
        wait(lambda: events(tmp / "platform2.log", "platform_started"))
        startup = time.monotonic() - t0
        recovered = events(tmp / "platform2.log", "platform_recovered")[0]
        downtime = [
            wait(lambda n=n: events(tmp / f"{n}.log", "platform_resumed"))[0]["downtime_seconds"]
            for n in names
        ]
        mismatches = 0
        for name in names:
            ctl(d.control_socket(name), "halt")
            v = ctl(d.control_socket(name), "verify")
            mismatches += v["mismatches"] + v["unreachable"]
        if mismatches:
            raise SystemExit(f"{mismatches} pages did not verify: the figures mean nothing")
        pages = guest_mib * vms * 256
        floor = numpy_pass_seconds(pages * P2M_BYTES_PER_PAGE)
        takeover = recovered["reconcile_seconds"] + recovered["adopt_seconds"]
        return {
            "guest_pages": pages,
            "host_mib": host,
            "pages_undone": recovered["pages_undone"],
            "swapped": recovered["pages"]["swapped"],
            "merged_frames": recovered["merged_frames"],
            "reconcile_seconds": recovered["reconcile_seconds"],
            "adopt_seconds": recovered["adopt_seconds"],
            "takeover_pages_per_second": pages / takeover,
            "numpy_pass_seconds": floor,
            "takeover_over_numpy_pass": takeover / floor,
            "startup_seconds": startup,
            "stall_seconds_median": statistics.median(downtime),
            "stall_seconds_max": max(downtime),
        }
    finally:
        d.stop(30)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write every figure as JSON")
    p.add_argument("--quick", action="store_true", help="small guests only")
    args = p.parse_args(argv)
    sizes = [16, 64] if args.quick else [16, 64, 256]
    res: dict[str, Any] = {"load_before": os.getloadavg(), "runs": []}
    for guest_mib in sizes:
        r = one_size(guest_mib, 4)
        res["runs"].append(r)
        print(
            f"4 x {guest_mib} MiB guests ({r['guest_pages']:,} pages, {r['swapped']:,} swapped, "
            f"{r['pages_undone']} in flight undone): takeover {r['reconcile_seconds'] * 1e3:.1f}"
            f" + {r['adopt_seconds'] * 1e3:.1f} ms ({r['takeover_pages_per_second'] / 1e6:.1f} M"
            f" pages/s, {r['takeover_over_numpy_pass']:.0f}x one NumPy pass over the p2ms); "
            f"startup {r['startup_seconds']:.2f} s; guest stall median "
            f"{r['stall_seconds_median']:.2f} s, max {r['stall_seconds_max']:.2f} s; 0 mismatches"
        )
    res["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
