"""Named scenarios: sequences of workload phases, sized by the total duration."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.workload import ContentMix, Phase


@dataclass(frozen=True)
class Scenario:
    """Phases run on every VM at once, plus host settings the scenario needs.

    ``lowprio`` are daemon settings for the run (``set_lowprio``: sampling period and size,
    sharing scan period), restored afterwards; ``latency`` gives each VM a latency
    sensitivity, in turn (the first VM gets the first value, and so on, cycling).
    """

    name: str
    phases: list[Phase]
    host_limit: str | None = None
    lowprio: dict[str, float] = field(default_factory=dict)
    latency: tuple[int, ...] = ()


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


#: Content of the sharing scenario's guests: mostly zero pages and pages of the corpus.
SHAREABLE_MIX = ContentMix(zero=0.3, duplicate=0.5, unique=0.2)


def sharing(duration: float, sample_pages: int | None = None) -> Scenario:
    """Write mostly zero and duplicate content, let the scanner merge it while the guests
    only read, then write into the shared pages (copy-on-write breaks)."""
    d = duration
    phases = [
        Phase(
            name="fill",
            duration=0.2 * d,
            working_set=1.0,
            distribution="sequential",
            write_ratio=1.0,
            content=SHAREABLE_MIX,
        ),
        Phase(
            name="merge",
            duration=0.5 * d,
            working_set=0.5,
            distribution="uniform",
            write_ratio=0.0,
            think_us=20.0,
        ),
        Phase(
            name="cow",
            duration=0.3 * d,
            working_set=0.5,
            distribution="uniform",
            write_ratio=0.5,
            content=ContentMix(zero=0.0, duplicate=0.0, unique=1.0),
            think_us=20.0,
        ),
    ]
    # Scan each guest about three times during the merge phase.
    settings = {"share_scan_period": max(0.5, round(0.5 * d / 3, 2))}
    if sample_pages:
        settings["sample_pages"] = sample_pages
    return Scenario("sharing", phases, lowprio=settings)


def latency(duration: float) -> Scenario:
    """VMs of different latency sensitivities, with plenty of low-priority work queued:
    each one's round time against its own bound."""
    d = duration
    phases = [
        Phase(
            name="fill",
            duration=0.25 * d,
            working_set=1.0,
            distribution="sequential",
            write_ratio=1.0,
            content=SHAREABLE_MIX,
        ),
        Phase(
            name="run",
            duration=0.75 * d,
            working_set=0.6,
            distribution="zipf",
            write_ratio=0.2,
            content=SHAREABLE_MIX,
            think_us=10.0,
        ),
    ]
    # A fast scan keeps page sharing busy enough to fill every bound.
    return Scenario("latency", phases, lowprio={"share_scan_period": 0.5}, latency=(0, 1, 2, 3, 4))


#: The sampling scenario's first phase writes all of guest memory, in this share of the run;
#: its periods are not scored (the working set grows through it).
SAMPLING_FILL, FILL_FRACTION = "fill", 0.1


def sampling(
    duration: float,
    sample_pages: int | None = None,
    host_limit: str | None = None,
    sample_period: float | None = None,
) -> Scenario:
    """Phases whose working sets differ, each several sampling periods long: the sampled
    estimate against the true working set of every period. With ``host_limit`` below the
    guests' working sets, pages are swapped out and in during the run: the estimate must not
    be biased by them."""
    # After the fill (all of memory) every fall is at most 40 % of memory, which the
    # estimate (a slowly falling average: 0.6 of the gap left per period) follows to within
    # 10 % in four periods; the rise to 90 % it follows at once.
    sizes = (0.7, 0.35, 0.9, 0.5)
    # The fill writes every page once, sequentially (fault-around makes it quick): first
    # touches stall the guest, and periods run on guest time, so without it the phases
    # that grow the working set would get few periods, and fewer the busier the host.
    fill = Phase(
        name=SAMPLING_FILL,
        duration=FILL_FRACTION * duration,
        working_set=1.0,
        distribution="sequential",
        write_ratio=1.0,
    )
    d = duration - fill.duration
    phases = [fill] + [
        Phase(
            name=f"ws{int(ws * 100)}",
            duration=d / len(sizes),
            working_set=ws,
            distribution="uniform",
            write_ratio=0.1,
        )
        for ws in sizes
    ]
    # Ten periods of wall time per phase: periods run on guest time, which a guest that
    # stalls on faults gets less of, and the first three of a phase are for converging.
    period = sample_period or max(0.001, round(d / len(sizes) / 10, 3))  # never rounded to 0
    settings: dict[str, float] = {"sample_period": period}
    if sample_pages:
        settings["sample_pages"] = sample_pages
    return Scenario("sampling", phases, host_limit=host_limit, lowprio=settings)


SCENARIOS = ("basic", "overcommit", "sharing", "latency", "sampling")
