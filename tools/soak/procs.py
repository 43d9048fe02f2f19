"""The soak's processes (one daemon, its agents, each incarnation with its own log), control
requests to them, and what ``/proc`` says about the daemon.

Every process the soak starts is kept in ``started`` until ``stop_all``, killed ones
included, so that nothing outlives the run whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from platform_daemon.ctl_client import CtlClient

BIN = Path(sys.executable).parent
T = TypeVar("T")


class SoakFailure(Exception):
    """Something the soak promises did not hold; the message says what, for the report."""


def wait_for(pred: Callable[[], T], what: str, timeout: float, step: float = 0.05) -> T:
    """Poll ``pred`` until it returns something true; SoakFailure naming ``what`` if it
    does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise SoakFailure(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
    return value


def log_events(log: Path, name: str) -> list[dict[str, Any]]:
    """The structured events called ``name`` in a JSON log (a line cut short is skipped)."""
    out: list[dict[str, Any]] = []
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


def log_problems(log: Path, limit: int = 8) -> list[str]:
    """The last ``limit`` warning and error lines of a log, and any traceback's last lines."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if '"level": "error"' in ln or '"level": "warning"' in ln]
    bad += [ln for ln in lines if not ln.startswith("{")][-limit:]  # tracebacks, plain text
    return bad[-limit:]


@dataclass
class Proc:
    """One process the soak started."""

    label: str  # "platform#2", "vm1#3": the incarnation, as the timeline names it
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def sigkill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)


@dataclass
class Fleet:
    """The daemon and agents of one soak, all on one socket, memory directory and swap file."""

    dir: Path
    mem_dir: Path
    platform_args: list[str]
    started: list[Proc] = field(default_factory=list)
    platform: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.dir / "p.sock"

    def control_socket(self, name: str) -> Path:
        return self.dir / f"{name}.ctl"

    def _spawn(self, label: str, cmd: list[str]) -> Proc:
        log = self.dir / f"{label.replace('#', '-')}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            proc = Proc(label, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), log)
        self.started.append(proc)
        return proc

    def _next(self, name: str) -> str:
        self.incarnations[name] = self.incarnations.get(name, 0) + 1
        return f"{name}#{self.incarnations[name]}"

    def start_platform(self) -> Proc:
        """A daemon on the soak's socket: the first one starts fresh, later ones take over."""
        cmd = [
            str(BIN / "vmmem-platform"),
            *("--socket", str(self.socket), "--mem-dir", str(self.mem_dir)),
            *("--metrics-port", "-1", "--log-format", "json", *self.platform_args),
        ]
        proc = self._spawn(self._next("platform"), cmd)
        self.platform = proc
        wait_for(lambda: self.socket.exists() or proc.popen.poll() is not None, "socket", 60)
        if proc.popen.poll() is not None:
            raise SoakFailure(f"{proc.label} exited with {proc.popen.returncode} at startup")
        return proc

    def start_agent(self, name: str, memory_mib: int, vcpus: int, seed: int) -> Proc:
        ctl = self.control_socket(name)
        ctl.unlink(missing_ok=True)  # a SIGKILLed predecessor's: not waited on by mistake
        cmd = [
            str(BIN / "vmmem-vmm"),
            *("--socket", str(self.socket), "--name", name, "--memory", f"{memory_mib}MiB"),
            *("--vcpus", str(vcpus), "--metrics-port", "-1", "--control-socket", str(ctl)),
            *("--seed", str(seed), "--log-format", "json"),
        ]
        proc = self._spawn(self._next(name), cmd)
        self.agents[name] = proc
        wait_for(lambda: ctl.exists() or proc.popen.poll() is not None, f"{name}'s socket", 60)
        if proc.popen.poll() is not None:
            raise SoakFailure(f"{proc.label} exited with {proc.popen.returncode} at startup")
        return proc

    def daemon_ctl(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        with CtlClient(str(self.socket), timeout=timeout) as client:
            return client.call(op, **args)

    def agent_ctl(self, name: str, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        with CtlClient(str(self.control_socket(name)), timeout=timeout) as client:
            return client.call(op, **args)

    def vmmem_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``vmmem-ctl`` as an operator runs it."""
        return subprocess.run(
            [str(BIN / "vmmem-ctl"), "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def stop_all(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every process still running (agents first, so that each says goodbye),
        then SIGKILL what did not stop within ``timeout``; the exit code of each."""
        running = [p for p in self.started if p.popen.poll() is None]
        agents = [p for p in running if not p.label.startswith("platform")]
        for group in (agents, [p for p in running if p not in agents]):
            for p in group:
                p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
        return {p.label: p.popen.returncode for p in running}


def proc_memory(pid: int, window: float = 0.3) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon) in KiB and the open descriptor count of ``pid``; None once gone.

    The descriptor count is the fewest seen over ``window`` seconds: a control connection
    the soak just closed may not be closed on the daemon's side yet, while a descriptor
    that leaked stays in every look."""
    fds: list[int] = []
    deadline = time.monotonic() + window
    try:
        while not fds or time.monotonic() < deadline:
            if fds:
                time.sleep(0.05)
            fds.append(len(list(Path(f"/proc/{pid}/fd").iterdir())))
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: dead, not yet reaped
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0]), min(fds)
