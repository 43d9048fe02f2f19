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
    #: The balloon scenario's passes (``balloon``: ballooning on; ``swap``: swap only).
    passes: tuple[str, ...] = ()
    #: The name the report shows, when not ``name`` (a scenario file's own name; ``name``
    #: is then the built-in scenario whose runner and report sections it uses).
    title: str | None = None


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


#: The balloon scenario's VMs take these roles in turn, by name: a, c idle; b, d busy.
BALLOON_ROLES = ("idle", "busy")
#: Its passes: ballooning on (swap only for what the balloon cannot take), then swap only.
BALLOON_PASSES = ("balloon", "swap")
#: Fractions of guest memory the fill phase creates: anonymous memory, and the file read
#: through the page cache; the idle VMs' working set.
BALLOON_ANON, BALLOON_FILE, IDLE_ANON = 0.3, 0.6, 0.05
#: The rest is free memory the guest once used: the fill writes it as anonymous memory too,
#: and frees it when it ends (a process exiting: ``Phase.anon_freed``), so every VM starts
#: with free memory whose frames are still backed, as a guest that has run a while has.
BALLOON_FREED = 0.1
#: Seconds of the phases whose length ``balloon_run.py`` decides: the fill's bound (it ends
#: once every VM has written its memory and read its file), the warm-up's placeholder.
FILL_BOUND, WARM_BOUND = 120.0, 2.0
#: Working-set sampling period, seconds of guest time per 4,096 guest pages (16 MiB): a
#: busy guest must touch most of its memory within a period to look busy, and it touches
#: about as many pages a second whatever its size (``balloon_run.py`` scales it).
BALLOON_SAMPLE_PERIOD = 0.5
#: Shares of a pass's duration: the settle phase (the baseline), then reclaim.
SETTLE_SHARE, RECLAIM_SHARE = 0.3, 0.7
#: A refault's simulated disk read, ms: a fast SSD, about what a swap-in costs on this
#: platform (its swap file is read from the host's page cache; a fault round trip is
#: 0.1-0.2 ms, docs/performance.md), so that both kinds of miss cost about the same and
#: the comparison is about which pages each method takes, not about two different disks.
BALLOON_DISK_MS = 0.2
#: Every page the balloon scenario writes is unique: page sharing finds nothing to merge,
#: so its copy-on-write faults (and the frames it would save) do not mix with reclaim.
BALLOON_CONTENT = ContentMix(zero=0.0, duplicate=0.0, unique=1.0)


@dataclass(frozen=True)
class BalloonPass:
    """One pass of the balloon scenario: the phases of each role (fill is everyone's)."""

    name: str
    fill: Phase
    warm: dict[str, Phase]
    settle: dict[str, Phase]
    reclaim: dict[str, Phase]


def balloon_pass(name: str, seconds: float) -> BalloonPass:
    """The phases of one pass ``seconds`` long (settle and reclaim; fill and warm-up run
    until their condition holds, within their bounds).

    - fill: every VM writes its anonymous memory (30 %, and 10 % more it frees when the
      fill ends: once-used free memory) and reads its file (60 %) through the page cache,
      once each (no disk delay: only the cold misses of a first read);
    - warm, settle, reclaim: the idle VMs touch little (5 % anonymous, a few file reads,
      think time); the busy ones keep their anonymous memory hot and read their file with
      a skew (zipf: a hot head, a cold tail); a refault costs a disk read of
      ``BALLOON_DISK_MS``. Warm lets the working-set estimates follow; settle is each VM's
      throughput baseline (and lets the fill's refaults age out of the back-off); reclaim
      runs under the lowered host limit.
    """
    fill = Phase(
        name=f"{name}.fill",
        duration=FILL_BOUND,
        working_set=BALLOON_ANON + BALLOON_FREED,
        anon_freed=BALLOON_FREED / (BALLOON_ANON + BALLOON_FREED),
        distribution="sequential",
        write_ratio=1.0,
        cache=BALLOON_FILE,
        # Both done at about the same time: reads and writes in proportion to their sizes.
        cache_ratio=BALLOON_FILE / (BALLOON_FILE + BALLOON_ANON + BALLOON_FREED),
        refault_ms=0.0,
        content=BALLOON_CONTENT,
    )
    shapes: dict[str, dict[str, object]] = {
        "idle": {
            "working_set": IDLE_ANON,
            "distribution": "uniform",
            "write_ratio": 0.2,
            "cache": BALLOON_FILE,
            "cache_ratio": 0.002,
            "refault_ms": BALLOON_DISK_MS,
            "content": BALLOON_CONTENT,
            "think_us": 500.0,
        },
        "busy": {
            "working_set": BALLOON_ANON,
            "distribution": "zipf",
            "write_ratio": 0.3,
            "cache": BALLOON_FILE,
            "cache_ratio": 0.5,
            "refault_ms": BALLOON_DISK_MS,
            "content": BALLOON_CONTENT,
            "think_us": 50.0,
        },
    }

    def phases(phase: str, duration: float) -> dict[str, Phase]:
        return {
            role: Phase.model_validate({**shape, "name": f"{name}.{phase}", "duration": duration})
            for role, shape in shapes.items()
        }

    return BalloonPass(
        name,
        fill,
        phases("warm", WARM_BOUND),
        phases("settle", SETTLE_SHARE * seconds),
        phases("reclaim", RECLAIM_SHARE * seconds),
    )


def balloon(duration: float, no_balloon: bool = False, sample_pages: int | None = None) -> Scenario:
    """Two idle and two busy VMs, equal shares, reclaimed under a lowered host limit: once
    with ballooning on and once with swap only (``no_balloon``: the swap pass alone), the
    settle and reclaim phases of each pass ``duration`` / passes long. Short sampling
    periods (``BALLOON_SAMPLE_PERIOD``), so the working-set estimates (and with them the
    idle memory tax) follow the phases."""
    passes = ("swap",) if no_balloon else BALLOON_PASSES
    seconds = duration / len(passes)
    phases = []
    for name in passes:
        bp = balloon_pass(name, seconds)
        phases += [bp.settle["busy"], bp.reclaim["busy"]]
    settings = {"sample_period": BALLOON_SAMPLE_PERIOD, "sample_pages": sample_pages or 400}
    return Scenario("balloon", phases, lowprio=settings, passes=passes)


def numa(duration: float) -> Scenario:
    """NUMA migration: the VMs write all their memory while a filler VM (started and stopped
    by ``numa_run.py``) holds their home node, so it lands on another node; the filler
    leaves and the VMs run on, reading and writing everywhere, while migration brings their
    pages home."""
    fill = Phase(
        name="numa.fill",
        duration=0.3 * duration,
        working_set=1.0,
        distribution="sequential",
        write_ratio=1.0,
    )
    run = Phase(
        name="numa.migrate",
        duration=0.7 * duration,
        working_set=1.0,
        distribution="zipf",
        write_ratio=0.3,
        think_us=20.0,
    )
    return Scenario("numa", [fill, run])


def hugepages(duration: float) -> Scenario:
    """2 MB pages (run by ``hugepages_run.py``): the VMs write all their memory, run on,
    then reclaim under a lowered host limit splits large regions."""
    fill = Phase(
        name="hugepages.fill",
        duration=0.3 * duration,
        working_set=1.0,
        distribution="sequential",
        write_ratio=1.0,
    )
    steady = Phase(
        name="hugepages.steady",
        duration=0.4 * duration,
        working_set=1.0,
        distribution="zipf",
        write_ratio=0.3,
        think_us=20.0,
    )
    pressure = steady.model_copy(update={"name": "hugepages.pressure", "duration": 0.3 * duration})
    return Scenario("hugepages", [fill, steady, pressure])


SCENARIOS = (
    "basic",
    "overcommit",
    "sharing",
    "latency",
    "sampling",
    "balloon",
    "numa",
    "hugepages",
)
