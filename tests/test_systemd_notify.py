"""The daemons speak systemd's notify protocol to a ``NOTIFY_SOCKET`` the test owns.

The real platform daemon and agent run as subprocesses with ``NOTIFY_SOCKET`` naming a
datagram socket bound here, as systemd does for a ``Type=notify`` unit; the test reads what
they send: READY=1 once the socket is served, WATCHDOG=1 pings when ``WATCHDOG_USEC`` is
set, STOPPING=1 at shutdown, in that order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shared.sd_notify import Notifier
from tests import procs


@contextmanager
def listener(address: str) -> Iterator[socket.socket]:
    """A datagram socket at ``address`` (``@name``: abstract), as systemd's own."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        yield sock
    finally:
        sock.close()


def receive_until(
    sock: socket.socket,
    got: list[str],
    done: Callable[[list[str]], bool],
    proc: subprocess.Popen[bytes],
    timeout: float = 15.0,
) -> None:
    """Append each message (one per line) to ``got`` until ``done(got)``; fail at timeout."""
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; received {got}"
        sock.settimeout(min(left, 0.5))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            assert proc.poll() is None or done(got), f"exited {proc.returncode}; got {got}"
            continue
        got.extend(data.decode().splitlines())


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def platform_cmd(tmp: Path, mem_dir: Path) -> list[str]:
    return [
        str(procs.BIN / "vmmem-platform"),
        *("--socket", str(tmp / "p.sock"), "--mem-dir", str(mem_dir)),
        *("--host-memory", "16MiB", "--numa-nodes", "1", "--metrics-port", "-1"),
        *("--log-format", "json"),
    ]


@pytest.mark.timeout(30)
def test_platform_ready_watchdog_stopping(short_tmp: Path, mem_dir: Path) -> None:
    """READY=1 comes when the socket accepts, then WATCHDOG=1 pings (WATCHDOG_USEC 0.2 s),
    then STOPPING=1 on SIGTERM, and no ping after it."""
    address = str(short_tmp / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    with listener(address) as sock:
        proc = spawn(platform_cmd(short_tmp, mem_dir), env, short_tmp / "platform.log")
        try:
            got: list[str] = []
            receive_until(sock, got, lambda g: "READY=1" in g, proc)
            # Ready means served: a client connects at once.
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(short_tmp / "p.sock"))
            assert f"MAINPID={proc.pid}" in got
            receive_until(sock, got, lambda g: g.count("WATCHDOG=1") >= 3, proc)
            proc.send_signal(signal.SIGTERM)
            receive_until(sock, got, lambda g: "STOPPING=1" in g, proc)
            assert proc.wait(15) == 0
        finally:
            stop(proc)
        sock.setblocking(False)
        while True:  # whatever arrived after STOPPING=1
            try:
                got.extend(sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                break
    order = [m for m in got if m in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
    assert order[0] == "READY=1" and order[-1] == "STOPPING=1", order
    assert order.count("READY=1") == 1 and order.count("STOPPING=1") == 1, order
    assert not list(mem_dir.iterdir())


@pytest.mark.timeout(30)
def test_agent_ready_abstract_socket(short_tmp: Path, mem_dir: Path) -> None:
    """The agent sends READY=1 once registered and STOPPING=1 when it stops; the address
    is an abstract one ('@' name), and without WATCHDOG_USEC nobody pings."""
    address = f"@vmmem-test-{os.getpid()}-{short_tmp.name}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    with procs.daemons(short_tmp, mem_dir) as d, listener(address) as sock:
        d.start_platform("--host-memory", "16MiB", "--numa-nodes", "1")
        cmd = [
            str(procs.BIN / "vmmem-vmm"),
            *("--socket", str(d.socket), "--name", "vm1", "--memory", "4MiB"),
            *("--metrics-port", "-1", "--control-socket", str(short_tmp / "vm1.ctl")),
        ]
        proc = spawn(cmd, {**base, "NOTIFY_SOCKET": address}, short_tmp / "vm1.log")
        d.agents["vm1"] = proc  # stopped by daemons() whatever happens
        got: list[str] = []
        receive_until(sock, got, lambda g: "READY=1" in g, proc)
        assert (short_tmp / "vm1.ctl").exists()  # registered and serving its control socket
        proc.send_signal(signal.SIGTERM)
        receive_until(sock, got, lambda g: "STOPPING=1" in g, proc)
        assert proc.wait(15) == 0
        assert "WATCHDOG=1" not in got


@pytest.mark.timeout(10)
def test_notifier_from_env() -> None:
    """No NOTIFY_SOCKET: nothing is sent. WATCHDOG_PID naming another process: no pings."""
    assert not Notifier.from_env({}).notify("READY=1")
    assert Notifier.from_env({"WATCHDOG_USEC": "1000000"}).watchdog_interval is None
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}
    assert Notifier.from_env(env).watchdog_interval == 0.5
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.5
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
