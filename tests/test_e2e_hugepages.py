"""2M promotion, defrag and splitting end to end: a real daemon with ``--hugepages`` and a
swap file, two small agents, the load generator's ``hugepages`` scenario, every page
verified."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from .procs import BIN, ctl, daemons, load_json, run_load

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(90)
def test_hugepages_scenario_promotes_splits_under_pressure_and_loses_nothing(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Two 16 MiB VMs write all their memory: promotion maps most of it large (coverage
    grows over time); the lowered host limit makes reclaim take pages, which splits large
    regions (counted); the report has the coverage timeline and the splits, 0 mismatches;
    the operator sees coverage in ``vmmem-ctl status``; the invariants hold at the end."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory",
            "96MiB",
            "--hugepages",
            "--swap-file",
            str(short_tmp / "swap"),
            "--swap-size",
            "32MiB",
        )
        for name in ("a", "b"):
            d.start_agent(name, memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "hugepages",
            "--expect-vms",
            "2",
            "--duration",
            "15",
            "--json",
            str(out),
            "--no-progress",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        hp = report["hugepages"]
        assert hp["enabled"] and hp["pressure_at_seconds"] is not None, hp["notes"]
        for name in ("a", "b"):
            vm = hp["vms"][name]
            assert vm["coverage_max"] >= 0.5, vm
            covered = [c for _, c, _ in vm["timeline"]]
            assert covered[0] < vm["coverage_max"]  # it grew over the run
            assert vm["promoted_regions"] >= 4
        assert sum(vm["splits"] for vm in hp["vms"].values()) > 0
        assert "hugepages: coverage" in res.stdout
        status = subprocess.run(
            [str(BIN / "vmmem-ctl"), "--socket", str(d.socket), "status"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "2 MB pages: " in status.stdout and "coverage" in status.stdout
        check = asyncio.run(ctl(d.socket, "check"))
        assert check["violations"] == [], check
