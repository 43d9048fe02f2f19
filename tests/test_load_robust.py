"""vmmem-load reports, it never crashes (issue 7, section 2; section 10's empty control socket).

Real daemons and agents as subprocesses, vmmem-load run as a user runs it: an agent killed
or frozen mid-run, the platform daemon killed (and restarted), bad flags, a full swap
device, a VM registered without a control socket. Each time the report names what happened,
the other VMs are still verified, the JSON is written, and nothing prints a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.messages import Register, Registered
from vmm_agent.rpc import RpcClient

from .procs import BIN, ctl, daemons, load_json, run_load

pytestmark = pytest.mark.e2e

#: vmmem-load's exit status when the run is incomplete or pages are unreachable.
INCOMPLETE = 3


@contextmanager
def load_running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """vmmem-load in the background (for a test that acts while it runs); always ended."""
    proc = subprocess.Popen(
        [str(BIN / "vmmem-load"), "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen[str], timeout: float = 45.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def poll(pred: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``pred`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return value


def accesses(sock: Path) -> int:
    p = asyncio.run(ctl(sock, "progress", timeout=5))
    return int(p["reads"] + p["writes"])


def assert_verified(report: dict[str, Any], names: set[str]) -> None:
    """Exactly ``names`` were verified: every page each wrote read back, no mismatch."""
    assert set(report["vms"]) == names, report["vms"].keys()
    for vm in report["vms"].values():
        assert vm["pages_written"] > 0
        assert vm["verification"]["pages_verified"] == vm["pages_written"]
        assert vm["verification"]["mismatches"] == 0


@pytest.mark.timeout(60)
def test_agent_killed_mid_run_is_named_others_verified(short_tmp: Path, mem_dir: Path) -> None:
    """SIGKILL one agent while the phase runs: the report names it lost (in that phase),
    the other two are verified page by page, the JSON is written, the exit status is 3."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        for name in ("a", "b", "victim"):
            d.start_agent(name, memory="8MiB", vcpus=1)
        out = short_tmp / "r.json"
        args = ["--socket", str(d.socket), "--expect-vms", "3", "--duration", "3"]
        with load_running(*args, "--write-ratio", "0.5", "--json", str(out)) as load:
            poll(lambda: accesses(d.control_socket("victim")) > 0, "the victim to run")
            d.agents["victim"].kill()
            code, stdout, stderr = finish(load)
        assert "Traceback" not in stderr, stderr
        assert code == INCOMPLETE, stdout + stderr
        report = load_json(out)
        assert_verified(report, {"a", "b"})
        lost = report["not_verified"]["victim"]
        assert lost["state"] == "lost" and lost["phase"] == "basic", lost
        assert report["outcome"] == "incomplete"
        assert "victim    LOST:" in stdout and "INCOMPLETE: victim lost" in stdout, stdout


@pytest.mark.timeout(60)
def test_frozen_agent_times_out_at_a_boundary_others_finish(short_tmp: Path, mem_dir: Path) -> None:
    """SIGSTOP one agent during the first of four phases: at the phase boundary it is given
    --vm-timeout seconds, then reported as not answering and left out; the others run every
    phase and are verified. It holds the run up once, not at each boundary."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        for name in ("a", "b", "frozen"):
            d.start_agent(name, memory="8MiB", vcpus=1)
        frozen = d.agents["frozen"]
        out = short_tmp / "r.json"
        try:
            with load_running(
                "--socket",
                str(d.socket),
                "--scenario",
                "overcommit",  # four phases, no host limit: no memory pressure
                "--expect-vms",
                "3",
                "--duration",
                "4",
                "--vm-timeout",
                "2",
                "--json",
                str(out),
            ) as load:
                poll(lambda: accesses(d.control_socket("frozen")) > 0, "the frozen VM to run")
                frozen.send_signal(signal.SIGSTOP)
                code, stdout, stderr = finish(load)
        finally:
            frozen.kill()  # a stopped process cannot act on SIGTERM
            frozen.wait(5)
        assert "Traceback" not in stderr, stderr
        assert code == INCOMPLETE, stdout + stderr
        report = load_json(out)
        assert_verified(report, {"a", "b"})
        gone = report["not_verified"]["frozen"]
        assert gone["state"] == "not_answering" and "within 2 s" in gone["reason"], gone
        phases = report["phases"]
        assert [p["name"] for p in phases] == ["fill", "hot-low", "hot-high", "scan"]
        assert phases[-1]["vms"] == ["a", "b"]
        # Dropped at one boundary: one timeout of 2 s in all, not one per phase.
        dropped = [p["name"] for p in phases if "frozen" in p["left_the_run"]]
        assert len(dropped) == 1, phases
        assert sum(p["seconds"] for p in phases) < 4 + 2 + 4, phases
        assert "frozen    NOT ANSWERING:" in stdout, stdout


@pytest.mark.timeout(60)
def test_daemon_killed_mid_run_is_reported_not_a_crash(short_tmp: Path, mem_dir: Path) -> None:
    """SIGKILL the platform daemon mid-run, nothing restarts it: vmmem-load waits
    --daemon-wait for it, then reports it unreachable and every VM unverified (today the
    agents exit at once: lost), writes the JSON and exits 3, with no traceback."""
    with daemons(short_tmp, mem_dir) as d:
        platform = d.start_platform("--host-memory", "64MiB")
        for name in ("a", "b"):
            d.start_agent(name, memory="8MiB", vcpus=1)
        out = short_tmp / "r.json"
        with load_running(
            "--socket",
            str(d.socket),
            "--expect-vms",
            "2",
            "--duration",
            "3",
            "--daemon-wait",
            "1",
            "--json",
            str(out),
        ) as load:
            poll(lambda: accesses(d.control_socket("a")) > 0, "the run to start")
            platform.kill()
            platform.wait(5)
            code, stdout, stderr = finish(load)
        assert "Traceback" not in stderr, stderr
        assert code == INCOMPLETE, stdout + stderr
        report = load_json(out)
        assert report["daemon"]["reachable_at_end"] is False
        assert report["daemon"]["gaps"] and report["daemon"]["gaps"][-1]["to_seconds"] is None
        assert report["vms"] == {}
        assert set(report["not_verified"]) == {"a", "b"}
        assert "the platform daemon is unreachable" in stdout, stdout
        assert "daemon: unreachable from" in stdout, stdout


@pytest.mark.timeout(60)
def test_daemon_restarted_mid_run_the_gap_is_reported(short_tmp: Path, mem_dir: Path) -> None:
    """SIGKILL the daemon and start a new one on the same socket: vmmem-load reconnects,
    the report shows the gap, closed, and the restart (two pids); every VM is either verified
    with no mismatch or named with the reason (agents that do not survive a daemon crash
    are lost)."""
    with daemons(short_tmp, mem_dir) as d:
        platform = d.start_platform("--host-memory", "64MiB")
        for name in ("a", "b"):
            d.start_agent(name, memory="8MiB", vcpus=1)
        out = short_tmp / "r.json"
        with load_running(
            "--socket",
            str(d.socket),
            "--expect-vms",
            "2",
            "--duration",
            "4",
            "--inject-failures",
            "3",
            "--daemon-wait",
            "20",
            "--json",
            str(out),
        ) as load:
            poll(lambda: accesses(d.control_socket("a")) > 0, "the run to start")
            platform.kill()
            platform.wait(5)
            d.socket.unlink(missing_ok=True)  # a dead daemon's socket; wait for the new one
            d.start_platform("--host-memory", "64MiB")
            code, stdout, stderr = finish(load)
        assert "Traceback" not in stderr, stderr
        report = load_json(out)
        daemon = report["daemon"]
        assert daemon["reachable_at_end"] is True
        assert daemon["gaps"] and all(g["to_seconds"] is not None for g in daemon["gaps"])
        assert d.platform is not None
        assert len(daemon["pids"]) == 2 and daemon["pids"][1] == d.platform.pid, daemon
        assert "daemon: restarted during the run" in stdout, stdout
        assert set(report["vms"]) | set(report["not_verified"]) == {"a", "b"}
        assert report["verification"]["mismatches"] == 0
        assert code == (0 if report["ok"] else INCOMPLETE), stdout + stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--duration", "0"], "--duration"),
        (["--duration", "ten"], "--duration"),
        (["--working-set", "1.5"], "--working-set"),
        (["--expect-vms", "0"], "--expect-vms"),
        (["--host-limit", "12 parsecs"], "--host-limit"),
        (["--vm-timeout", "0"], "--vm-timeout"),
        (["--daemon-wait", "nan"], "--daemon-wait"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag_is_one_line_naming_it(short_tmp: Path, flags: list[str], named: str) -> None:
    """A bad flag: exit 2 and one line on stderr that names the flag, no traceback; it is
    refused before anything is contacted (the socket here does not even exist)."""
    res = run_load("--socket", str(short_tmp / "none.sock"), *flags, timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], res.stderr
    assert lines[0].startswith("vmmem-load: ")
    assert res.stdout == ""


@pytest.mark.timeout(90)
def test_full_swap_is_unreachable_not_data_loss(
    short_tmp: Path, mem_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overcommit until the swap device is full, then lower the host limit below what is in
    use: faults fail with OUT_OF_MEMORY and swapped pages cannot be brought back. The report
    says "unreachable: the host is out of memory and swap", not "data loss": everything that
    was read matched. Exit status 3."""
    monkeypatch.setenv("VMMEM_LOW_WAIT_SECONDS", "0.1")  # a fault without a frame fails fast
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory",
            "32MiB",
            "--swap-file",
            str(short_tmp / "swap"),
            "--swap-size",
            "1MiB",
            "--share-scan-period",
            "86400",  # no merges: nothing frees a frame once swap is full
        )
        d.start_agent("a", memory="16MiB", vcpus=2)
        out = short_tmp / "r.json"
        with load_running(
            "--socket",
            str(d.socket),
            "--scenario",
            "overcommit",
            "--host-limit",
            "8MiB",
            "--duration",
            "5",
            "--json",
            str(out),
        ) as load:

            def swap_full() -> dict[str, Any] | None:
                st = asyncio.run(ctl(d.socket, "status", timeout=5))
                return st if st["swap"]["used"] == st["swap"]["slots"] else None

            st = poll(swap_full, "the swap device to fill")
            below = (st["host"]["used"] - 256) * 4096
            asyncio.run(ctl(d.socket, "set_host_limit", size=below))
            code, stdout, stderr = finish(load, timeout=75)
        assert "Traceback" not in stderr, stderr
        report = load_json(out)
        t = report["verification"]
        assert t["mismatches"] == 0 and t["unreadable"] == 0, t
        assert t["unreachable_out_of_memory"] > 0, t
        assert t["pages_verified"] + t["unreachable"] == report["vms"]["a"]["pages_written"]
        assert report["outcome"] == "unreachable", report["verdict"]
        assert code == INCOMPLETE, stdout + stderr
        assert "unreachable: the host is out of memory and swap" in stdout.lower(), stdout
        assert "data loss" not in stdout, stdout


@pytest.mark.timeout(60)
async def test_vm_without_control_socket_is_skipped_and_named(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A VM registered with the documented default control_socket "" (a client written
    from the protocol document): vmmem-load skips it and says so, drives and verifies the
    real agent, and exits 0. It used to crash with OSError Errno 22."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("real", memory="8MiB", vcpus=1)
        client = await RpcClient.connect(str(d.socket))
        try:
            reg = Register(name="bare", guest_pages=256, vcpus=1, pid=os.getpid())
            assert isinstance(await client.request(reg, timeout=10), Registered)
            out = short_tmp / "r.json"
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "vmmem-load"),
                "--socket",
                str(d.socket),
                "--duration",
                "1",
                "--no-progress",
                "--json",
                str(out),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout_b, stderr_b = await asyncio.wait_for(proc.communicate(), 45)
        finally:
            client.close()
        stdout, stderr = stdout_b.decode(), stderr_b.decode()
        assert "Traceback" not in stderr, stderr
        assert proc.returncode == 0, stdout + stderr
        report = load_json(out)
        assert_verified(report, {"real"})
        assert report["skipped"] == {"bare": {"reason": "registered without a control socket"}}
        assert "bare      skipped: registered without a control socket" in stdout, stdout
