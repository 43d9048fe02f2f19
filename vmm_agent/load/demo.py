"""``make demo``: a platform daemon, three agents and the overcommit scenario, end to end.

Starts the daemon (256 MiB of host memory, a 512 MiB swap file) and three agents of 64 MiB,
limits the host to 128 MiB so the guests' working sets do not fit, runs ``vmmem-load``
(writes everywhere, hot/cold phases, three injected frame failures), prints its report,
stops everything with SIGTERM and checks that no file is left behind.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
METRICS_PORTS = (9470, 9471, 9472, 9473)


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start (exit {proc.poll()})")
        time.sleep(0.05)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmmem-demo-", dir="/tmp"))
    sock, swap = work / "platform.sock", work / "swap"
    logs = open(work / "daemons.log", "wb")  # noqa: SIM115 - shared by all children, closed below
    procs: list[subprocess.Popen[bytes]] = []
    code = 1
    try:
        platform = subprocess.Popen(
            [
                str(BIN / "vmmem-platform"),
                "--socket",
                str(sock),
                "--host-memory",
                "256MiB",
                "--swap-file",
                str(swap),
                "--swap-size",
                "512MiB",
                "--metrics-port",
                str(METRICS_PORTS[0]),
                "--log-format",
                "json",
            ],
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        procs.append(platform)
        wait_for(sock, platform)
        for i in range(3):
            ctl = work / f"vm{i + 1}.sock"
            agent = subprocess.Popen(
                [
                    str(BIN / "vmmem-vmm"),
                    "--socket",
                    str(sock),
                    "--name",
                    f"vm{i + 1}",
                    "--memory",
                    "64MiB",
                    "--vcpus",
                    "2",
                    "--control-socket",
                    str(ctl),
                    "--metrics-port",
                    str(METRICS_PORTS[i + 1]),
                    "--seed",
                    str(i),
                    "--log-format",
                    "json",
                ],
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
            procs.append(agent)
            wait_for(ctl, agent)
        print(
            f"platform and 3 VMs running (metrics on 127.0.0.1:{METRICS_PORTS[0]}-"
            f"{METRICS_PORTS[-1]}, logs in {work / 'daemons.log'})",
            flush=True,
        )
        report = Path("out") / "demo-report.json"
        report.parent.mkdir(exist_ok=True)
        code = subprocess.call(
            [
                str(BIN / "vmmem-load"),
                "--socket",
                str(sock),
                "--scenario",
                "overcommit",
                "--host-limit",
                "128MiB",
                "--duration",
                "24",
                "--inject-failures",
                "3",
                "--expect-vms",
                "3",
                "--json",
                str(report),
            ]
        )
        print(f"report written to {report}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                code = code or 1
        bad = [p.pid for p in procs if p.returncode not in (0, -signal.SIGTERM)]
        left = [str(p) for p in (sock, swap) if p.exists()]
        if bad or left:
            print(f"unclean stop: exit codes {bad}, files left {left}", file=sys.stderr)
            code = code or 1
        logs.close()
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
    print("demo: OK" if code == 0 else f"demo: FAILED (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
