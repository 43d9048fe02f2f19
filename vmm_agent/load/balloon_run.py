"""The balloon scenario's run: passes of fill, warm-up, settle and reclaim, ballooning on
and off.

Each pass turns ballooning on or off in the daemon (``set_memsched``), then:

1. fill, on every VM, until each has written its anonymous memory and read its file; when
   it ends, each frees a part of its anonymous memory (once-used free memory);
2. warm-up, with the VMs in their roles (idle, busy: by name, in turn), a few sampling
   periods: the working-set estimates follow (the period grows with the guests' size);
3. settle: the same, its time and then until no VM is backed off (bounded; the fill's cold
   misses count as refaults, and a back-off holds for a while after them): each VM's
   throughput baseline, and reclaim starts from the same calm state in every pass;
4. reclaim: the host limit goes down, in steps over the first part of the phase (pressure
   that builds up, as when VMs are started; a limit dropped at once sends the host straight
   to LOW and swaps before a balloon could move), to its target: ``--host-limit``, or 70 %
   of the frames in use when reclaim starts. The daemon's status is sampled every quarter
   second meanwhile (who gave what, by which method, when; balloon sizes; back-off).

Afterwards the limit goes back up and the pass waits, bounded, for the balloons to be given
back, so the next pass starts from the same place. The daemon's settings are restored
whatever happens; the report is built from what was collected (``balloon_report.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.constants import PAGE_SIZE
from shared.sizes import parse_size
from shared.workload import Phase

from .balloon_report import balloon_report
from .driver import LoadRun
from .links import AgentLink
from .scenarios import (
    BALLOON_ANON,
    BALLOON_FILE,
    BALLOON_FREED,
    BALLOON_ROLES,
    BALLOON_SAMPLE_PERIOD,
    BalloonPass,
    balloon_pass,
)

#: The reclaim phase's host limit, when not given: this fraction of the frames in use when
#: it starts.
LIMIT_FRACTION = 0.7
#: The limit comes down over this share of the reclaim phase, a step every LIMIT_STEP s,
#: from a little above the frames in use (RAMP_HEADROOM: no reclaim yet) to its target.
RAMP_SHARE, LIMIT_STEP, RAMP_HEADROOM = 0.6, 0.25, 1.06
#: How often the reclaim phase samples the daemon's status; the fill and warm-up their
#: conditions.
SAMPLE_PERIOD, POLL_PERIOD = 0.25, 0.5
#: The fill is done once every VM holds this share of the memory it is to write and read,
#: and has made this many accesses per page of it: one sequential sweep over all of it and
#: a margin, so pages a previous pass left swapped out are brought back in (each pass starts
#: from the same place).
FILLED, FILL_SWEEP = 0.995, 1.1
#: The warm-up lasts this long, and at least this many sampling periods (for the estimates
#: to follow the phases); the settle phase goes on until no VM is backed off (a back-off
#: holds 5 s after the fill's cold misses, which count as refaults), WARM_WAIT more at most.
WARM_MIN, WARM_PERIODS, WARM_WAIT = 2.0, 3, 10.0
#: Guest pages the scenario's sampling period is set for (it scales with the largest VM).
PERIOD_PAGES = 4096
#: How long a pass waits for the balloons to be given back once the limit is up again.
DEFLATE_WAIT = 15.0


@dataclass
class PassRecord:
    """What one pass collected."""

    name: str
    roles: dict[str, str]
    limit_pages: int = 0
    start: dict[str, Any] | None = None  # daemon status when reclaim started
    end: dict[str, Any] | None = None  # ... and when it ended
    settle: dict[str, dict[str, Any]] = field(default_factory=dict)  # agents' results
    reclaim: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (seconds into reclaim, {vm: memsched status}) samples.
    timeline: list[tuple[float, dict[str, dict[str, Any]]]] = field(default_factory=list)
    #: Seconds the fill and the warm-up took.
    fill_seconds: float = 0.0
    warm_seconds: float = 0.0
    #: Balloons still held when the pass stopped waiting for them to be given back.
    balloons_left: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class BalloonRun:
    """Runs the passes of the balloon scenario on a prepared LoadRun."""

    def __init__(self, load: LoadRun, host_limit: str | None) -> None:
        self.load = load
        self.host_limit = host_limit
        self.passes: list[PassRecord] = []
        self.period = BALLOON_SAMPLE_PERIOD
        self._was_filled = False

    async def run(self) -> None:
        load, daemon = self.load, self.load.daemon
        status = await daemon.call("status")
        if status is None:
            load.out.extra["balloon"] = {"unavailable": "the daemon did not answer"}
            return
        ballooning = status["memsched"]["balloon"]
        limit = status["host"]["limit_pages"]
        names = sorted(a.name for a in load.active())
        roles = {name: BALLOON_ROLES[i % len(BALLOON_ROLES)] for i, name in enumerate(names)}
        seconds = sum(p.duration for p in load.scenario.phases) / len(load.scenario.passes)
        pages = max([vm["guest_pages"] for vm in status["vms"]], default=PERIOD_PAGES)
        self.period = BALLOON_SAMPLE_PERIOD * max(1.0, pages / PERIOD_PAGES)
        if self.period != BALLOON_SAMPLE_PERIOD:  # restored with the scenario's settings
            await daemon.call("set_lowprio", sample_period=self.period)
        load.schedule_injections()
        try:
            for name in load.scenario.passes:
                record = PassRecord(name, roles)
                self.passes.append(record)
                if not await self._pass(record, balloon_pass(name, seconds)):
                    break
        finally:
            await daemon.call("set_memsched", balloon=ballooning)
            await daemon.call("set_host_limit", size=limit * PAGE_SIZE)
        load.progress.done()
        try:
            load.out.extra["balloon"] = balloon_report(self.passes)
        except (KeyError, IndexError, TypeError) as exc:
            # A status or result without a field the report needs: say so, do not guess.
            why = f"incomplete data ({type(exc).__name__}: {exc})"
            load.out.extra["balloon"] = {"unavailable": why}

    async def _pass(self, record: PassRecord, bp: BalloonPass) -> bool:
        load, daemon = self.load, self.load.daemon
        if await daemon.call("set_memsched", balloon=record.name == "balloon") is None:
            record.notes.append("the daemon refused set_memsched")
            return False

        def role(phases: dict[str, Phase]) -> Any:
            return lambda agent: phases[record.roles.get(agent.name, "busy")]

        t0 = time.monotonic()
        self._was_filled = False
        if not await load.run_phase(bp.fill, until=self._filled, period=POLL_PERIOD):
            return False
        record.fill_seconds = round(time.monotonic() - t0, 3)
        # Not asked again: once it has ended, the fill has freed part of what it wrote.
        if not self._was_filled:
            record.notes.append(f"the fill was not done after {bp.fill.duration:g} s")
        t0 = time.monotonic()
        warm_min = max(WARM_MIN, WARM_PERIODS * self.period)
        warm = {r: p.model_copy(update={"duration": warm_min}) for r, p in bp.warm.items()}
        if not await load.run_phase(warm["busy"], role(warm)):
            return False
        record.warm_seconds = round(time.monotonic() - t0, 3)
        # The settle phase is the baseline; it goes on until no VM is backed off (bounded),
        # so that reclaim starts from a calm state.
        settle = {
            r: p.model_copy(update={"duration": p.duration + WARM_WAIT})
            for r, p in bp.settle.items()
        }
        nominal = bp.settle["busy"].duration
        if not await load.run_phase(settle["busy"], role(settle), until=self._calm_after(nominal)):
            return False
        record.settle = load.out.snapshots[-1]["results"]
        if not await self._calm():
            record.notes.append(
                f"VMs still backed off when reclaim started ({WARM_WAIT:g} s after the settle "
                "phase was due to end)"
            )
        return await self._reclaim(record, bp, role(bp.reclaim))

    async def _reclaim(self, record: PassRecord, bp: BalloonPass, phase_of: Any) -> bool:
        load, daemon = self.load, self.load.daemon
        start = await daemon.call("status")
        if start is None:
            record.notes.append("the daemon did not answer when reclaim was to start")
            return False
        record.start = start
        target = self._limit(start)
        ramp_from = max(target, int(start["host"]["used"] * RAMP_HEADROOM))
        ramp_seconds = RAMP_SHARE * bp.reclaim["busy"].duration
        record.limit_pages = target
        t0 = time.monotonic()
        next_step = 0.0

        async def sample() -> None:
            nonlocal next_step
            at = time.monotonic() - t0
            if at >= next_step and record.limit_pages != -1:
                next_step = at + LIMIT_STEP
                done = min(1.0, at / ramp_seconds) if ramp_seconds > 0 else 1.0
                limit = int(ramp_from - (ramp_from - target) * done)
                if await daemon.call("set_host_limit", size=limit * PAGE_SIZE) is None:
                    why = daemon.refused[-1]["error"] if daemon.refused else "no answer"
                    record.notes.append(f"the daemon refused a host limit of {limit}: {why}")
                    record.limit_pages = -1  # stop trying
            st = await daemon.call("status")
            if st is not None:
                vms = {vm["name"]: vm["memsched"] for vm in st["vms"]}
                record.timeline.append((round(at, 3), vms))

        await sample()  # the first step at once
        if not await load.run_phase(
            bp.reclaim["busy"], phase_of, every=sample, period=SAMPLE_PERIOD
        ):
            return False
        last = load.out.snapshots[-1]
        record.reclaim, record.end = last["results"], last["status"]
        await daemon.call("set_host_limit", size=start["host"]["limit_pages"] * PAGE_SIZE)
        record.balloons_left = await self._balloons_given_back()
        return True

    async def _results(self) -> dict[str, dict[str, Any]]:
        agents: list[AgentLink] = self.load.active()
        got = await asyncio.gather(*(a.call("results", "balloon") for a in agents))
        return {a.name: r for a, r in zip(agents, got, strict=True) if r is not None}

    async def _filled(self) -> bool:
        """Has every VM written its anonymous memory (with what the fill frees when it
        ends) and read its file into the cache?"""
        for res in (await self._results()).values():
            pages, guest = res["guest_os"]["pages"], res["guest_pages"]
            anon = int((BALLOON_ANON + BALLOON_FREED) * guest)
            file = int(BALLOON_FILE * guest)
            if pages["anon"] < FILLED * anon or pages["cache"] < FILLED * file:
                return False
            done = res["throughput"]["accesses"] if res["throughput"] else 0
            if done < FILL_SWEEP * (anon + file):
                return False
        self._was_filled = True
        return True

    def _calm_after(self, seconds: float) -> Callable[[], Awaitable[bool]]:
        """An end condition: ``seconds`` have passed and no VM is backed off, or WARM_WAIT
        more have passed."""
        t0 = time.monotonic()

        async def done() -> bool:
            waited = time.monotonic() - t0
            return waited >= seconds + WARM_WAIT or (waited >= seconds and await self._calm())

        return done

    async def _calm(self) -> bool:
        """Is no VM backed off (the fill's refaults aged out)?"""
        st = await self.load.daemon.call("status")
        return st is not None and not any(vm["memsched"]["backed_off"] for vm in st["vms"])

    def _limit(self, status: dict[str, Any]) -> int:
        host = status["host"]
        if self.host_limit is not None:
            return parse_size(self.host_limit) // PAGE_SIZE
        return max(int(host["min_limit_pages"]), int(host["used"] * LIMIT_FRACTION))

    async def _balloons_given_back(self) -> dict[str, int]:
        """Wait (bounded) until no balloon holds a page; what is still held, per VM."""
        deadline = time.monotonic() + DEFLATE_WAIT
        held: dict[str, int] = {}
        while time.monotonic() < deadline:
            st = await self.load.daemon.call("status")
            if st is not None:
                held = {
                    vm["name"]: vm["memsched"]["balloon_pages"]
                    for vm in st["vms"]
                    if vm["memsched"]["balloon_pages"]
                }
                if not held:
                    return {}
            await asyncio.sleep(0.2)
        return held
