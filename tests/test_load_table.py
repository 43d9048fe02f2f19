"""The load generator's report table stays aligned whatever the numbers (issue 11, load
generator): latencies carry their unit in a bounded width, every column is as wide as its
widest cell, so p50 and p99 never run together, for tiny and huge values alike."""

from __future__ import annotations

from typing import Any

import pytest

from vmm_agent.load.fmt import LATENCY_WIDTH, latency
from vmm_agent.load.report import build_report, render_table


def _result(p50: float, p99: float, n: int) -> dict[str, Any]:
    """An agent's ``results`` as the load generator receives it, with the given figures."""
    return {
        "touched": n,
        "pages_written": n,
        "reads": n,
        "writes": n,
        "faults": n,
        "faults_by_reason": {"first_touch": n},
        "fault_errors": 0,
        "fault_latency_seconds": {"p50": p50, "p99": p99},
        "batches": {},
        "batch_pages": {},
        "released_while_pinned": {},
        "pin_violations": 0,
        "pin_cycles": 0,
        "verification": {"mismatches": 0, "pages_verified": n},
    }


def _table(vms: dict[str, tuple[float, float, int]]) -> list[str]:
    results = {name: _result(*fig) for name, fig in vms.items()}
    verify = {
        name: {"pages_verified": n, "mismatches": 0, "unreachable": 0}
        for name, (_, _, n) in vms.items()
    }
    report = build_report("basic", 1.0, results, verify, {"vms": [], "host": {}}, [])
    return render_table(report).splitlines()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.00 µs"),
        (3e-9, "0.00 µs"),
        (4.2e-7, "0.42 µs"),
        (1.5e-5, "15.0 µs"),
        (9.9996e-4, "1.00 ms"),
        (0.123456, "123 ms"),
        (1.5, "1.50 s"),
        (12345.0, "1.2e+04 s"),
        (1e300, "1.0e+300 s"),
        (float("nan"), "—"),
        (-1.0, "—"),
    ],
)
@pytest.mark.timeout(5)
def test_latency_has_a_unit_and_bounded_width(seconds: float, text: str) -> None:
    """Each latency reads in µs, ms or s with three significant digits, never wider than
    LATENCY_WIDTH (bar absurd values past 1e100 s, which still keep a space and a unit)."""
    assert latency(seconds) == text
    if seconds < 1e100:
        assert len(latency(seconds)) <= LATENCY_WIDTH


@pytest.mark.timeout(5)
def test_columns_align_with_huge_and_tiny_values() -> None:
    """Huge latencies (past 1 s) and counts, tiny latencies, a long VM name: every row has its
    cells ending where the head's do, and p50 and p99 stay apart."""
    lines = _table(
        {
            "a": (3e-9, 4e-7, 1),
            "a-very-long-vm-name": (2.5, 12345.0, 9_876_543_210),
            "c": (0.000999, 0.999, 12_345),
        }
    )
    head, rule, *rows = lines[1:5]
    assert set(rule) == {"-"} and len(rule) >= len(head)
    # The right edge of every right-aligned column, as the head sets it.
    names = ["touched", "written", "faults", "p50", "p99", "swap out", "swap in", "cancel"]
    names += ["verified", "mismatch"]
    edges = [head.index(name) + len(name) for name in names]
    for row in rows:
        assert len(row) == len(head)
        for edge in edges:
            assert row[edge - 1] != " ", (row, edge)  # a cell ends here ...
            assert row[edge : edge + 2] in {"  ", ""}, (row, edge)  # ... and two spaces follow
    big = rows[1].split()
    assert big[0] == "a-very-long-vm-name"
    assert big[4:8] == ["2.50", "s", "1.2e+04", "s"]  # p50 and p99, apart, with units
    assert "9,876,543,210" in big
    tiny = rows[0].split()
    assert tiny[4:8] == ["0.00", "µs", "0.40", "µs"]
