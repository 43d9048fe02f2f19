"""Overcommit end to end: real daemons, real swap file, hot/cold phases, nothing lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from .procs import ctl, daemons, load_json, run_load

pytestmark = pytest.mark.e2e


def write_all_then_halt(agent: Path, pages: int) -> None:
    """The guest writes its ``pages`` pages sequentially (however slow the machine), then
    stops."""
    phase = {"duration": 60, "working_set": 1.0, "write_ratio": 1.0, "distribution": "sequential"}
    asyncio.run(ctl(agent, "run_phase", phase=phase))
    deadline = time.monotonic() + 30
    while asyncio.run(ctl(agent, "results"))["pages_written"] < pages:
        assert time.monotonic() < deadline, f"the guest did not write its {pages} pages"
        time.sleep(0.05)
    asyncio.run(ctl(agent, "halt"))


@pytest.mark.timeout(180)
def test_overcommit_scenario_swaps_and_verifies(short_tmp: Path, mem_dir: Path) -> None:
    """4 VMs x 16 MiB on a 32 MiB host limit: swap-outs happen, every page verifies."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory",
            "64MiB",
            "--swap-file",
            str(short_tmp / "swap"),
            "--swap-size",
            "128MiB",
        )
        for i in range(4):
            d.start_agent(f"vm{i}", memory="16MiB", vcpus=2)
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "overcommit",
            "--expect-vms",
            "4",
            "--host-limit",
            "32MiB",
            "--duration",
            "10",
            "--inject-failures",
            "2",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        # Every page a guest wrote was read back; the guests wrote more than the host limit.
        written = sum(v["pages_written"] for v in report["vms"].values())
        assert report["verification"]["pages_verified"] == written
        assert written > (32 << 20) // 4096
        assert report["swap"]["pages_out"] > 0
        assert report["swap"]["pages_in"] > 0
        assert report["retired_frames"] == 2
        assert len(report["injected_failures"]) == 2
        for vm in report["vms"].values():
            assert vm["pin_violations"] == 0
            assert vm["released_while_pinned"].get("swap", 0) == 0
            assert vm["pin_cycles"] > 0  # pages were pinned in translation during the run
            assert vm["batch_pages"].get("swap/ok", 0) > 0
        assert "swap:" in res.stdout
        # The swap file is bounded by what the daemon reports as used, and is freed on exit.
        status = asyncio.run(ctl(d.socket, "status"))
        # Read-ahead pages not validated yet keep their slots too (services/readahead.py).
        assert status["swap"]["used"] == sum(
            v["pages"]["swapped"] + v["readahead"]["held_now"] for v in status["vms"]
        )
        for name in list(d.agents):
            d.agents[name].terminate()
            d.agents[name].wait(10)
        deadline = time.monotonic() + 10
        while (st := asyncio.run(ctl(d.socket, "status")))["vms"] or st["swap"]["used"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["host"]["used"] == st["host"]["nodes"][0]["used"] + st["host"]["nodes"][1]["used"]
        assert st["host"]["used"] == 2  # only the shared zero frames, one per node


@pytest.mark.timeout(120)
def test_vmmem_ctl_status_retire_and_host_limit(short_tmp: Path, mem_dir: Path) -> None:
    """vmmem-ctl shows VMs and frames, retires a frame, and changes the host limit."""
    import subprocess

    from .procs import BIN

    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "32MiB")
        d.start_agent("a", memory="8MiB")
        write_all_then_halt(d.control_socket("a"), 2048)
        sock = ["--socket", str(d.socket)]
        out = subprocess.run(
            [str(BIN / "vmmem-ctl"), *sock, "status"], capture_output=True, text=True, check=True
        ).stdout
        assert "vm a" in out and "exposed" in out and "node 1" in out
        free_mpn = 8191  # the last frame of 32 MiB: free, node 1
        out = subprocess.run(
            [str(BIN / "vmmem-ctl"), *sock, "retire", "--mpn", str(free_mpn)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert '"was": "free"' in out
        bad = subprocess.run(
            [str(BIN / "vmmem-ctl"), *sock, "retire", "--mpn", "99999999"],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 1 and "out of range" in bad.stderr
        out = subprocess.run(
            [str(BIN / "vmmem-ctl"), *sock, "set-host-limit", "16MiB"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert '"limit_pages": 4096' in out
        st = asyncio.run(ctl(d.socket, "status"))
        assert st["host"]["retired"] == 1 and st["host"]["limit_pages"] == 4096
        result = asyncio.run(ctl(d.control_socket("a"), "verify"))
        assert result["mismatches"] == 0 and result["pages_verified"] == 2048


@pytest.mark.timeout(120)
def test_agent_killed_while_swapping_frees_frames_and_slots(short_tmp: Path, mem_dir: Path) -> None:
    """SIGKILL an agent while its pages are being swapped: its frames and swap slots all come
    back, and the other VM keeps running with every page verified."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory", "64MiB", "--swap-file", str(short_tmp / "swap"), "--swap-size", "64MiB"
        )
        d.start_agent("survivor", memory="16MiB")
        victim = d.start_agent("victim", memory="16MiB")
        fill = {"duration": 8, "working_set": 1.0, "write_ratio": 0.7, "distribution": "uniform"}
        for name in ("survivor", "victim"):
            asyncio.run(ctl(d.control_socket(name), "run_phase", phase=fill))
        asyncio.run(ctl(d.socket, "set_host_limit", size="20MiB"))
        deadline = time.monotonic() + 20
        while True:  # wait until the victim really has pages in swap
            st = asyncio.run(ctl(d.socket, "status"))
            vm = next(v for v in st["vms"] if v["name"] == "victim")
            if vm["pages"]["swapped"] > 200 and vm["pages"]["exposed"] > 0:
                break
            assert time.monotonic() < deadline, vm
            time.sleep(0.05)
        victim.kill()
        victim.wait(5)
        deadline = time.monotonic() + 15
        while True:
            st = asyncio.run(ctl(d.socket, "status"))
            survivor = st["vms"][0] if len(st["vms"]) == 1 else None
            if survivor is not None:
                swapped = survivor["pages"]["swapped"]
                # Slots in use belong to the survivor alone (in-flight writes have landed).
                if st["swap"]["used"] == swapped:
                    break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        asyncio.run(ctl(d.socket, "set_host_limit", size="64MiB"))
        result = asyncio.run(ctl(d.control_socket("survivor"), "verify"))
        assert result["mismatches"] == 0 and result["unreachable"] == 0
        assert result["pages_verified"] > 0
        d.agents["survivor"].terminate()
        assert d.agents["survivor"].wait(10) == 0
        deadline = time.monotonic() + 10
        while (st := asyncio.run(ctl(d.socket, "status")))["vms"] or st["swap"]["used"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["host"]["used"] == 2  # the two shared zero frames: everything else is back


@pytest.mark.timeout(120)
def test_verify_reads_are_touches_read_ahead_validation_counts(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Verify reads every page back like the guest: the pages its swap-in faults read ahead
    are pages it reads, so validation keeps them (faults avoided), never drops them as
    untouched, and the read-ahead window stays whole. (Verify once read without setting the
    accessed bit: validation dropped its read-ahead and cut the window to one page.)"""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory", "64MiB", "--swap-file", str(short_tmp / "swap"), "--swap-size", "64MiB"
        )
        d.start_agent("a", memory="16MiB")
        agent = d.control_socket("a")
        write_all_then_halt(agent, 4096)
        asyncio.run(ctl(d.socket, "set_host_limit", size="8MiB"))  # most of it goes to swap
        deadline = time.monotonic() + 30
        while (st := asyncio.run(ctl(d.socket, "status")))["vms"][0]["pages"]["swapped"] < 2048:
            # Where it stands if it fails: page states, the swap file, memsched's state.
            where = {k: st[k] for k in ("host", "swap") if k in st}
            assert time.monotonic() < deadline, (
                "the daemon did not swap the guest out",
                st["vms"][0]["pages"],
                where,
            )
            time.sleep(0.05)
        asyncio.run(ctl(d.socket, "set_host_limit", size="64MiB"))
        result = asyncio.run(ctl(agent, "verify"))
        assert result["mismatches"] == 0 and result["pages_verified"] == 4096
        # Every page read ahead was read by verify within milliseconds: once validated,
        # each is a fault avoided.
        deadline = time.monotonic() + 30
        while (ra := asyncio.run(ctl(d.socket, "status"))["vms"][0]["readahead"])["held_now"]:
            assert time.monotonic() < deadline, ra
            time.sleep(0.1)
        assert ra["faults_avoided"] > 1000, ra
        # Without verify's accessed bit nearly all were recovered (hit ratio ~0); a loaded
        # machine may let a few holds end otherwise, so not exactly none.
        assert ra["frames_recovered"] <= ra["faults_avoided"] // 20 and ra["hit_ratio"] >= 0.9, ra


@pytest.mark.timeout(120)
def test_an_idle_guest_whose_balloon_cannot_inflate_is_swapped_out(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A guest that wrote all its memory (its programs' pages: no free page, no page cache
    for its balloon to take) and then touches 2 % of it: memsched's plan gives the reclaim
    to its balloon (a small working set leaves it room), which takes nothing. The balloon
    is judged stalled after a window and swap takes its share, so the host gets under its
    limit; every page reads back. (Before, the balloon's share was never swapped: the host
    stayed over its limit for good, which CI once saw as "the daemon did not swap the
    guest out".)"""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            *("--host-memory", "64MiB", "--swap-file", str(short_tmp / "swap")),
            *("--swap-size", "64MiB", "--sample-period", "0.5"),
        )
        d.start_agent("a", memory="16MiB")
        agent = d.control_socket("a")
        write_all_then_halt(agent, 4096)
        idle = {"duration": 60, "working_set": 0.02, "write_ratio": 0.0, "distribution": "uniform"}
        asyncio.run(ctl(agent, "run_phase", phase=idle))
        deadline = time.monotonic() + 40  # the fill took at most 30 s, the swap-out 30 more
        while (
            est := asyncio.run(ctl(d.socket, "status"))["vms"][0]["sampling"]["estimate_fraction"]
        ) is None or est > 0.3:
            assert time.monotonic() < deadline, f"the estimate did not fall: {est}"
            time.sleep(0.1)
        asyncio.run(ctl(agent, "halt"))
        asyncio.run(ctl(d.socket, "set_host_limit", size="8MiB"))
        deadline = time.monotonic() + 30
        while (vm := asyncio.run(ctl(d.socket, "status"))["vms"][0])["pages"]["swapped"] < 2048:
            assert time.monotonic() < deadline, (vm["pages"], vm["memsched"])
            time.sleep(0.05)
        assert vm["memsched"]["balloon_stalled"] and vm["memsched"]["balloon_pages"] == 0
        asyncio.run(ctl(d.socket, "set_host_limit", size="64MiB"))
        result = asyncio.run(ctl(agent, "verify"))
        assert result["mismatches"] == 0 and result["pages_verified"] == 4096
