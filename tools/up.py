"""``make up`` (``python -m tools.up``): the platform daemon and three VMs in the foreground.

Also Prometheus with ``deploy/prometheus.yml`` when ``prometheus`` is on PATH. Every line each
process writes comes out here, prefixed by its name. Ctrl-C (SIGINT; SIGTERM and SIGHUP too)
stops the agents first, so each says goodbye to the daemon, then the daemon (which removes its
socket and shared memory), then Prometheus; a process that does not stop within its time is
killed. The children run in their own process group, so a terminal's Ctrl-C reaches only this
process and the stop keeps that order. If a child exits by itself, everything stops, exit 1.

Exit status: 0 after a clean stop; 1 when a child failed or something was left behind; 2 on
bad flags or a start that failed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
#: The ports deploy/prometheus.yml scrapes: the daemon, then one per agent.
DEFAULT_PORT_BASE = 9470
STOP_SECONDS = 15.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make up",
        description="Run the VMMem platform daemon and its VMs in the foreground, with "
        "Prometheus when it is installed; logs interleaved, Ctrl-C stops everything.",
    )
    a = p.add_argument
    a("--vms", type=int, default=3, help="VMs to run (default 3)")
    a("--socket", type=Path, default=Path("/tmp/vmmem.sock"), help="daemon socket")
    a("--host-memory", default="256MiB", help="machine memory (default 256MiB)")
    a("--memory", default="64MiB", help="guest memory of each VM (default 64MiB)")
    a("--swap-size", default="256MiB", help="swap file size, 0 for none (default 256MiB)")
    a(
        "--port-base",
        type=int,
        default=DEFAULT_PORT_BASE,
        help="metrics port of the daemon; the VMs take the next ones (default 9470, as "
        "deploy/prometheus.yml scrapes)",
    )
    a(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run Prometheus (default: when `prometheus` is on PATH)",
    )
    a("--prometheus-port", type=int, default=9090, help="Prometheus web port (default 9090)")
    return p


class Printer:
    """Copies each child's output to stdout, whole lines at a time, prefixed by its name."""

    def __init__(self, width: int) -> None:
        self.width = width
        # The daemons' console logs are coloured; keep that for a terminal only.
        self.plain = not sys.stdout.isatty()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def say(self, name: str, line: str) -> None:
        if self.plain:
            line = ANSI_ESCAPE.sub("", line)
        with self.lock:
            sys.stdout.write(f"{name:<{self.width}} | {line.rstrip()}\n")
            sys.stdout.flush()

    def follow(self, name: str, stream: IO[bytes]) -> None:
        def pump() -> None:
            with stream:
                for raw in iter(stream.readline, b""):
                    self.say(name, raw.decode(errors="replace"))

        thread = threading.Thread(target=pump, name=f"log-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)


class Up:
    """The processes of one ``make up`` and the files they use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir = Path(tempfile.mkdtemp(prefix="vmmem-up-"))
        # The daemon's shared memory in a directory of its own: after the stop it must be
        # empty, which is how a clean stop is checked.
        self.mem_dir = Path(tempfile.mkdtemp(prefix="vmmem-up-", dir="/dev/shm"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.printer = Printer(width=max(10, len(f"vm{args.vms}")))
        self.stop_requested = threading.Event()

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C is ours to pass on, in order
        )
        self.procs[name] = proc
        assert proc.stdout is not None
        self.printer.follow(name, proc.stdout)
        return proc

    def start(self) -> None:
        a = self.args
        if _serving(a.socket):  # its VMs would join that daemon, not ours
            raise StartFailed(f"another daemon is serving {a.socket} (--socket picks another)")
        platform = [
            str(BIN / "vmmem-platform"),
            *("--socket", str(a.socket), "--mem-dir", str(self.mem_dir)),
            *("--host-memory", a.host_memory, "--metrics-port", str(a.port_base)),
            "--log-format=console",
        ]
        if a.swap_size not in ("0", ""):
            platform += [
                "--swap-file",
                str(self.run_dir / "vmmem.swap"),
                "--swap-size",
                a.swap_size,
            ]
        proc = self.spawn("platform", platform)
        self.wait_until(lambda: _serving(a.socket), proc, "the daemon's socket")
        for i in range(1, a.vms + 1):
            self.spawn(
                f"vm{i}",
                [
                    str(BIN / "vmmem-vmm"),
                    *("--socket", str(a.socket), "--name", f"vm{i}", "--memory", a.memory),
                    *("--metrics-port", str(a.port_base + i), "--log-format=console"),
                ],
            )
        prometheus = shutil.which("prometheus")
        if a.prometheus is None and prometheus is None:
            self.printer.say("up", "prometheus is not on PATH: running without it")
        if prometheus is not None and a.prometheus is not False:
            self.spawn("prometheus", self.prometheus_cmd(prometheus))
        self.printer.say("up", f"files in {self.run_dir} and {self.mem_dir}")
        self.printer.say(
            "up",
            f"running; try: {BIN}/vmmem-ctl --socket {a.socket} status   (Ctrl-C stops all)",
        )

    def prometheus_cmd(self, binary: str) -> list[str]:
        """deploy/prometheus.yml, its targets moved when --port-base or --vms differ."""
        config = PROMETHEUS_CONFIG
        base, vms = self.args.port_base, self.args.vms
        if (base, vms) != (DEFAULT_PORT_BASE, 3):
            text = config.read_text()
            for old, ports in (
                (_targets([DEFAULT_PORT_BASE]), [base]),
                (
                    _targets(range(DEFAULT_PORT_BASE + 1, DEFAULT_PORT_BASE + 4)),
                    range(base + 1, base + vms + 1),
                ),
            ):
                if old not in text:
                    raise StartFailed(f"{config} no longer has the line {old!r}")
                text = text.replace(old, _targets(ports))
            config = self.run_dir / "prometheus.yml"
            config.write_text(text)
        return [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.run_dir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{self.args.prometheus_port}",
        ]

    def wait_until(
        self, ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str
    ) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or self.stop_requested.is_set():
                raise StartFailed(f"stopped before {what} appeared")
            if time.monotonic() > deadline:
                raise StartFailed(f"{what} did not appear within 60 s")
            time.sleep(0.05)

    def watch(self) -> int:
        """Until a stop is asked for (0) or a child exits by itself (1)."""
        while not self.stop_requested.wait(0.2):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.printer.say("up", f"{name} exited with {proc.returncode}: stopping all")
                    return 1
        return 0

    def stop(self) -> bool:
        """Agents, then the daemon, then Prometheus; True if each stopped cleanly in time."""
        clean = True
        names = list(self.procs)
        order = [n for n in names if n.startswith("vm")] + ["platform", "prometheus"]
        for group in (order[:-2], order[-2:-1], order[-1:]):
            live = [self.procs[n] for n in group if n in self.procs]
            for proc in live:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name in group:
                if name in self.procs:
                    clean &= self.reap(name, self.procs[name])
        for thread in self.printer.threads:
            thread.join(5)
        return clean

    def reap(self, name: str, proc: subprocess.Popen[bytes]) -> bool:
        try:
            code = proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.printer.say("up", f"{name} did not stop within {STOP_SECONDS:.0f} s: killed")
            proc.kill()
            proc.wait()
            return False
        if code != 0:
            self.printer.say("up", f"{name} exited with {code}")
        return code == 0

    def cleanup(self) -> bool:
        """Remove our directories; False (and say so) if the daemon left memory behind."""
        left = sorted(p.name for p in self.mem_dir.iterdir())
        if left:
            self.printer.say("up", f"left behind in {self.mem_dir} (removed now): {left}")
        shutil.rmtree(self.mem_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return not left


class StartFailed(Exception):
    """A process did not come up."""


def _serving(path: Path) -> bool:
    """A daemon accepts on ``path`` (a socket file left by a dead one does not count)."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _targets(ports: Iterable[int]) -> str:
    return "- targets: [" + ", ".join(f'"127.0.0.1:{p}"' for p in ports) + "]"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.vms <= 64 or not 0 < args.port_base < 65535 - args.vms:
        print("make up: --vms must be 1..64 and --port-base leave room for them", file=sys.stderr)
        return 2
    up = Up(args)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        up.stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        up.start()
        code = up.watch()
    except StartFailed as exc:
        up.printer.say("up", f"cannot start: {exc}")
        code = 2
    finally:
        up.printer.say("up", "stopping")
        clean = up.stop() & up.cleanup()
    if code == 0 and not clean:
        code = 1
    up.printer.say("up", "stopped cleanly" if code == 0 else f"stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
