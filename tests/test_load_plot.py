"""``vmmem-load --plot FILE.png`` (issue 11, load generator): the run sampled over time (each
VM's resident, swapped and shared pages, the host's free frames, fault latency p50/p99),
the samples kept in the JSON report and drawn with matplotlib into a PNG.

A real short run on a real daemon and two 16 MiB guests, under a host limit so that pages
are swapped during it."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm_agent.load.plot import write_plot

from .procs import daemons, load_json, run_load

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(60)
def test_plot_of_a_real_run_and_its_samples(short_tmp: Path, mem_dir: Path) -> None:
    """A PNG of the figure's size; the report's samples: over time, for each VM, with the
    pages the daemon counts and the agents' fault latencies, mid-phase and at phase ends."""
    png, out = short_tmp / "run.png", short_tmp / "r.json"
    with daemons(short_tmp, mem_dir) as d:
        swap = ("--swap-file", str(short_tmp / "swap"), "--swap-size", "64MiB")
        d.start_platform("--host-memory", "64MiB", *swap)
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        res = run_load(
            "--socket", str(d.socket), "--expect-vms", "2", "--scenario", "overcommit",
            "--host-limit", "24MiB", "--duration", "3", "--pinned-pages", "4",
            "--json", str(out), "--plot", str(png), "--no-progress", timeout=45,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
    assert _png_size(png) == (800, 720)
    assert png.stat().st_size > 20_000  # three panels of lines, not an empty canvas
    report = load_json(out)
    samples = report["samples"]
    phases = [p["name"] for p in report["phases"]]
    assert [s["phase"] for s in samples if s["phase"] in phases]  # every sample in a phase
    assert {s["phase"] for s in samples} == set(phases)
    assert len(samples) > len(phases)  # sampled during the phases, not only at their ends
    times = [s["seconds"] for s in samples]
    assert times == sorted(times) and times[0] >= 0
    for s in samples:
        assert set(s["vms"]) == {"a", "b"}
        assert isinstance(s["host_free_pages"], int)
    last = samples[-1]["vms"]
    for name in ("a", "b"):
        # Each page written is held or swapped (but zero pages, 5 % of the writes).
        held = last[name]["resident_pages"] + last[name]["swapped_pages"]
        assert 0.9 * report["vms"][name]["pages_written"] <= held <= 4096
        faults = [s["vms"][name]["faults"] for s in samples]
        assert faults == sorted(faults) and 0 < faults[-1] <= report["vms"][name]["faults"]
        assert last[name]["fault_p99_seconds"] >= last[name]["fault_p50_seconds"] > 0
    # The host limit is below the guests' memory: something was swapped out on the way.
    assert max(s["vms"][n]["swapped_pages"] for s in samples for n in ("a", "b")) > 0


@pytest.mark.timeout(20)
def test_plot_with_holes_and_bad_plot_flags(tmp_path: Path) -> None:
    """Samples the daemon could not give (None) are skipped, not drawn as 0; a --plot that
    is not a .png or has no directory is one line and exit 2, before any run."""
    vm = {
        "resident_pages": 10, "swapped_pages": 0, "shared_pages": None, "accesses": 5,
        "faults": 1, "fault_p50_seconds": 1e-4, "fault_p99_seconds": 2e-3,
    }  # fmt: skip
    hole = dict.fromkeys(vm)
    samples = [
        {"seconds": 0.5, "phase": "p", "host_free_pages": 100, "vms": {"a": vm}},
        {"seconds": 1.0, "phase": "p", "host_free_pages": None, "vms": {"a": hole}},
        {"seconds": 1.5, "phase": "q", "host_free_pages": 90, "vms": {"a": vm}},
    ]
    png = tmp_path / "p.png"
    write_plot({"scenario": "basic", "verdict": "OK", "samples": samples}, png)
    assert _png_size(png) == (800, 720)
    write_plot({"scenario": "basic", "verdict": "OK", "samples": []}, png)  # nothing sampled
    for bad, why in ((tmp_path / "p.svg", "must end in .png"), (tmp_path / "no/p.png", "no dir")):
        res = run_load("--socket", str(tmp_path / "none.sock"), "--plot", str(bad), timeout=15)
        assert res.returncode == 2 and why in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
