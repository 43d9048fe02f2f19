"""Low-priority services end to end: real daemons, the load generator's scenarios, every page
verified.

The scenarios set the daemon's sampling period and sharing scan period for their run (and
restore them), so short runs still see several periods and full scans.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from vmm_agent.rpc import PeerError

from .procs import BIN, ctl, daemons, load_json, run_load

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(180)
def test_sharing_scenario_merges_what_is_shareable_and_loses_nothing(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Three VMs write mostly zero and corpus pages; while they only read, page sharing merges
    nearly everything the guest model says is shareable, saving frames; then writes into
    shared pages break merges (COW), and every page verifies."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "128MiB")
        for name in ("a", "b", "c"):
            d.start_agent(name, memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "sharing",
            "--expect-vms",
            "3",
            "--duration",
            "12",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        sharing = report["sharing"]
        assert sharing["shareable_pages"] > 0.7 * 3 * 4096  # the guests wrote mostly shareable
        assert sharing["shared_pages"] >= 0.9 * sharing["shareable_pages"], sharing
        assert sharing["shared_pages"] <= sharing["shareable_pages"]
        assert sharing["frames_saved"] >= 0.9 * sharing["saveable_frames"], sharing
        assert sharing["cow_breaks"] > 0
        # Writes broke merges: fewer pages shared at the end than after the merge phase.
        assert sharing["after_cow"]["shared_pages"] < sharing["shared_pages"]
        assert "sharing:" in res.stdout
        # The operator sees it too.
        status = subprocess.run(
            [str(BIN / "vmmem-ctl"), "--socket", str(d.socket), "status"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "frames saved" in status.stdout and "COW breaks" in status.stdout
        # The run's settings were restored afterwards.
        st = asyncio.run(ctl(d.socket, "status"))
        assert st["lowprio"]["share_scan_period_seconds"] == 30.0


@pytest.mark.timeout(180)
def test_sampling_scenario_estimate_follows_the_true_working_set(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A fill, then phases of 70 %, 35 %, 90 % and 50 % working sets, ten sampling periods
    of wall time each, 1000-page samples: after three periods of a phase the estimate is
    within 10 % of guest memory of the true fraction of pages touched in each period. The
    fill takes the first touches (a stall) out of the phases, so each gets its periods
    however busy the host."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB", "--sample-seed", "3")
        d.start_agent("a", memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "sampling",
            "--sample-pages",
            "1000",
            "--duration",
            "16",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        sampling = report["sampling"]
        for name, per_vm in sampling["phases"].items():
            row = per_vm["a"]
            assert row["periods"] >= 4, (name, row)
            # The truth is the pages the guest touched in the period: at most the phase's
            # working set, and near it (a busy host gives the vCPUs fewer accesses per
            # period of guest time, so a few of the set's pages go untouched).
            wanted = int(name.removeprefix("ws")) / 100
            assert 0.8 * wanted <= row["truth"][-1] <= wanted + 0.01, (name, row)
        assert sampling["max_abs_error"] <= 0.10, sampling
        assert "sampling:" in res.stdout


@pytest.mark.timeout(180)
def test_latency_scenario_gives_each_vm_its_own_bound(short_tmp: Path, mem_dir: Path) -> None:
    """Two VMs of latency sensitivity 0 and 1 get bounds of 8 and 4 ms; both run low-priority
    rounds; the report gives time used per second against each bound and the overrun p99."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "latency",
            "--expect-vms",
            "2",
            "--duration",
            "6",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        lowprio = report["lowprio"]
        bounds = {v["latency_sensitivity"]: v["bound_seconds"] for v in lowprio["vms"].values()}
        assert bounds == {0: 0.008, 1: 0.004}
        for vm in lowprio["vms"].values():
            assert vm["rounds"] > 0
            # Rounds ran, and took the guest out for no more than the bound allows a second
            # (overruns are machine tails: measured by benchmarks/lowprio.py, not asserted).
            assert 0 < vm["time_used_per_second"] <= vm["bound_per_second"], vm
        # The agents' sensitivities were restored after the run.
        for name in ("a", "b"):
            summary = asyncio.run(ctl(d.control_socket(name), "lowprio"))
            assert summary["latency_sensitivity"] == 0
        # The rounds a page at a time: after a round's start, the rounds after it (more may
        # have run since); an ``after`` that is no finite number is refused.
        starts = [r["started"] for r in summary["rounds"]]
        assert len(starts) >= 3 and starts == sorted(starts)
        later = asyncio.run(ctl(d.control_socket("b"), "lowprio", after=starts[1]))
        assert [r["started"] for r in later["rounds"]][: len(starts) - 2] == starts[2:]
        with pytest.raises(PeerError, match="after"):
            asyncio.run(ctl(d.control_socket("b"), "lowprio", after=10**400))


@pytest.mark.timeout(180)
def test_sampling_estimate_is_not_biased_by_swapping(short_tmp: Path, mem_dir: Path) -> None:
    """The same phases on a host limited below the guest's larger working sets: pages are
    swapped out and back in during the run, and the estimate still follows the true working
    set (a sampled page that was swapped out is still watched, and its next touch counted)."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory",
            "64MiB",
            "--sample-seed",
            "5",
            "--swap-file",
            str(short_tmp / "swap"),
            "--swap-size",
            "64MiB",
        )
        d.start_agent("a", memory="32MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "sampling",
            "--sample-pages",
            "1000",
            "--host-limit",
            "20MiB",
            "--sample-period",
            "0.2",
            "--duration",
            "20",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["swap"]["pages_out"] > 1000 and report["swap"]["pages_in"] > 1000
        sampling = report["sampling"]
        # Periods run on guest time, which a guest waiting on the platform (first touches of
        # a new working set, swap-ins) gets little of: such phases see fewer periods, the 70
        # and 90 % ones maybe none in 5 s. The 35 % phase comes back to pages the 70 % one
        # pushed out to swap (the host holds 60 % of the guest): it is measured.
        phases = {name: per_vm["a"] for name, per_vm in sampling["phases"].items()}
        assert phases["ws35"]["periods"] >= 2, phases
        # Judged: the phases with two periods or more; ws35, the one that comes back to
        # swapped pages, always among them (10-13 periods). A phase's first period starts
        # on the previous phase's working set, and with one period only the estimate is
        # still catching up (CI saw ws70 get one period, estimate 0.49 for a truth of 0.70,
        # once swap-ins got faster). ws50 usually gets ~10, but once got none: after ws90
        # it starts by swapping back in, on guest time.
        phases = {name: p for name, p in phases.items() if p["periods"] >= 2}
        # A period is judged only where the monitor's truth window lies in its phase too:
        # the next sample may reach the monitor after the phase ended, and such a truth
        # mixes two working sets (CI once saw 0.33 of error from it in ws35's last period).
        # The last period of each phase: the bias this guards against (counting only
        # resident pages) would miss every touch of a swapped page, tens of % of guest
        # memory in the swapping phases; the estimate may still be catching up on a change
        # of phase, hence the margin.
        for name, p in phases.items():
            error = abs(p["estimate"][-1] - p["truth"][-1])
            assert error <= 0.15, (name, p)
