"""``vmmem-load compare A.json B.json`` (issue 11, load generator): two reports side by side
with their differences, per VM and in total, and the scenario sections both have; a missing
or invalid file is one clear line and exit 2.

The reports come from real short runs (real daemon, two 16 MiB guests, vmmem-load as a user
runs it), the second with twice the working set, so the figures differ."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .procs import daemons, load_json, run_load

pytestmark = pytest.mark.e2e


def _two_runs(tmp: Path, mem_dir: Path) -> tuple[Path, Path]:
    """Two real runs on the same VMs, A then B, their reports written with --json."""
    paths = (tmp / "a.json", tmp / "b.json")
    with daemons(tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        for path, ws in zip(paths, ("0.2", "0.6"), strict=True):
            res = run_load(
                "--socket", str(d.socket), "--expect-vms", "2", "--duration", "1",
                "--working-set", ws, "--json", str(path), "--no-progress", timeout=30,
            )  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
    return paths


def _row(out: str, group: str, label: str) -> list[str]:
    """The cells of ``label``'s row in ``group`` (split on the two-space column gap)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == group)
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in {group!r}:\n{out}")


def _count(text: str) -> int:
    return int(text.replace(",", "").replace("+", ""))


@pytest.mark.timeout(40)
def test_compare_two_real_reports(short_tmp: Path, mem_dir: Path) -> None:
    """Each VM's and the total figures of A and B, B - A and the relative change, with the
    numbers of the JSON reports; latencies with units; exit 0."""
    a_path, b_path = _two_runs(short_tmp, mem_dir)
    a, b = load_json(a_path), load_json(b_path)
    res = run_load("compare", str(a_path), str(b_path), timeout=15)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"A: {a_path}: scenario basic" in out and "OK: every page verified" in out
    fa, fb = sum(a["faults"].values()), sum(b["faults"].values())
    cells = _row(out, "totals", "faults")
    assert [_count(c) for c in cells[1:4]] == [fa, fb, fb - fa]
    assert cells[4] == f"{(fb - fa) / fa:+.1%}"
    for name in ("a", "b"):
        va, vb = a["vms"][name], b["vms"][name]
        cells = _row(out, f"VM {name}", "pages written")
        assert [_count(c) for c in cells[1:4]] == [
            va["pages_written"], vb["pages_written"], vb["pages_written"] - va["pages_written"],
        ]  # fmt: skip
        assert _count(_row(out, f"VM {name}", "pages verified")[2]) == vb["pages_written"]
        p99 = _row(out, f"VM {name}", "fault p99")
        assert all(re.fullmatch(r"[+-]?[\d.e+]+ (µs|ms|s)", c) for c in p99[1:4]), p99
    for label in ("swap pages out", "swap pages in", "mismatches", "fault p50 (worst VM)"):
        _row(out, "totals", label)


@pytest.mark.timeout(10)
def test_compare_sections_both_have(tmp_path: Path) -> None:
    """A scenario section's numbers are compared when both reports have it, and left out
    when only one does; a VM in one report only shows — on the other side."""
    base: dict[str, Any] = {
        "scenario": "sharing", "seconds": 1.0, "verdict": "OK", "faults": {"first_touch": 10},
        "swap": {"pages_out": 0, "pages_in": 0, "cancelled": 0},
        "verification": {"pages_verified": 4, "mismatches": 0, "unreachable": 0},
        "vms": {"a": {"faults": 10, "fault_latency_seconds": {"p50": 1e-5, "p99": 2e-3}}},
    }  # fmt: skip
    sharing_a = {"shared_pages": 100, "found_fraction": 0.5, "cow_breaks": 3}
    a = {**base, "sharing": sharing_a, "numa": {"x": 1}}
    b = {**base, "sharing": {"shared_pages": 150, "found_fraction": 0.75}, "vms": {}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    res = run_load("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), timeout=10)
    assert res.returncode == 0, res.stderr
    assert _row(res.stdout, "sharing", "shared_pages")[1:] == ["100", "150", "+50", "+50.0%"]
    assert _row(res.stdout, "sharing", "found_fraction")[1:] == ["0.5", "0.75", "+0.25", "+50.0%"]
    assert "numa" not in res.stdout and "cow_breaks" not in res.stdout  # only A has them
    assert _row(res.stdout, "VM a", "faults")[1:] == ["10", "—", "—", "—"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a vmmem-load report"),
        ('{"scenario": "basic"}', "no seconds, verification, swap, faults, vms, verdict"),
    ],
)
def test_compare_bad_file_is_one_line_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    """A missing, non-JSON or non-report file: one line naming the file and why, exit 2."""
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {
                "scenario": "basic", "seconds": 1.0, "verdict": "OK", "faults": {}, "vms": {},
                "swap": {}, "verification": {},
            }
        )
    )  # fmt: skip
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    res = run_load("compare", str(good), str(bad), timeout=10)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert str(bad) in res.stderr and message in res.stderr, res.stderr
    res = run_load("compare", str(good), timeout=10)
    assert res.returncode == 2 and "usage: vmmem-load compare A.json B.json" in res.stderr
