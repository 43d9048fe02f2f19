"""``vmmem-load compare A.json B.json``: two reports side by side, with the differences.

This is how a policy change is judged: run the same scenario before and after, then compare.
Each figure is shown for A and B, then B - A and (B - A) / A. Rows: the totals (faults, the
worst VM's fault latency p50/p99, swap in/out, verification), each VM's own figures (a VM in
only one report shows ``—`` on the other side), then every number of the scenario-specific
sections (balloon, numa, hugepages, sharing, lowprio, sampling) that both reports have.

A missing, unreadable or invalid file is one line on stderr and exit status 2; otherwise 0
(comparing is not judging: the verdicts are printed, the exit status does not depend on them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .fmt import latency, table

PROG = "vmmem-load compare"
#: Keys a report always has (report.build_report); a file without them is not a report.
REQUIRED = ("scenario", "seconds", "verification", "swap", "faults", "vms", "verdict")
#: The scenario-specific sections compared when both reports have them.
SECTIONS = ("balloon", "numa", "hugepages", "sharing", "lowprio", "sampling")

#: A figure: its value in A and B (None when absent) and whether it is a latency in seconds.
Row = tuple[str, float | None, float | None, bool]


class CompareError(Exception):
    """A report file that cannot be compared; the message names the file and why."""


def load_report(path: Path) -> dict[str, Any]:
    """The report in ``path``, or CompareError saying what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompareError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        report = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path}: not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise CompareError(f"{path}: not a vmmem-load report (a JSON object is expected)")
    missing = [key for key in REQUIRED if key not in report]
    if missing:
        raise CompareError(
            f"{path}: not a vmmem-load report (no {', '.join(missing)}; write one with --json)"
        )
    if not isinstance(report["vms"], dict) or not isinstance(report["verification"], dict):
        raise CompareError(f"{path}: not a vmmem-load report (vms and verification are objects)")
    return report


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _get(d: dict[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return _num(d)


def _worst(report: dict[str, Any], q: str) -> float | None:
    values = [_get(v, "fault_latency_seconds", q) for v in report["vms"].values()]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def total_rows(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    """The run's totals."""
    rows: list[Row] = [
        ("faults", sum(a["faults"].values()), sum(b["faults"].values()), False),
        ("fault p50 (worst VM)", _worst(a, "p50"), _worst(b, "p50"), True),
        ("fault p99 (worst VM)", _worst(a, "p99"), _worst(b, "p99"), True),
    ]
    for key in ("pages_out", "pages_in", "cancelled"):
        rows.append(
            (f"swap {key.replace('_', ' ')}", _get(a, "swap", key), _get(b, "swap", key), False)
        )
    for key in ("pages_verified", "mismatches", "unreachable"):
        rows.append(
            (
                key.replace("_", " "),
                _get(a["verification"], key),
                _get(b["verification"], key),
                False,
            )
        )
    return rows


def vm_rows(va: dict[str, Any] | None, vb: dict[str, Any] | None) -> list[Row]:
    """One VM's figures (either side may be None: the VM is not in that report)."""
    spec: list[tuple[str, tuple[str, ...], bool]] = [
        ("faults", ("faults",), False),
        ("fault p50", ("fault_latency_seconds", "p50"), True),
        ("fault p99", ("fault_latency_seconds", "p99"), True),
        ("swap out", ("swap", "pages_out"), False),
        ("swap in", ("swap", "pages_in"), False),
        ("pages written", ("pages_written",), False),
        ("pages verified", ("verification", "pages_verified"), False),
        ("mismatches", ("verification", "mismatches"), False),
    ]
    return [(label, _get(va, *keys), _get(vb, *keys), lat) for label, keys, lat in spec]


def _leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a nested section, by its dotted path (lists are not compared)."""
    if isinstance(d, dict):
        for key, value in d.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif (n := _num(d)) is not None:
        yield prefix, n


def section_rows(sa: dict[str, Any], sb: dict[str, Any]) -> list[Row]:
    """The numbers of a scenario section present in both reports, in A's order."""
    lb = dict(_leaves(sb))
    return [
        (path, value, lb[path], path.endswith("_seconds") and "latency" in path)
        for path, value in _leaves(sa)
        if path in lb
    ]


def _cells(label: str, a: float | None, b: float | None, lat: bool) -> list[str]:
    def show(v: float | None) -> str:
        if v is None:
            return "—"
        if lat:
            return latency(v)
        return f"{v:,.0f}" if v == int(v) else f"{v:,.4g}"

    if a is None or b is None:
        return [label, show(a), show(b), "—", "—"]
    diff = b - a
    sign = "+" if diff > 0 else "-" if diff < 0 else ""
    delta = sign + (latency(abs(diff)) if lat else show(abs(diff)))
    rel = f"{diff / a:+.1%}" if a else ("—" if not diff else "new")
    return [label, show(a), show(b), delta, rel]


def render(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """The side-by-side text."""
    lines = [
        f"A: {name_a}: scenario {a['scenario']}, {a['seconds']:.1f} s — {a['verdict']}",
        f"B: {name_b}: scenario {b['scenario']}, {b['seconds']:.1f} s — {b['verdict']}",
    ]
    if a["scenario"] != b["scenario"]:
        lines.append("note: the scenarios differ; the figures may not be comparable")
    groups: list[tuple[str, list[Row]]] = [("totals", total_rows(a, b))]
    for name in sorted(set(a["vms"]) | set(b["vms"])):
        groups.append((f"VM {name}", vm_rows(a["vms"].get(name), b["vms"].get(name))))
    for key in SECTIONS:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            rows = section_rows(a[key], b[key])
            if rows:
                groups.append((key, rows))
    body: list[list[str]] = []
    for title, rows in groups:
        body.append([title, "", "", "", ""])
        body.extend(_cells("  " + label, va, vb, lat) for label, va, vb, lat in rows)
    lines.extend(table(["", "A", "B", "B - A", "relative"], body))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``compare A.json B.json``: print the comparison (0), or one error line (2)."""
    usage = "usage: vmmem-load compare A.json B.json (two reports written with --json)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 2 or any(arg.startswith("-") for arg in argv):
        print(f"{PROG}: {usage}", file=sys.stderr)
        return 2
    try:
        a, b = (load_report(Path(arg)) for arg in argv)
    except CompareError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(render(a, b, argv[0], argv[1]), flush=True)
    return 0
