"""The platform daemon killed under load: its VMs wait, a new daemon takes over, nothing lost.

Real processes throughout: a daemon with a real swap file is SIGKILLed while its guests
write, read and swap; a new daemon on the same socket, memory directory and swap file takes
over its state files, and the same agent processes carry on. Every page any guest wrote is
read back and checked, during the run and in a final pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .procs import Daemons, ctl, daemons

pytestmark = pytest.mark.e2e

PHASE = {
    "name": "churn",
    "duration": 12.0,
    "working_set": 1.0,
    "distribution": "uniform",
    "write_ratio": 0.5,
    "pinned_pages": 8,
}


def events(log: Path, name: str) -> list[dict[str, Any]]:
    """The structured log events called ``name`` in a daemon's JSON log."""
    out = []
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def wait_for(pred: Any, what: str, timeout: float = 30.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(step)
    return value


def platform_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "--host-memory",
        "64MiB",
        "--swap-file",
        str(tmp / "swap"),
        "--swap-size",
        "128MiB",
        *extra,
    ]


def status(d: Daemons) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(ctl(d.socket, "status"))
    return result


def sigkill_platform(d: Daemons) -> None:
    assert d.platform is not None
    d.platform.send_signal(signal.SIGKILL)
    d.platform.wait(10)


@pytest.mark.timeout(180)
def test_daemon_killed_under_overcommit_is_taken_over_and_nothing_is_lost(
    short_tmp: Path, mem_dir: Path
) -> None:
    names = ["vm0", "vm1", "vm2"]
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(*platform_args(short_tmp))
        for name in names:
            d.start_agent(name, memory="16MiB", vcpus=2)
        # 48 MiB of guests on a 24 MiB limit: swapping all along.
        asyncio.run(ctl(d.socket, "set_host_limit", size="24MiB"))
        for name in names:
            asyncio.run(ctl(d.control_socket(name), "run_phase", phase=PHASE))
        wait_for(lambda: status(d)["swap"]["used"] > 2000, "swap-outs under way")
        # Swap writes slowed down so that some are in flight when the daemon dies.
        asyncio.run(ctl(d.socket, "failpoint", name="swap_write_delay", value=0.2))
        wait_for(
            lambda: sum(vm["pages"]["in_flight"] for vm in status(d)["vms"]) > 0,
            "swap-outs in flight",
        )
        sigkill_platform(d)
        for name in names:  # the agents stall and wait; none exits
            wait_for(lambda n=name: events(short_tmp / f"{n}.log", "platform_lost"), "stall")
            assert d.agents[name].poll() is None
        d.start_platform(*platform_args(short_tmp), log="platform2")
        recovered = wait_for(
            lambda: events(short_tmp / "platform2.log", "platform_recovered"), "takeover"
        )[0]
        assert recovered["vms"] == 3
        assert recovered["pages_undone"] > 0  # the swap-outs in flight were undone
        for name in names:
            wait_for(lambda n=name: events(short_tmp / f"{n}.log", "platform_resumed"), "resume")
        st = status(d)
        assert st["host"]["limit_pages"] == (24 << 20) // 4096  # the limit survived too
        # The guests carry on: their phase ends, then every page they wrote reads back.
        for name in names:
            wait_for(
                lambda n=name: not asyncio.run(ctl(d.control_socket(n), "progress"))["running"],
                f"{name}'s phase to end",
            )
        for name in names:
            res = asyncio.run(ctl(d.control_socket(name), "results"))
            assert res["mismatches"] == 0, res["mismatch_log"]
            assert res["fault_errors"] == 0
            assert res["reads"] > 1000  # reads were checked while the daemon died and came back
            v = asyncio.run(ctl(d.control_socket(name), "verify"))
            assert v["mismatches"] == 0 and v["unreachable"] == 0, v
            assert v["pages_verified"] == res["pages_written"]
        assert status(d)["swap"]["used"] > 0  # swapping went on with the new daemon
        d.check_invariants()  # slots, frames, owners and the agents' mappings agree
        d.stop()
        assert d.platform is not None and d.platform.returncode == 0
        leftovers = sorted(p.name for p in mem_dir.iterdir())
        assert leftovers == [], leftovers


@pytest.mark.timeout(60)
def test_agents_exit_clearly_when_no_daemon_comes_back(short_tmp: Path, mem_dir: Path) -> None:
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(*platform_args(short_tmp))
        agent = d.start_agent("lonely", "--reconnect-seconds", "1")
        sigkill_platform(d)
        t0 = time.monotonic()
        assert agent.wait(20) == 1
        waited = time.monotonic() - t0
        assert 0.9 < waited < 15
        out = (short_tmp / "lonely.log").read_text()
        assert "no daemon took this VM back within 1 s (--reconnect-seconds)" in out
        assert not d.control_socket("lonely").exists()
        d.platform = None  # nothing left to stop or check
    # The dead daemon's files stay for a daemon that takes over; none did here.
    assert any(p.name.endswith(".state") for p in mem_dir.iterdir())


@pytest.mark.timeout(90)
def test_a_dead_daemons_files_are_taken_over_or_removed_and_the_log_says_which(
    short_tmp: Path, mem_dir: Path
) -> None:
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(*platform_args(short_tmp))
        agent = d.start_agent("gone")
        sigkill_platform(d)
        agent.send_signal(signal.SIGKILL)  # its agent dies too: nobody will resume it
        agent.wait(10)
        del d.agents["gone"]
        before = sorted(p.name for p in mem_dir.iterdir())
        assert len(before) == 4  # machine, state, the VM's p2m and control region
        # Other settings: refused, naming them; nothing removed.
        proc = d.start_platform(
            *platform_args(short_tmp), "--numa-nodes", "1", log="platform-wrong"
        )
        assert proc.wait(20) == 1
        assert "--numa-nodes 2 (now 1)" in (short_tmp / "platform-wrong.log").read_text()
        assert sorted(p.name for p in mem_dir.iterdir()) == before
        # Same settings: taken over; the VM waits for its agent, then is released.
        d.start_platform(*platform_args(short_tmp, "--reattach-seconds", "1"), log="platform2")
        log2 = short_tmp / "platform2.log"
        wait_for(lambda: events(log2, "platform_recovered"), "takeover")
        released = wait_for(lambda: events(log2, "vm_released"), "release")
        assert released[0]["reason"] == "not_resumed"
        wait_for(lambda: status(d)["vms"] == [], "the VM gone from status")
        assert status(d)["host"]["used"] == 2  # only the zero frames
        sigkill_platform(d)
        # --fresh: removed, and said so.
        d.start_platform(*platform_args(short_tmp, "--fresh"), log="platform3")
        removed = wait_for(lambda: events(short_tmp / "platform3.log", "stale_state_removed"), "rm")
        assert removed[0]["reason"] == "--fresh"
        assert len(removed[0]["files"]) >= 2
        assert not events(short_tmp / "platform3.log", "platform_recovered")
    assert list(mem_dir.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_resume_the_new_daemon_cannot_honour_stops_the_agent(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A daemon started with --fresh does not know the VM: the agent exits, saying why."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(*platform_args(short_tmp))
        agent = d.start_agent("orphan")
        sigkill_platform(d)
        d.start_platform(*platform_args(short_tmp, "--fresh"), log="platform2")
        assert agent.wait(20) == 1
        out = (short_tmp / "orphan.log").read_text()
        assert "does not carry this VM on" in out
        assert "to resume" in out
        del d.agents["orphan"]
    assert os.listdir(mem_dir) == []


@pytest.mark.timeout(180)
def test_overcommit_load_survives_a_daemon_restart_with_nothing_lost(
    short_tmp: Path, mem_dir: Path
) -> None:
    """The issue's test, as a user runs it: ``vmmem-load --scenario overcommit`` with swap;
    the daemon is SIGKILLed mid-run (swap writes in flight) and started again. The load
    finishes, every VM is verified with 0 mismatches, and a clean stop leaves nothing."""
    from .test_load_robust import assert_verified, finish, load_running

    names = {"vm0", "vm1", "vm2"}
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(*platform_args(short_tmp))
        for name in sorted(names):
            d.start_agent(name, memory="16MiB", vcpus=2)
        out = short_tmp / "r.json"
        with load_running(
            "--socket",
            str(d.socket),
            "--scenario",
            "overcommit",
            "--expect-vms",
            "3",
            "--host-limit",
            "24MiB",
            "--duration",
            "12",
            "--daemon-wait",
            "60",
            "--json",
            str(out),
        ) as load:
            wait_for(lambda: status(d)["swap"]["used"] > 1000, "swap-outs under way")
            asyncio.run(ctl(d.socket, "failpoint", name="swap_write_delay", value=0.2))
            wait_for(
                lambda: sum(vm["pages"]["in_flight"] for vm in status(d)["vms"]) > 0,
                "swap-outs in flight",
            )
            sigkill_platform(d)
            d.start_platform(*platform_args(short_tmp), log="platform2")
            code, stdout, stderr = finish(load, timeout=150)
        assert "Traceback" not in stderr, stderr
        assert code == 0, stdout + stderr
        report = json.loads(out.read_text())
        assert_verified(report, names)
        assert report["verification"]["mismatches"] == 0
        assert report["daemon"]["reachable_at_end"] is True
        assert len(report["daemon"]["pids"]) == 2
        assert events(short_tmp / "platform2.log", "platform_recovered")[0]["vms"] == 3
        for name in names:
            assert events(short_tmp / f"{name}.log", "platform_resumed")
        d.check_invariants()
        d.stop()
        assert sorted(p.name for p in mem_dir.iterdir()) == []
