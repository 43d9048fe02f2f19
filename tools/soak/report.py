"""The soak's timeline (printed as it happens), its figures and its final summary."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .plan import Kind, MemoryVerdict, Settings


@dataclass
class Report:
    """Everything the soak saw; ``lines()`` is the summary, ``to_json()`` the same as data."""

    settings: Settings
    timeline: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    checks_run: int = 0
    checks_ok: int = 0
    check_times: list[float] = field(default_factory=list)
    violations: Counter[str] = field(default_factory=Counter)
    retired_by_kind: Counter[str] = field(default_factory=Counter)
    #: The most pages in swap at once, and each VM's swap-outs and swap-ins as last seen,
    #: by (daemon pid, vm id): a daemon's counters start at 0, a VM's end with its agent.
    swap_peak: int = 0
    swap_traffic: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    #: Agents killed: what each had done, from its ``results`` just before.
    killed: list[dict[str, Any]] = field(default_factory=list)
    #: The agents alive at the end: ``results`` and ``verify`` of each.
    verified: list[dict[str, Any]] = field(default_factory=list)
    memory_verdicts: list[MemoryVerdict] = field(default_factory=list)
    #: Every daemon process: when it started and was ready, and each look at its memory.
    daemons: list[dict[str, Any]] = field(default_factory=list)
    #: Every process the soak started: label, pid, exit code.
    processes: list[dict[str, Any]] = field(default_factory=list)
    #: The soak's directories (removed when it ends).
    files: list[str] = field(default_factory=list)
    #: Warning and error lines of every process's log, when the soak failed.
    problems: dict[str, list[str]] = field(default_factory=dict)

    def event(self, t: float, kind: str, text: str, **data: Any) -> None:
        self.timeline.append({"t": round(t, 2), "kind": kind, "text": text, **data})
        print(f"{t:7.1f}s  {kind:<7} {text}", flush=True)

    def failure(self, t: float, text: str) -> None:
        self.failures.append(f"{t:.1f}s: {text}")
        print(f"{t:7.1f}s  FAIL    {text}", flush=True)

    def checked(self, out: dict[str, Any]) -> None:
        self.checks_run += 1
        self.checks_ok += bool(out["ok"])
        self.check_times.append(float(out["seconds"]))
        for v in out["violations"]:
            self.violations[v["name"]] += 1

    def swap_seen(self, status: dict[str, Any]) -> None:
        """Swap as one ``status`` shows it (taken at every check and before every kill)."""
        if status["swap"] is not None:
            self.swap_peak = max(self.swap_peak, status["swap"]["used"])
        for vm in status["vms"]:
            stats = vm["stats"]
            key = (status["pid"], vm["vm_id"])
            self.swap_traffic[key] = (stats["swapped_out"], stats["swapped_in"])

    @property
    def swap_outs(self) -> int:
        return sum(out for out, _ in self.swap_traffic.values())

    @property
    def swap_ins(self) -> int:
        return sum(in_ for _, in_ in self.swap_traffic.values())

    def verification(self, label: str, results: dict[str, Any], verify: dict[str, Any]) -> None:
        keep = ("reads", "writes", "pages_written", "mismatches", "fault_errors", "pin_violations")
        self.verified.append({"vm": label, **{k: results[k] for k in keep}, "verify": verify})

    def incarnation(self, label: str, results: dict[str, Any]) -> None:
        keep = ("reads", "writes", "pages_written", "mismatches", "fault_errors")
        self.killed.append({"vm": label, **{k: results[k] for k in keep}})

    @property
    def passed(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        s, c = self.settings, self.counts
        reads = sum(v["reads"] for v in self.verified) + sum(k["reads"] for k in self.killed)
        pages = sum(v["verify"]["pages_verified"] for v in self.verified)
        mismatches = sum(v["verify"]["mismatches"] + v["mismatches"] for v in self.verified)
        mismatches += sum(k["mismatches"] for k in self.killed)
        retired = ", ".join(f"{n} {k}" for k, n in sorted(self.retired_by_kind.items()))
        ms = [t * 1000 for t in self.check_times] or [0.0]
        out = [
            f"== soak summary: {s.seconds:g} s, seed {s.seed}; {s.agents} guests x "
            f"{s.guest_mib} MiB on a {s.limit_mib} MiB host limit, {s.swap_mib} MiB swap ==",
            f"events: {c[Kind.DAEMON_KILL]} daemon kills + takeovers, {c[Kind.AGENT_KILL]} agent "
            f"kills + restarts, {c[Kind.RETIRE]} frames retired ({retired or 'none'})",
            f"swap: at least {self.swap_outs:,} pages swapped out and {self.swap_ins:,} swapped "
            f"in; at most {self.swap_peak:,} in swap at once",
            f"checks: {self.checks_run} run, {self.checks_ok} passed"
            + (f", violations {dict(self.violations)}" if self.violations else "")
            + f" (median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms)",
            f"guests: {len(self.verified) + len(self.killed)} agent processes, {reads:,} reads "
            f"checked while running; {pages:,} pages read back at the end by "
            f"{len(self.verified)} agents; {mismatches} mismatches",
            "daemon memory (per daemon process, from warm-up to its end):",
            *(f"  {v.text}{'' if v.flat else '  NOT FLAT'}" for v in self.memory_verdicts),
        ]
        if self.failures:
            out.append(f"FAILED ({len(self.failures)}):")
            out += [f"  {f}" for f in self.failures]
            for label, lines in self.problems.items():
                if lines:
                    out.append(f"  log of {label} (warnings and errors, last {len(lines)}):")
                    out += [f"    {ln[:300]}" for ln in lines]
        out.append("RESULT: " + ("PASS" if self.passed else "FAIL"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "settings": asdict(self.settings),
            "failures": self.failures,
            "events": dict(self.counts),
            "retired_by_kind": dict(self.retired_by_kind),
            "swap": {"peak": self.swap_peak, "outs": self.swap_outs, "ins": self.swap_ins},
            "checks": {
                "run": self.checks_run,
                "ok": self.checks_ok,
                "violations": dict(self.violations),
                "seconds": self.check_times,
            },
            "killed_agents": self.killed,
            "verified": self.verified,
            "memory": [asdict(v) for v in self.memory_verdicts],
            "daemons": self.daemons,
            "processes": self.processes,
            "files": self.files,
            "timeline": self.timeline,
            "problems": self.problems,
        }
