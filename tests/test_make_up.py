"""``make up`` (``python -m tools.up``) runs the daemon and three VMs, and Ctrl-C stops all.

The tool runs as a user runs it, in a session of its own; the test sends SIGINT to that
whole process group, as a terminal's Ctrl-C does, once ``vmmem-ctl status`` shows the three
VMs registered. Then every process the tool started is gone, the socket and the daemon's
shared memory are removed, and the log has each process's lines under its own prefix.
Prometheus joins in when it is on PATH (``--no-prometheus`` otherwise).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import procs

#: The tool's line naming its run directory and its shared-memory directory.
DIRS = re.compile(r"files in (\S+) and (\S+)")


def free_port_run(count: int) -> int:
    """A port such that it and the ``count - 1`` after it are free now."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def make_up(tmp: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start the tool; whatever happens, its process group is gone afterwards."""
    base = free_port_run(5)
    cmd = [
        sys.executable,
        *("-m", "tools.up", "--socket", str(tmp / "u.sock"), "--host-memory", "32MiB"),
        *("--memory", "4MiB", "--swap-size", "4MiB"),
        *("--port-base", str(base), "--prometheus-port", str(base + 4)),
        *extra,
    ]
    log = tmp / "up.log"
    with open(log, "wb") as fh:
        # TMPDIR: the tool's own run directory lands in tmp, where the test can see it.
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=procs.ROOT,
            env={**os.environ, "TMPDIR": str(tmp)},
            start_new_session=True,
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:  # the test failed: stop the tool and what it started
            kids = children(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pid in kids:  # each in its own process group: the daemon removes its files
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while (left := [p for p in kids if alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            if match := DIRS.search(log.read_text()):
                for path in match.groups():
                    shutil.rmtree(path, ignore_errors=True)


def wait_registered(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"make up exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"VMs not registered:\n{log.read_text()}"
        if sock.exists():
            try:
                names = sorted(vm["name"] for vm in procs.run(procs.ctl(sock, "status"))["vms"])
            except (OSError, EOFError):
                names = []
            if names == ["vm1", "vm2", "vm3"] and "| running;" in log.read_text():
                return names
        time.sleep(0.1)


def dirs_of(log: Path) -> list[Path]:
    match = DIRS.search(log.read_text())
    assert match, log.read_text()
    return [Path(match[1]), Path(match[2])]


@pytest.mark.timeout(60)
def test_make_up_ctrl_c(short_tmp: Path) -> None:
    """Three VMs come up under one daemon; Ctrl-C stops everything and leaves nothing."""
    sock = short_tmp / "u.sock"
    prometheus = shutil.which("prometheus") is not None
    with make_up(short_tmp) as (proc, log):
        wait_registered(sock, proc, log)
        started = children(proc.pid)
        assert len(started) == 4 + prometheus, started
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground group
        assert proc.wait(40) == 0, log.read_text()
    text = log.read_text()
    assert not [pid for pid in started if alive(pid)], text
    assert not sock.exists()
    run_dir, mem_dir = dirs_of(log)
    assert not run_dir.exists() and not mem_dir.exists(), text
    assert sorted(p.name for p in short_tmp.iterdir()) == ["up.log"]
    assert not list(short_tmp.glob("vmmem-vm-*.sock"))
    prefixes = {line.split(" | ", 1)[0].strip() for line in text.splitlines() if " | " in line}
    expected = {"up", "platform", "vm1", "vm2", "vm3"} | ({"prometheus"} if prometheus else set())
    assert expected <= prefixes, prefixes
    assert re.search(r"^platform +\| .*platform_stopped", text, re.M), text
    lines = text.splitlines()
    daemon_stops = next(i for i, line in enumerate(lines) if "platform_stopping" in line)
    for vm in ("vm1", "vm2", "vm3"):  # each agent stopped before the daemon began to
        assert any(x.startswith(vm) and "vmm_stopped" in x for x in lines[:daemon_stops]), text
    assert "\x1b[" not in text  # no terminal colours in a file
    assert text.rstrip().endswith("stopped cleanly")


@pytest.mark.timeout(60)
def test_make_up_child_dies(short_tmp: Path) -> None:
    """A VM that dies by itself stops the rest, cleanly, and the tool exits 1."""
    sock = short_tmp / "u.sock"
    with make_up(short_tmp, "--no-prometheus") as (proc, log):
        wait_registered(sock, proc, log)
        status = procs.run(procs.ctl(sock, "status"))
        (vm2,) = [vm["pid"] for vm in status["vms"] if vm["name"] == "vm2"]
        started = children(proc.pid)
        os.kill(vm2, signal.SIGKILL)
        assert proc.wait(40) == 1, log.read_text()
    text = log.read_text()
    assert "vm2 exited with -9: stopping all" in text, text
    assert not [pid for pid in started if alive(pid)], text
    assert not sock.exists()
    assert not any(p.exists() for p in dirs_of(log)), text


@pytest.mark.timeout(60)
def test_make_up_socket_taken(short_tmp: Path, mem_dir: Path) -> None:
    """A daemon already serving the socket: the tool refuses (exit 2) and starts no VM,
    which would otherwise have joined that daemon."""
    with procs.daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "16MiB", "--numa-nodes", "1")
        run = subprocess.run(
            [sys.executable, "-m", "tools.up", "--socket", str(d.socket), "--no-prometheus"],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=procs.ROOT,
            env={**os.environ, "TMPDIR": str(short_tmp)},
            check=False,
        )
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"another daemon is serving {d.socket}" in run.stdout, run.stdout
        assert procs.run(procs.ctl(d.socket, "status"))["vms"] == []
    assert not [p for p in short_tmp.iterdir() if p.name.startswith("vmmem-up-")]
