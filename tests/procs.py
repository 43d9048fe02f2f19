"""Start the real daemons as subprocesses for end-to-end tests, and always stop them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


@dataclass
class Daemons:
    """A platform daemon and its agents, all real processes."""

    dir: Path
    mem_dir: Path
    socket: Path
    platform: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        path = self.dir / f"{name}.log"
        self.logs.append(path)
        with open(path, "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def start_platform(
        self, *args: str, metrics_port: int = -1, log: str = "platform"
    ) -> subprocess.Popen[bytes]:
        cmd = [
            str(BIN / "vmmem-platform"),
            "--socket",
            str(self.socket),
            "--mem-dir",
            str(self.mem_dir),
            "--metrics-port",
            str(metrics_port),
            "--log-format",
            "json",
            *args,
        ]
        self.platform = self._spawn(log, cmd)
        wait_for_path(self.socket, self.platform)
        return self.platform

    def start_agent(
        self, name: str, *args: str, memory: str = "16MiB", vcpus: int = 2, metrics_port: int = -1
    ) -> subprocess.Popen[bytes]:
        ctl = self.control_socket(name)
        cmd = [
            str(BIN / "vmmem-vmm"),
            "--socket",
            str(self.socket),
            "--name",
            name,
            "--memory",
            memory,
            "--vcpus",
            str(vcpus),
            "--metrics-port",
            str(metrics_port),
            "--control-socket",
            str(ctl),
            "--log-format",
            "json",
            *args,
        ]
        proc = self._spawn(name, cmd)
        self.agents[name] = proc
        wait_for_path(ctl, proc)
        return proc

    def control_socket(self, name: str) -> Path:
        return self.dir / f"{name}.ctl"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everything, then SIGKILL what is still running."""
        procs = [*self.agents.values(), *([self.platform] if self.platform else [])]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def check_invariants(self) -> None:
        """``vmmem-ctl check``, as an operator runs it: every invariant holds (exit 0).

        Called at the end of every test that uses ``daemons()``; a daemon the test already
        stopped has nothing to check.
        """
        if self.platform is None or self.platform.poll() is not None:
            return
        res = subprocess.run(
            [str(BIN / "vmmem-ctl"), "--socket", str(self.socket), "check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, f"vmmem-ctl check failed:\n{res.stdout}{res.stderr}"

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs if p.exists())


@contextmanager
def daemons(tmp: Path, mem_dir: Path) -> Iterator[Daemons]:
    d = Daemons(tmp, mem_dir, tmp / "p.sock")
    try:
        yield d
        d.check_invariants()  # every end-to-end test ends with the invariants checked
    except BaseException:
        print(d.dump_logs())
        raise
    finally:
        d.stop()


async def ctl(path: Path, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """One control request to a daemon or agent socket."""
    from vmm_agent.rpc import RpcClient

    client = await RpcClient.connect(str(path))
    try:
        return await client.ctl(op, timeout=timeout, **args)
    finally:
        client.close()


def run_load(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run ``vmmem-load`` as a user would and return its completed process."""
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [str(BIN / "vmmem-load"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def run(coro: Any) -> Any:
    return asyncio.run(coro)
