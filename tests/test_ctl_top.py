"""``vmmem-ctl top``: rates from two samples, an 80-column screen, a clear end when the daemon goes.

The rate and layout functions are checked with hand-made status samples; the command itself
against a real daemon and two real agents.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from platform_daemon import ctl
from platform_daemon.ctl_top import (
    REASONS,
    Sample,
    compact,
    render,
    run_top,
    sort_rows,
    vm_rows,
)

from .procs import BIN, daemons
from .procs import ctl as ctl_request


def vm(
    vm_id: int,
    name: str,
    *,
    guest: int = 4096,
    exposed: int = 0,
    swapped: int = 0,
    shared: int = 0,
    wss: int | None = None,
    faults: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One VM as ``status`` reports it (the fields top reads)."""
    return {
        "vm_id": vm_id,
        "name": name,
        "guest_pages": guest,
        "pages": {"zero": guest - exposed - swapped, "exposed": exposed, "swapped": swapped},
        "sharing": {"shared_pages": shared},
        "sampling": {"estimate_pages": wss},
        "faults_by_reason": {r: (faults or {}).get(r, 0) for r in REASONS},
    }


def status(*vms: dict[str, Any], pages: int = 16384, free: int = 16000) -> dict[str, Any]:
    return {
        "uptime_seconds": 3725.0,
        "host": {
            "pages": pages,
            "page_size": 4096,
            "free": free,
            "used": pages - free,
            "retired": 0,
            "limit_pages": pages,
            "free_state": "high",
        },
        "swap": {"path": "/x", "slots": 1000, "used": 250, "free": 750, "full": False},
        "vms": list(vms),
    }


def test_rates_are_the_difference_of_two_samples_over_their_interval() -> None:
    """Pages and fault counts 2 s apart: each rate is (new - old) / 2, per reason and in all."""
    prev = Sample(
        10.0,
        status(
            vm(1, "a", exposed=100, swapped=50, shared=4, wss=1000, faults={"first_touch": 10}),
            vm(2, "gone-and-back", faults={"swap_in": 100}),
        ),
    )
    cur = Sample(
        12.0,
        status(
            vm(
                1,
                "a",
                exposed=300,
                swapped=10,
                shared=4,
                wss=1200,
                faults={"first_touch": 30, "swap_in": 5},
            ),
            vm(2, "other", faults={"swap_in": 300}),  # same id, another VM: no rate
            vm(3, "new"),
        ),
    )
    rows = {r.now.name: r for r in vm_rows(prev, cur)}
    a = rows["a"]
    assert (a.resident_rate, a.swapped_rate, a.shared_rate, a.wss_rate) == (100, -20, 0, 100)
    assert a.fault_rates is not None
    assert a.fault_rates["first_touch"] == 10 and a.fault_rates["swap_in"] == 2.5
    assert a.fault_rate == 12.5
    for name in ("other", "new"):
        assert rows[name].fault_rates is None and rows[name].resident_rate is None
    screen = render(prev, cur, sort="name")
    line = next(s for s in screen if s.startswith("a "))
    assert line.split() == ["a", "4096", "300", "100", "10", "-20", "4", "0", "1200", "100", "12.5"]
    new = next(s for s in screen if s.startswith("new "))
    # No earlier sample of this VM: figures, and '-' for every rate.
    assert new.split()[2:] == ["0", "-", "0", "-", "0", "-", "-", "-", "-"]


def test_counters_that_went_down_give_no_rate_and_a_first_screen_has_none() -> None:
    """A fault counter lower than before (counters restarted): '-', never a negative rate."""
    prev = Sample(0.0, status(vm(1, "a", faults={"cow": 50})))
    cur = Sample(1.0, status(vm(1, "a", faults={"cow": 20})))
    assert vm_rows(prev, cur)[0].fault_rates is None
    assert vm_rows(None, cur)[0].resident_rate is None


def test_compact_numbers_fit_six_columns() -> None:
    """Any figure, huge or negative, fits a column; small ones stay exact."""
    assert [compact(v) for v in (None, 0, 12345, 99999, 2.5, 150.7)] == [
        "-",
        "0",
        "12345",
        "99999",
        "2.5",
        "151",
    ]
    assert compact(123456) == "123.5k" and compact(1e6) == "1.0M" and compact(-2e9) == "-2.0G"
    for v in (
        *(10.0**e for e in range(25)),
        *(-(10.0**e) for e in range(25)),
        99999.5,
        -99999.5,
        0.04,
    ):
        assert len(compact(v)) <= 6, v


def test_screen_never_exceeds_80_columns_with_many_vms_and_huge_numbers() -> None:
    """300 VMs with long names and figures in the trillions: every line within 80 columns,
    names cut with '~', every column still there; a terminal's height cuts the tables."""
    huge = 10**15
    vms = [
        vm(
            i,
            f"a-very-long-virtual-machine-name-{i}",
            guest=huge,
            exposed=huge // 2 + i,
            swapped=huge // 3,
            shared=huge // 5,
            wss=huge // 7,
            faults={r: huge + i for r in REASONS},
        )
        for i in range(300)
    ]
    prev = Sample(0.0, status(*vms, pages=huge, free=huge // 2))
    grown = [{**v, "faults_by_reason": {r: 3 * huge for r in REASONS}} for v in vms]
    cur = Sample(0.001, status(*grown, pages=huge, free=huge // 2))
    screen = render(prev, cur, sort="resident")
    assert max(len(line) for line in screen) <= 80
    rows = [line for line in screen if line.startswith("a-very-l~")]
    assert len(rows) == 600  # the VM table and the fault table
    assert all(len(r.split()) in (11, 8) for r in rows)
    assert screen[1].startswith("host state HIGH") and screen[2].startswith("frames ")
    short = render(prev, cur, width=60, rows=5)
    assert max(len(line) for line in short) <= 60
    assert sum(1 for line in short if line.startswith("a-very")) == 10
    assert any("295 more VMs" in line for line in short)


def test_sort_orders_by_the_chosen_column() -> None:
    """--sort: a figure descending (unknown last), name ascending."""
    prev = Sample(0.0, status(vm(1, "b", faults={"cow": 1}), vm(2, "a"), vm(3, "c")))
    cur = Sample(
        1.0,
        status(
            vm(1, "b", exposed=5, faults={"cow": 9}),
            vm(2, "a", exposed=9, faults={"cow": 1}),
            vm(4, "d", exposed=7),
        ),
    )
    rows = vm_rows(prev, cur)
    assert [r.now.name for r in sort_rows(rows, "cow")] == ["b", "a", "d"]
    assert [r.now.name for r in sort_rows(rows, "resident")] == ["a", "d", "b"]
    assert [r.now.name for r in sort_rows(rows, "name")] == ["a", "b", "d"]


def test_once_takes_two_samples_an_interval_apart() -> None:
    """--once: one screen whose rates span the interval slept between its two samples."""
    samples = iter([status(vm(1, "a", exposed=0)), status(vm(1, "a", exposed=500))])
    clock = iter([100.0, 102.0])
    slept: list[float] = []
    out = io.StringIO()
    run_top(
        lambda: next(samples),
        interval=2.0,
        once=True,
        sort="faults",
        out=out,
        clock=lambda: next(clock),
        sleep=slept.append,
    )
    assert slept == [2.0]
    text = out.getvalue()
    assert "interval 2.0s" in text and "\x1b" not in text  # not a terminal: no escapes
    assert next(s for s in text.splitlines() if s.startswith("a ")).split()[2:4] == ["500", "250"]


def test_bad_interval_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--interval 0 is refused by the parser with one line, before any connection."""
    with pytest.raises(SystemExit) as exc:
        ctl.main(["--socket", "/nonexistent/x.sock", "top", "--interval", "0"])
    assert exc.value.code == 2
    assert "must be from 0.1 to 3600 seconds" in capsys.readouterr().err


def run_ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "vmmem-ctl"), "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.timeout(40)
def test_top_once_shows_every_vm_and_the_host_within_80_columns(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A real daemon, two agents faulting: top --once prints both VMs with fault rates, the
    host and swap lines, nothing over 80 columns; per-reason counts add up to all faults."""
    phase = {"name": "fill", "duration": 3.0, "working_set": 1.0, "write_ratio": 0.5}
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "32MiB")
        d.start_agent("first-vm-with-a-long-name", memory="4MiB")
        d.start_agent("b", memory="4MiB")
        for name in d.agents:
            asyncio.run(ctl_request(d.control_socket(name), "run_phase", phase=phase))

        def status_now() -> dict[str, Any]:
            return asyncio.run(ctl_request(d.socket, "status"))

        wait_for(
            lambda: all(v["faults_by_reason"]["first_touch"] > 0 for v in status_now()["vms"]),
            "first-touch faults on both VMs",
        )
        res = run_ctl(d.socket, "top", "--once", "--interval", "0.5", "--sort", "name")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert max(map(len, lines)) <= 80
        assert lines[1].startswith("host state ") and "limit 32MiB" in lines[1]
        vm_lines = [line.split() for line in lines if line.startswith(("first-vm~", "b "))]
        assert [v[0] for v in vm_lines] == ["b", "first-vm~", "b", "first-vm~"]
        assert all(v[1] == "1024" for v in vm_lines[:2])  # guest pages
        assert all(v[-1] != "-" for v in vm_lines)  # fault rates from two samples
        for name in d.agents:
            asyncio.run(ctl_request(d.control_socket(name), "halt"))
        for v in status_now()["vms"]:
            assert sum(v["faults_by_reason"].values()) == v["stats"]["faults"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_lost_daemon_ends_top_with_one_line_and_exit_2(short_tmp: Path, mem_dir: Path) -> None:
    """The daemon stops under a running top: one error line, exit 2, no traceback; no daemon
    at all: the same."""
    with daemons(short_tmp, mem_dir) as d:
        platform = d.start_platform("--host-memory", "16MiB")
        out = short_tmp / "top.out"
        with open(out, "w") as f:
            top = subprocess.Popen(
                [str(BIN / "vmmem-ctl"), "--socket", str(d.socket), "top", "--interval", "0.2"],
                stdout=f,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            wait_for(lambda: out.read_text().count("vmmem top") >= 2, "two screens")
            platform.terminate()
            platform.wait(10)
            _, err = top.communicate(timeout=10)
        finally:
            if top.poll() is None:
                top.kill()
                top.wait()
        assert top.returncode == 2
        assert len(err.splitlines()) == 1 and "lost the platform daemon" in err, err
    res = run_ctl(short_tmp / "p.sock", "top", "--once")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot reach the platform" in res.stderr
