"""The load generator's report: one table for people, one JSON document for programs.

The verdict keeps apart what an operator must not confuse:

- ``data_loss``: a page read back did not hold what the guest wrote (a mismatch, during the
  run or in the verification pass), page checking found a mapped frame that does not hold
  what the guest wrote (read by the guest or not), or a page could not be read for a reason
  other than memory (a swap slot that fails its checksum);
- ``violation``: a service took a page while it was pinned;
- ``unreachable``: the host is out of memory and swap. Faults failed with OUT_OF_MEMORY, so
  some accesses were not done and some pages could not be brought back to be verified, but
  everything that was read matched;
- ``incomplete``: a VM left the run (lost, not answering, failed, or not verifiable because
  the daemon was unreachable), or the daemon was unreachable at the end.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .balloon_report import balloon_lines
from .fmt import latency, table
from .hugepages_run import hugepages_lines
from .numa_run import numa_lines

#: Exit status of ``vmmem-load`` for each outcome (2 is for bad flags / cannot start).
EXIT_STATUS = {"ok": 0, "data_loss": 1, "violation": 1, "unreachable": 3, "incomplete": 3}
#: The error code, as the agent reports it, of a fault that found no free frame.
OUT_OF_MEMORY = "out_of_memory"


def _vm_entry(
    res: dict[str, Any], ver: dict[str, Any], daemon_vm: dict[str, Any]
) -> dict[str, Any]:
    stats = daemon_vm.get("stats", {})
    by_error: dict[str, int] = ver.get("unreachable_by_error", {})
    # An agent that does not say why a page was unreachable: count it as unreadable.
    unexplained = ver["unreachable"] - sum(by_error.values())
    return {
        "pages_touched": res["touched"],
        "pages_written": res["pages_written"],
        "reads": res["reads"],
        "writes": res["writes"],
        "faults": res["faults"],
        "faults_by_reason": res["faults_by_reason"],
        "fault_errors": res["fault_errors"],
        "fault_latency_seconds": res["fault_latency_seconds"],
        "swap": {
            "pages_out": stats.get("swapped_out", 0),
            "pages_in": stats.get("swapped_in", 0),
            "cancelled": stats.get("swap_cancelled", 0),
        },
        "retired_moves": stats.get("retired_moves", 0),
        "sharing": daemon_vm.get("sharing", {}),
        "working_set": daemon_vm.get("sampling", {}),
        "lowprio": res.get("lowprio", {}),
        "batches": res["batches"],
        "batch_pages": res["batch_pages"],
        "released_while_pinned": res["released_while_pinned"],
        "pin_violations": res["pin_violations"],
        "pin_cycles": res["pin_cycles"],
        "verification": {
            "pages_verified": ver["pages_verified"],
            # Every guest read is checked: count mismatches of the run and of the pass.
            "mismatches": max(ver["mismatches"], res["verification"]["mismatches"]),
            "unreachable": ver["unreachable"],
            "unreachable_by_error": {
                **by_error,
                **({"unknown": unexplained} if unexplained else {}),
            },
            "reads_checked_during_run": res["verification"]["pages_verified"],
            # Guest accesses not done during the run because their fault failed.
            "accesses_failed": res["verification"].get("accesses_failed", {}),
            # Page checking: mapped pages the monitor re-verified, read by the guest or not.
            "pages_checked": res.get("page_check", {}).get("checked", 0),
            "page_check_mismatches": res.get("page_check", {}).get("mismatches", 0),
        },
    }


def build_report(
    scenario: str,
    seconds: float,
    results: dict[str, dict[str, Any]],
    verify: dict[str, dict[str, Any]],
    status: dict[str, Any] | None,
    injected: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    left: dict[str, dict[str, Any]] | None = None,
    daemon: dict[str, Any] | None = None,
    phases: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Combine the verified VMs' results and passes, the VMs that left the run, the daemon's
    status (None if it could not be reached) and its gaps, into the report and its verdict."""
    daemon_vms = {vm["name"]: vm for vm in (status or {}).get("vms", [])}
    vms = {
        name: _vm_entry(res, verify[name], daemon_vms.get(name, {}))
        for name, res in results.items()
    }
    faults: Counter[str] = Counter()
    for v in vms.values():
        faults.update(v["faults_by_reason"])
    left = left or {}
    skipped = {n: {"reason": v["reason"]} for n, v in left.items() if v["state"] == "skipped"}
    not_verified = {n: v for n, v in left.items() if v["state"] != "skipped"}
    total = _totals(vms)
    swap = {
        k: sum(v["swap"][k] for v in vms.values()) for k in ("pages_out", "pages_in", "cancelled")
    }
    host = (status or {}).get("host", {})
    report: dict[str, Any] = {
        "scenario": scenario,
        "seconds": round(seconds, 3),
        "verification": total,
        "swap": swap,
        "swap_device": (status or {}).get("swap"),
        "faults": dict(faults),
        "retired_frames": host.get("retired", 0),
        "injected_failures": injected,
        "host": host,
        **(extra or {}),
        "phases": phases or [],
        "vms": vms,
        "not_verified": not_verified,
        "skipped": skipped,
        "daemon": daemon or {"reachable_at_end": status is not None, "gaps": []},
    }
    report.update(verdict(report))
    return report


def _totals(vms: dict[str, Any]) -> dict[str, Any]:
    ver = [v["verification"] for v in vms.values()]
    by_error: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for v in ver:
        by_error.update(v["unreachable_by_error"])
        failed.update(v["accesses_failed"])
    return {
        "pages_verified": sum(v["pages_verified"] for v in ver),
        "mismatches": sum(v["mismatches"] for v in ver),
        "unreachable": sum(v["unreachable"] for v in ver),
        "unreachable_out_of_memory": by_error[OUT_OF_MEMORY],
        # Pages that could not be read back for any other reason: treated as lost.
        "unreadable": sum(n for code, n in by_error.items() if code != OUT_OF_MEMORY),
        "unreachable_by_error": dict(by_error),
        "accesses_failed": dict(failed),
        "pages_checked": sum(v["pages_checked"] for v in ver),
        "page_check_mismatches": sum(v["page_check_mismatches"] for v in ver),
    }


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The outcome (most severe first), one line saying all of it, and ``ok``."""
    t, vms, gone = report["verification"], report["vms"], report["not_verified"]
    mismatches = t["mismatches"] + sum(v["mismatches_seen"] for v in gone.values())
    oom_accesses = t["accesses_failed"].get(OUT_OF_MEMORY, 0)
    pins = sum(v["pin_violations"] for v in vms.values())
    pinned_swaps = sum(v["released_while_pinned"].get("swap", 0) for v in vms.values())
    parts: list[tuple[str, str]] = []
    checks = t.get("page_check_mismatches", 0)  # corrupt pages the guest may never read
    if mismatches or checks or t["unreadable"]:
        detail = _join(
            [
                (mismatches, "mismatches"),
                (checks, "page-check mismatches"),
                (t["unreadable"], "pages could not be read back"),
            ]
        )
        parts.append(("data_loss", f"FAILED: data loss ({detail})"))
    if pins or pinned_swaps:
        detail = _join([(pins, "pin violations"), (pinned_swaps, "pages swapped while pinned")])
        parts.append(("violation", f"FAILED: {detail}"))
    if t["unreachable_out_of_memory"] or oom_accesses:
        parts.append(("unreachable", _unreachable(report, mismatches, oom_accesses)))
    incomplete = [f"{name} {v['state'].replace('_', ' ')}" for name, v in sorted(gone.items())]
    if not report["daemon"]["reachable_at_end"]:
        incomplete.append("the platform daemon is unreachable")
    if not vms and not gone and not incomplete:
        incomplete.append("no VM was verified")
    if incomplete:
        parts.append(("incomplete", "INCOMPLETE: " + ", ".join(incomplete)))
    if not parts:
        parts.append(("ok", "OK: every page verified"))
    return {
        "outcome": parts[0][0],
        "outcomes": [p[0] for p in parts],
        "verdict": "; ".join(p[1] for p in parts),
        "ok": parts[0][0] == "ok",
    }


def _unreachable(report: dict[str, Any], mismatches: int, oom_accesses: int) -> str:
    t = report["verification"]
    detail = _join(
        [
            (t["unreachable_out_of_memory"], "pages could not be brought back"),
            (oom_accesses, "accesses failed"),
        ]
    )
    device = report.get("swap_device")
    if device:
        detail += f"; swap {device['used']:,} of {device['slots']:,} slots used"
    elif report["host"]:
        detail += "; no swap device"
    if not mismatches:
        detail += "; every page read matched"
    return f"UNREACHABLE: the host is out of memory and swap ({detail})"


def _join(counts: list[tuple[int, str]]) -> str:
    return ", ".join(f"{n:,} {what}" for n, what in counts if n)


def exit_status(report: dict[str, Any]) -> int:
    """0 for a clean run; 1 for data loss or a violation; 3 for unreachable or incomplete."""
    return EXIT_STATUS[report["outcome"]]  # the most severe outcome comes first


#: The per-VM table's columns (the latencies carry their unit: µs, ms or s).
_HEAD = (
    "VM", "touched", "written", "faults", "p50", "p99",
    "swap out", "swap in", "cancel", "verified", "mismatch",
)  # fmt: skip


def _vm_row(name: str, v: dict[str, Any]) -> list[str]:
    lat = v["fault_latency_seconds"]
    counts = [v["pages_touched"], v["pages_written"], v["faults"]]
    swap = [v["swap"]["pages_out"], v["swap"]["pages_in"], v["swap"]["cancelled"]]
    ver = [v["verification"]["pages_verified"], v["verification"]["mismatches"]]
    return [
        name,
        *(f"{n:,}" for n in counts),
        latency(lat["p50"]),
        latency(lat["p99"]),
        *(f"{n:,}" for n in swap + ver),
    ]


def render_table(report: dict[str, Any]) -> str:
    """A table, one row per VM with each column as wide as its widest cell, then the VMs that
    left the run, then totals."""
    rows = [_vm_row(name, v) for name, v in sorted(report["vms"].items())]
    head, rule, *body = table(_HEAD, rows)
    lines = [f"scenario {report['scenario']}, {report['seconds']:.1f} s", head, rule, *body]
    for name, v in sorted(report["not_verified"].items()):
        where = f" in phase {v['phase']}" if v["phase"] else ""
        lines.append(
            f"{name:<9} {v['state'].replace('_', ' ').upper()}: {v['reason']}{where} at "
            f"{v['at_seconds']:.1f} s — not verified"
        )
    for name, v in sorted(report["skipped"].items()):
        lines.append(f"{name:<9} skipped: {v['reason']}")
    t = report["verification"]
    lines.append(rule)
    faults = ", ".join(f"{k} {n:,}" for k, n in sorted(report["faults"].items()))
    lines.append(f"faults by reason: {faults or 'none'}")
    failed = ", ".join(f"{k} {n:,}" for k, n in sorted(t["accesses_failed"].items()))
    if failed:
        lines.append(f"accesses not done, their fault failed: {failed}")
    s = report["swap"]
    lines.append(
        f"swap: {s['pages_out']:,} out, {s['pages_in']:,} in, {s['cancelled']:,} "
        f"cancelled; retired frames: {report['retired_frames']}"
    )
    lines.extend(_daemon_lines(report["daemon"]))
    lines.extend(_lowprio_lines(report))
    if "balloon" in report:
        lines.extend(balloon_lines(report["balloon"]))
    if "numa" in report:
        lines.extend(numa_lines(report["numa"]))
    if "hugepages" in report:
        lines.extend(hugepages_lines(report["hugepages"]))
    if t.get("pages_checked"):
        lines.append(
            f"page checking: {t['pages_checked']:,} pages checked, "
            f"{t['page_check_mismatches']} mismatches"
        )
    lines.append(
        f"verification: {t['pages_verified']:,} pages, {t['mismatches']} mismatches, "
        f"{t['unreachable']} unreachable — {report['verdict']}"
    )
    return "\n".join(lines)


def _daemon_lines(daemon: dict[str, Any]) -> list[str]:
    """When the platform daemon could not be reached, and what was missed meanwhile."""
    lines = []
    for gap in daemon.get("gaps", []):
        end = f"{gap['to_seconds']:.1f} s" if gap["to_seconds"] is not None else "the end"
        missed = ", ".join(sorted(set(gap["missed"]))) or "nothing"
        lines.append(
            f"daemon: unreachable from {gap['from_seconds']:.1f} s to {end} ({gap['error']}); "
            f"missed: {missed}"
        )
    pids = daemon.get("pids", [])
    if len(pids) > 1:
        lines.append("daemon: restarted during the run (pids " + " → ".join(map(str, pids)) + ")")
    for refused in daemon.get("refused", []):
        lines.append(f"daemon refused {refused['op']}: {refused['error']}")
    return lines


def _lowprio_lines(report: dict[str, Any]) -> list[str]:
    """The low-priority scenarios' own figures, when the report has them."""
    lines = []
    for key in ("sharing", "lowprio", "sampling"):
        if "unavailable" in report.get(key, {}):
            lines.append(f"{key}: not available: {report[key]['unavailable']}")
    if "shared_pages" in report.get("sharing", {}):
        sh = report["sharing"]
        lines.append(
            f"sharing: {sh['shared_pages']:,} of {sh['shareable_pages']:,} shareable pages "
            f"shared ({sh['found_fraction']:.1%}), {sh['frames_saved']:,} frames saved "
            f"(of {sh['saveable_frames']:,} saveable), {sh['cow_breaks']:,} COW breaks"
        )
    if "vms" in report.get("lowprio", {}):
        lp = report["lowprio"]
        for name, v in sorted(lp["vms"].items()):
            lines.append(
                f"lowprio {name}: sensitivity {v['latency_sensitivity']}, bound "
                f"{v['bound_seconds'] * 1e3:.2f} ms, used {v['time_used_per_second'] * 1e3:.2f}"
                f" ms/s of {v['bound_per_second'] * 1e3:.1f}, overrun p99 "
                f"{v['overrun_p99_fraction']:.1%} of the bound"
            )
        lines.append(f"lowprio overrun p99: {lp['overrun_p99_fraction']:.1%} of the bound")
    if "max_abs_error" in report.get("sampling", {}):
        sa = report["sampling"]
        lines.append(
            f"sampling: max |estimate - truth| {sa['max_abs_error']:.1%} of guest memory "
            f"after 3 periods ({sa['max_abs_error_all']:.1%} over all periods)"
        )
    return lines
