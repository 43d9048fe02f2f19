"""The sampling report: which periods it compares with the guest's truth, and how."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_lowprio_agent import Rig, record
from vmm_agent import lowprio
from vmm_agent.load import driver
from vmm_agent.load.lowprio_report import PhaseWindow, latency_report, sampling_report

PHASES = [
    PhaseWindow("fill", 0.0, 10.0),
    PhaseWindow("ws35", 10.0, 20.0),
    PhaseWindow("ws90", 20.1, 30.0),
]


def period(sample_id: int, started: float, ended: float, estimate: float | None) -> dict[str, Any]:
    return {
        "sample_id": sample_id,
        "started": started,
        "ended": ended,
        "armed": 100,
        "touched": 35,
        "estimate": estimate,
    }


@pytest.mark.timeout(10)
def test_a_period_whose_truth_window_leaks_into_the_next_phase_is_not_compared() -> None:
    """The platform ended period 3 inside ws35, but its next sample reached the monitor only
    after ws90 had started, so its truth counts ws90's touches too: it is compared with
    nothing and counted as such. Periods whose both windows lie in a phase are compared."""
    history = {
        "a": [
            period(1, 10.5, 11.0, 0.36),
            period(2, 11.0, 11.5, 0.35),
            period(3, 19.6, 19.95, 0.35),
            period(4, 20.4, 20.8, 0.9),
        ]
    }
    truths = {"a": {"1": 0.35, "2": 0.35, "3": 0.68, "4": 0.9}}
    windows = {
        "a": {"1": [10.6, 11.02], "2": [11.02, 11.6], "3": [19.61, 20.4], "4": [20.4, 20.81]}
    }
    report = sampling_report(history, truths, PHASES, windows, converge_periods=1)
    ws35 = report["phases"]["ws35"]["a"]
    assert ws35["periods"] == 2 and ws35["truth_outside_phase"] == 1
    assert ws35["truth"] == [0.35, 0.35] and ws35["estimate"] == [0.36, 0.35]
    assert ws35["max_abs_error_all"] == pytest.approx(0.01)
    assert ws35["max_abs_error"] == 0.0
    ws90 = report["phases"]["ws90"]["a"]
    assert ws90["periods"] == 1 and ws90["truth_outside_phase"] == 0
    assert "fill" not in report["phases"]
    assert report["max_abs_error_all"] == pytest.approx(0.01)


@pytest.mark.timeout(10)
def test_a_period_is_compared_only_when_measured_inside_the_phase() -> None:
    """Left out: a platform period that straddles two phases, one with no estimate (the
    monitor never armed it) and one with no recorded truth, none of them counted as a truth
    outside the phase (nothing was measured in it). A measured period whose truth window was
    not recorded cannot be placed in the phase: it counts as outside."""
    history = {
        "a": [
            period(1, 19.0, 20.5, 0.4),
            period(2, 12.0, 12.5, None),
            period(3, 13.0, 13.5, 0.35),
            period(4, 14.0, 14.5, 0.35),
        ]
    }
    truths = {"a": {"1": 0.35, "2": 0.35, "4": 0.35}}
    windows = {"a": {"1": [19.1, 19.2], "2": [12.1, 12.6], "3": [13.1, 13.6]}}
    ws35 = sampling_report(history, truths, PHASES, windows)["phases"]["ws35"]["a"]
    assert ws35["periods"] == 0
    assert ws35["truth_outside_phase"] == 1  # period 4: measured, truth without a window


class PagedAgent:
    """The agent's ``lowprio`` op over a real LowPriorityLoop, with a small reply budget so
    the rounds take several pages (the link is the fake; the paging under test is the
    driver's, the pages the loop's)."""

    name = "g0"

    def __init__(self, budget: int) -> None:
        self.loop = Rig().loop
        for i in range(20):
            self.loop.records.append(record(float(i), steps=10))
        self.budget = budget
        self.calls: list[float] = []

    async def call(self, op: str, during: str = "", **args: Any) -> dict[str, Any] | None:
        assert op == "lowprio"
        self.calls.append(args["after"])
        rounds, more = self.loop.rounds(args["after"], budget=self.budget)
        return {**self.loop.summary(), "rounds": rounds, "more": more}


@pytest.mark.timeout(10)
async def test_the_latency_report_gets_every_round_of_the_window_over_several_pages() -> None:
    """Rounds 0..19 kept, the last phase 4.5..15.5, three rounds a page: the driver asks on
    from the last round it got until the window is passed, and keeps the rounds 5..15."""
    agent = PagedAgent(budget=3 * (lowprio._ROUND_JSON_BYTES + 10 * lowprio._STEP_JSON_BYTES))
    got = await driver._agent_rounds(agent, PhaseWindow("run", 4.5, 15.5))  # type: ignore[arg-type]
    assert got is not None
    assert [r["started"] for r in got["rounds"]] == [float(i) for i in range(5, 16)]
    assert len(agent.calls) == 4  # 5-7, 8-10, 11-13, 14-16: past the window, stop
    report = latency_report({"g0": got}, PhaseWindow("run", 4.5, 15.5))
    assert report["rounds"] == 11
