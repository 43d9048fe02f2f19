"""Named scenarios: sequences of workload phases, sized by the total duration."""

from __future__ import annotations

from dataclasses import dataclass

from shared.workload import ContentMix, Phase


@dataclass(frozen=True)
class Scenario:
    """Phases run on every VM at once, plus host settings the scenario needs."""

    name: str
    phases: list[Phase]
    host_limit: str | None = None


def basic(
    duration: float,
    working_set: float,
    distribution: str,
    write_ratio: float,
    pinned_pages: int = 0,
) -> Scenario:
    """One phase with the given shape."""
    phase = Phase(
        name="basic",
        duration=duration,
        working_set=working_set,
        distribution=distribution,
        write_ratio=write_ratio,
        pinned_pages=pinned_pages,
    )
    return Scenario("basic", [phase])


def overcommit(duration: float, host_limit: str | None, pinned_pages: int = 32) -> Scenario:
    """Write everywhere, then hot/cold phases, with host memory below the working sets."""
    mix = ContentMix(zero=0.05, duplicate=0.15, unique=0.8)
    d = duration
    phases = [
        Phase(
            name="fill",
            duration=0.3 * d,
            working_set=1.0,
            distribution="sequential",
            write_ratio=1.0,
            content=mix,
        ),
        Phase(
            name="hot-low",
            duration=0.25 * d,
            working_set=0.3,
            distribution="zipf",
            write_ratio=0.3,
            content=mix,
            pinned_pages=pinned_pages,
        ),
        Phase(
            name="hot-high",
            duration=0.25 * d,
            working_set=0.3,
            offset=0.6,
            distribution="zipf",
            write_ratio=0.3,
            content=mix,
            pinned_pages=pinned_pages,
        ),
        Phase(
            name="scan",
            duration=0.2 * d,
            working_set=1.0,
            distribution="uniform",
            write_ratio=0.2,
            content=mix,
        ),
    ]
    return Scenario("overcommit", phases, host_limit=host_limit)


SCENARIOS = ("basic", "overcommit")
