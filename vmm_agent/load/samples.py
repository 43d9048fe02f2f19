"""Samples over time: what the plots draw, taken during the run and kept in the report.

Every ``SAMPLE_PERIOD`` seconds of a phase, the load generator asks each agent for its
results (accesses, faults, fault latency quantiles) and the daemon for its status (each
VM's pages by state, shared pages; the host's free frames). A sample keeps only the
figures plotted, so a long run's report stays small (a few hundred bytes a VM a second).
A figure the daemon could not give (unreachable, a gap) is None, not a guess.
"""

from __future__ import annotations

from typing import Any

#: Seconds between two samples during a phase.
SAMPLE_PERIOD = 1.0
#: Page states that hold a frame (the p2m's counts in the daemon's status).
HELD_STATES = ("exposed", "selected", "in_flight", "resident")


def _vm(res: dict[str, Any] | None, st: dict[str, Any] | None) -> dict[str, Any]:
    pages: dict[str, int] | None = st.get("pages") if st else None
    lat = (res or {}).get("fault_latency_seconds", {})
    return {
        "accesses": None if res is None else res["reads"] + res["writes"],
        "faults": None if res is None else res["faults"],
        "fault_p50_seconds": lat.get("p50"),
        "fault_p99_seconds": lat.get("p99"),
        "resident_pages": None if pages is None else sum(pages.get(s, 0) for s in HELD_STATES),
        "swapped_pages": None if pages is None else pages.get("swapped", 0),
        "shared_pages": None if st is None else st.get("sharing", {}).get("shared_pages"),
        "swapped_out": None if st is None else st.get("stats", {}).get("swapped_out"),
        "swapped_in": None if st is None else st.get("stats", {}).get("swapped_in"),
    }


def make_sample(
    seconds: float,
    phase: str,
    results: dict[str, dict[str, Any]],
    status: dict[str, Any] | None,
) -> dict[str, Any]:
    """One sample at ``seconds`` into the run: the agents' ``results`` (by VM; a VM that
    did not answer is absent) and the daemon's ``status`` (None if it did not answer)."""
    by_name = {vm["name"]: vm for vm in (status or {}).get("vms", [])}
    names = sorted(set(results) | set(by_name))
    host = (status or {}).get("host")
    return {
        "seconds": round(seconds, 3),
        "phase": phase,
        "host_free_pages": None if host is None else host.get("free"),
        "host_limit_pages": None if host is None else host.get("limit_pages"),
        "vms": {name: _vm(results.get(name), by_name.get(name)) for name in names},
    }
