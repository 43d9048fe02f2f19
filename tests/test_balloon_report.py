"""The balloon scenario's report from collected figures (no processes): frames freed apart
from pages given, who gave first, and the ballooning-against-swap verdict."""

from __future__ import annotations

from typing import Any

from vmm_agent.load.balloon_report import balloon_lines, balloon_report
from vmm_agent.load.balloon_run import PassRecord

ROLES = {"a": "idle", "b": "busy"}


def _memsched(balloon: int, swap: int, backed_off: bool = False) -> dict[str, Any]:
    return {
        "rho": 0.1,
        "stall_fraction": 0.0,
        "refaults_per_second": 0.0,
        "wss_pages": 100,
        "reclaimed": {"balloon": balloon, "swap": swap},
        "balloon_pages": balloon,
        "balloon_target": balloon,
        "swapped_pages": swap,
        "stall_seconds": 0.0,
        "backed_off": backed_off,
    }


def _status(held: dict[str, int], given: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return {
        "vms": [
            {
                "name": name,
                "pages": {"exposed": held[name]},
                "stats": {"swapped_in": 0},
                "memsched": _memsched(*given[name]),
            }
            for name in held
        ]
    }


def _results(pass_name: str, phase: str, aps: float) -> dict[str, Any]:
    return {
        "phase_throughput": [{"phase": f"{pass_name}.{phase}", "accesses_per_second": aps}],
        "refaults": 0,
        "faults_by_reason": {},
        "guest_os": {"balloon_touches": 0, "balloon_returns": 0},
    }


def _record(
    name: str, idle: tuple[int, int], busy: tuple[int, int], busy_kept: float, unbacked: int = 0
) -> PassRecord:
    """A pass where the idle VM ``a`` gave ``idle`` (balloon, swap) pages from t=0.25 s and
    the busy VM ``b`` gave ``busy`` from t=0.5 s, and ``b`` kept ``busy_kept`` of its
    throughput; every page given freed a frame but ``unbacked`` of ``a``'s (free pages the
    guest never wrote)."""
    r = PassRecord(name, ROLES, limit_pages=1000)
    r.start = _status({"a": 1000, "b": 1000}, {"a": (0, 0), "b": (0, 0)})
    held = {"a": 1000 - sum(idle) + unbacked, "b": 1000 - sum(busy)}
    r.end = _status(held, {"a": idle, "b": busy})
    r.timeline = [
        (0.25, {"a": _memsched(*idle), "b": _memsched(0, 0)}),
        (0.5, {"a": _memsched(*idle), "b": _memsched(*busy, backed_off=True)}),
    ]
    r.settle = {n: _results(name, "settle", 1000.0) for n in ROLES}
    r.reclaim = {"a": _results(name, "reclaim", 1000.0), "b": _results(name, "reclaim", 0.0)}
    r.reclaim["b"]["phase_throughput"][0]["accesses_per_second"] = 1000.0 * busy_kept
    return r


def test_idle_tax_backoff_and_the_cheaper_method() -> None:
    report = balloon_report(
        [
            _record("balloon", idle=(600, 0), busy=(100, 100), busy_kept=0.9, unbacked=200),
            _record("swap", idle=(0, 500), busy=(0, 200), busy_kept=0.6),
        ]
    )
    on = report["passes"]["balloon"]
    # 600 pages ballooned, 200 of them never backed: 400 frames freed.
    assert on["vms"]["a"]["reclaimed"] == {"balloon": 600, "swap": 0}
    assert on["vms"]["a"]["frames_freed"] == 400 and on["vms"]["b"]["frames_freed"] == 200
    assert on["idle_tax"] == {"idle_gave_more": True, "first_to_give": "idle", "order": ["a", "b"]}
    assert on["backed_off"] == ["b"] and on["vms"]["b"]["backed_off_at"] == 0.5
    busy = report["comparison"]["busy"]
    # 10 % lost for 200 frames (0.5 per 1,000) against 40 % for 200 (2.0 per 1,000).
    assert busy["balloon_pass"]["loss_per_1000_frames"] == 0.5
    assert busy["swap_only"]["loss_per_1000_frames"] == 2.0
    assert busy["balloon_pass"]["by_balloon"] == 0.5
    assert busy["ballooning_cheaper"] is True
    # The idle VM lost nothing either way: no verdict from noise.
    assert report["comparison"]["idle"]["ballooning_cheaper"] is None
    text = "\n".join(balloon_lines(report))
    assert "ballooning cheaper: yes" in text and "no measurable cost either way" in text
    assert "0.5s" in text  # when b backed off


def test_swap_costlier_is_said_and_one_pass_has_no_comparison() -> None:
    report = balloon_report(
        [
            _record("balloon", idle=(600, 0), busy=(0, 200), busy_kept=0.5),
            _record("swap", idle=(0, 600), busy=(0, 200), busy_kept=0.8),
        ]
    )
    assert report["comparison"]["busy"]["ballooning_cheaper"] is False
    assert "ballooning cheaper: NO" in "\n".join(balloon_lines(report))
    alone = balloon_report([_record("swap", idle=(0, 100), busy=(0, 300), busy_kept=0.8)])
    assert alone["comparison"] is None
    assert alone["passes"]["swap"]["idle_tax"]["idle_gave_more"] is False


def test_a_vm_without_figures_is_named_not_guessed() -> None:
    r = _record("balloon", idle=(600, 0), busy=(100, 100), busy_kept=0.9)
    del r.reclaim["b"]  # left the run during reclaim
    p = balloon_report([r])["passes"]["balloon"]
    assert p["missing"] == ["b"] and list(p["vms"]) == ["a"]
    assert "b       no figures" in "\n".join(balloon_lines(balloon_report([r])))
