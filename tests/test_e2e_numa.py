"""NUMA migration end to end: real daemons, the load generator's numa scenario, every page
verified, and what an operator sees (``vmmem-ctl status``, Prometheus, ``set-lowprio``)."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from .procs import BIN, ctl, daemons, free_port, load_json, run_load

pytestmark = pytest.mark.e2e


def _filler_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("vmmem-numa-*")}


@pytest.mark.timeout(90)
def test_numa_scenario_brings_a_vms_memory_home(short_tmp: Path, mem_dir: Path) -> None:
    """A filler VM fills node 0 and leaves after the VM (home node 0) wrote its 2048 pages,
    so they start on node 1; migration brings them home: the report's local fraction goes
    from about 0 to at least 95 % within a few seconds, every page verifies, the filler is
    gone with its files, and status and metrics show local and remote pages."""
    filler_dirs = _filler_dirs()
    port = free_port()
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "32MiB", "--numa-nodes", "2", metrics_port=port)
        d.start_agent("a", "--home-node", "0", memory="8MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "numa",
            "--duration",
            "8",
            "--json",
            str(out),
            "--no-progress",
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        numa = report["numa"]
        assert numa["node"] == 0 and numa["filler_pages"] > 4000, numa
        assert numa["filler_pages_written"] >= numa["filler_pages"]
        vm = numa["vms"]["a"]
        assert vm["local_fraction_start"] <= 0.1, vm  # most of it on the wrong node
        assert vm["local_fraction_end"] >= 0.95, vm
        assert vm["seconds_to_95"] is not None and vm["seconds_to_95"] <= 4.0, vm
        assert vm["migrated_pages"] >= 0.9 * 2048
        fractions = [f for _, f in vm["timeline"]]
        assert fractions[0] <= 0.1 and max(fractions) >= 0.95
        assert "95 % local after" in res.stdout

        # The filler left: not registered, no process, its files removed.
        vms = asyncio.run(ctl(d.socket, "list_vms"))["vms"]
        assert [v["name"] for v in vms] == ["a"]
        assert _filler_dirs() <= filler_dirs

        # The operator sees it: status, Prometheus, and the rates as settings.
        status = subprocess.run(
            [str(BIN / "vmmem-ctl"), "--socket", str(d.socket), "status"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "numa: home node 0" in status.stdout and "remote 0 (100.0% local)" in status.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'vmmem_vm_remote_pages{vm="a"} 0.0' in metrics
        assert 'vmmem_vm_local_pages{vm="a"}' in metrics
        assert "vmmem_numa_migrated_pages_total" in metrics
        subprocess.run(
            [
                str(BIN / "vmmem-ctl"),
                "--socket",
                str(d.socket),
                "set-lowprio",
                "--numa-migrate-rate",
                "100",
                "--numa-host-migrate-rate",
                "500",
            ],
            check=True,
            capture_output=True,
        )
        st = asyncio.run(ctl(d.socket, "status"))
        assert st["lowprio"]["numa_migrate_rate"] == 100
        assert st["lowprio"]["numa_host_migrate_rate"] == 500
        refused = subprocess.run(
            [
                str(BIN / "vmmem-ctl"),
                "--socket",
                str(d.socket),
                "set-lowprio",
                "--numa-migrate-rate",
                "-1",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode == 1 and "numa_migrate_rate" in refused.stderr
        assert asyncio.run(ctl(d.socket, "status"))["lowprio"]["numa_migrate_rate"] == 100
