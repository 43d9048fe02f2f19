"""The whole system end to end: real daemons as subprocesses, real socket, real shared memory."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .procs import ctl, daemons, load_json, run_load

pytestmark = pytest.mark.e2e


def test_workload_runs_and_every_page_verifies(short_tmp: Path, mem_dir: Path) -> None:
    """A basic workload on two VMs through vmmem-load: pages written, all verified, no mismatch."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--expect-vms",
            "2",
            "--duration",
            "3",
            "--working-set",
            "0.6",
            "--write-ratio",
            "0.5",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        for name in ("a", "b"):
            vm = report["vms"][name]
            assert vm["pages_written"] > 0
            # Every page the guest wrote was read back in the verification pass.
            assert vm["verification"]["pages_verified"] == vm["pages_written"]
            assert vm["faults"] > 0
            assert vm["fault_latency_seconds"]["p99"] >= vm["fault_latency_seconds"]["p50"] > 0
        assert report["verification"]["pages_verified"] == sum(
            v["pages_written"] for v in report["vms"].values()
        )
        assert "verification" in res.stdout and "OK" in res.stdout


def test_sigterm_stops_both_and_removes_files(short_tmp: Path, mem_dir: Path) -> None:
    """SIGTERM: agent and daemon exit 0 and leave no socket, region or memory file behind."""
    with daemons(short_tmp, mem_dir) as d:
        platform = d.start_platform("--host-memory", "32MiB")
        agent = d.start_agent("a", memory="8MiB")
        asyncio.run(
            ctl(
                d.control_socket("a"),
                "run_phase",
                phase={"duration": 30, "working_set": 0.5, "write_ratio": 0.5},
            )
        )
        _poll(lambda: _accesses(d.control_socket("a")) > 0, "the guest to run")
        files_running = sorted(os.listdir(mem_dir))
        # Machine memory and the state file, then the VM's p2m and control region.
        assert len(files_running) == 4, files_running
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        platform.send_signal(signal.SIGTERM)
        assert platform.wait(10) == 0
        assert os.listdir(mem_dir) == []
        assert not d.socket.exists()
        assert not d.control_socket("a").exists()


def _host(socket: Path) -> dict:
    return asyncio.run(ctl(socket, "status"))["host"]


def _accesses(control_socket: Path) -> int:
    progress = asyncio.run(ctl(control_socket, "progress"))
    return int(progress["reads"] + progress["writes"])


def _poll(pred: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``pred`` until it returns something true (a loaded machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return value


def test_killed_agent_returns_all_frames_while_other_vm_runs(
    short_tmp: Path, mem_dir: Path
) -> None:
    """SIGKILL one agent mid-run: its frames come back; the other VM keeps running, verified."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        baseline = _host(d.socket)["free"]
        d.start_agent("survivor", memory="16MiB")
        victim = d.start_agent("victim", memory="16MiB")
        phase = {"duration": 6, "working_set": 0.8, "write_ratio": 0.5}
        asyncio.run(ctl(d.control_socket("survivor"), "run_phase", phase=phase))
        asyncio.run(ctl(d.control_socket("victim"), "run_phase", phase=phase))

        def victim_exposed() -> int:
            status = asyncio.run(ctl(d.socket, "status"))
            return int(next(v for v in status["vms"] if v["name"] == "victim")["pages"]["exposed"])

        _poll(victim_exposed, "the victim to have pages exposed")
        victim.kill()
        victim.wait(5)
        deadline = time.monotonic() + 10
        while True:
            status = asyncio.run(ctl(d.socket, "status"))
            if [v["name"] for v in status["vms"]] == ["survivor"]:
                break
            assert time.monotonic() < deadline, "daemon did not notice the killed agent"
            time.sleep(0.1)
        # Everything still in use belongs to the survivor (its private frames).
        survivor = asyncio.run(ctl(d.control_socket("survivor"), "progress"))
        assert survivor["running"], "the surviving VM stopped"
        # Machine memory, the state file, and the survivor's p2m and control region.
        assert len(os.listdir(mem_dir)) == 4
        seen = survivor["reads"] + survivor["writes"]
        _poll(lambda: _accesses(d.control_socket("survivor")) > seen, "the survivor to go on")
        result = asyncio.run(ctl(d.control_socket("survivor"), "verify"))
        assert result["mismatches"] == 0 and result["unreachable"] == 0
        assert result["pages_verified"] > 0
        d.agents["survivor"].send_signal(signal.SIGTERM)
        assert d.agents["survivor"].wait(10) == 0
        deadline = time.monotonic() + 10
        while _host(d.socket)["free"] != baseline:
            assert time.monotonic() < deadline, f"frames not returned: {_host(d.socket)}"
            time.sleep(0.1)
        host = _host(d.socket)
        assert host["free"] == baseline and host["retired"] == 0
