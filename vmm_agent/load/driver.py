"""Driving a run: find the agents, apply the scenario's settings, run its phases on every VM
at once, verify, and collect what the report needs.

Every request goes through the links (``links.py``), which never raise: a VM that leaves the
run is left out of what follows, and the daemon's absence leaves holes (``None``) that the
report names. Phase boundaries are bounded by the links' timeout, so a VM that stops
answering holds up the others once, for that bound, and is then out of the run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.constants import PAGE_SIZE
from shared.workload import Phase

from .links import AgentLink, Clock, DaemonLink, VmState
from .lowprio_report import (
    PhaseWindow,
    latency_report,
    rounds_in,
    sampling_report,
    sharing_report,
)
from .progress import Progress
from .samples import SAMPLE_PERIOD, make_sample
from .scenarios import Scenario

#: How long a progress poll waits for an agent (the display only; nobody is dropped for it).
PROGRESS_TIMEOUT = 1.0


class StartError(Exception):
    """The run cannot start (nothing has been changed that is not put back)."""


async def find_agents(
    daemon: DaemonLink, expect: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The registered VMs, once ``expect`` of them have a control socket to drive."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await daemon.call("list_vms")
        if reply is None:
            raise StartError(f"the platform daemon at {daemon.path} stopped answering")
        vms: list[dict[str, Any]] = reply["vms"]
        drivable = [vm for vm in vms if vm.get("control_socket")]
        if len(drivable) >= expect:
            return vms
        if time.monotonic() > deadline:
            other = len(vms) - len(drivable)
            note = f" ({other} more without a control socket)" if other else ""
            raise StartError(
                f"only {len(drivable)} VMs with a control socket registered{note}, "
                f"expected {expect} (--expect-vms)"
            )
        await asyncio.sleep(0.2)


async def connect_agents(
    vms: list[dict[str, Any]], timeout: float, clock: Clock
) -> dict[str, AgentLink]:
    links = {
        vm["name"]: AgentLink(
            vm["name"], vm.get("control_socket", ""), vm.get("pid", 0), timeout, clock
        )
        for vm in vms
    }
    await asyncio.gather(*(link.connect() for link in links.values()))
    return links


async def _agent_rounds(agent: AgentLink, window: PhaseWindow) -> dict[str, Any] | None:
    """The agent's summary with its rounds of ``window`` (None if the VM left)."""

    async def ask(after: float) -> dict[str, Any] | None:
        return await agent.call("lowprio", "report", after=after)

    return await rounds_in(ask, window.start, window.end)


@dataclass
class Outcome:
    """What a run produced, for the report."""

    injected: list[dict[str, Any]] = field(default_factory=list)
    windows: list[PhaseWindow] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    verify: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Figures over time, for the plots (samples.py).
    samples: list[dict[str, Any]] = field(default_factory=list)


class LoadRun:
    """One run of a scenario: setup → phases → verification → restore."""

    def __init__(
        self,
        scenario: Scenario,
        daemon: DaemonLink,
        agents: dict[str, AgentLink],
        inject: int,
        progress: Progress,
    ) -> None:
        self.scenario = scenario
        self.daemon = daemon
        self.agents = agents
        self.inject = inject
        self.progress = progress
        self.out = Outcome()
        self._limit_before: int | None = None
        self._lowprio_before: dict[str, Any] = {}
        self._sensitivities: dict[str, int] = {}
        self._inject_at: list[float] = []
        self._t_start = time.monotonic()
        self._next_sample = 0.0
        #: The daemon's status at the last sample, for the progress display.
        self._status: dict[str, Any] | None = None

    def active(self) -> list[AgentLink]:
        return [a for a in self.agents.values() if a.active]

    async def setup(self) -> None:
        """Apply the scenario's host limit and low-priority settings, remembering the old ones."""
        sc, daemon = self.scenario, self.daemon
        status = await daemon.call("status")
        if status is None:
            raise StartError(f"the platform daemon at {daemon.path} stopped answering")
        self._limit_before = status["host"]["limit_pages"]
        if sc.host_limit and await daemon.call("set_host_limit", size=sc.host_limit) is None:
            why = daemon.refused[-1]["error"] if daemon.refused else "no answer"
            raise StartError(f"the daemon refused --host-limit {sc.host_limit}: {why}")
        if sc.lowprio:
            st = status["lowprio"]
            self._lowprio_before = {
                "sample_period": st["sample_period_seconds"],
                "sample_pages": st["sample_pages"],
                "share_scan_period": st["share_scan_period_seconds"],
            }
            settings: dict[str, Any] = dict(sc.lowprio)
            await daemon.call("set_lowprio", **settings)
        if sc.latency:
            for i, agent in enumerate(self.active()):
                summary = await agent.call("lowprio", "setup")
                if summary is None:
                    continue
                self._sensitivities[agent.name] = summary["latency_sensitivity"]
                value = sc.latency[i % len(sc.latency)]
                await agent.call("set_latency_sensitivity", "setup", value=value)

    def schedule_injections(self) -> None:
        """Draw when the frame failures are injected (the phases' clock starts now)."""
        total = sum(p.duration for p in self.scenario.phases)
        self._inject_at = sorted(
            random.Random(7).uniform(0.1, 0.9) * total for _ in range(self.inject)
        )
        self._t_start = time.monotonic()

    async def run_phases(self) -> None:
        self.schedule_injections()
        for phase in self.scenario.phases:
            if not await self.run_phase(phase):
                break
        self.progress.done()

    async def run_phase(
        self,
        phase: Phase,
        phase_of: Callable[[AgentLink], Phase] | None = None,
        every: Callable[[], Awaitable[None]] | None = None,
        period: float = 0.5,
        until: Callable[[], Awaitable[bool]] | None = None,
    ) -> bool:
        """Run ``phase`` on every active VM (``phase_of`` may give a VM its own variant, of
        the same name and duration) until its duration is over, or ``until`` (awaited every
        ``period`` seconds, like ``every``) says it is done; then halt it and snapshot.
        False if no VM is left."""
        agents = self.active()
        if not agents:
            return False
        started = time.monotonic()
        await asyncio.gather(
            *(
                a.call(
                    "run_phase", phase.name, phase=(phase_of(a) if phase_of else phase).model_dump()
                )
                for a in agents
            )
        )
        end = started + phase.duration
        next_progress = 0.0
        while (left := end - time.monotonic()) > 0:
            while self._inject_at and time.monotonic() - self._t_start >= self._inject_at[0]:
                self._inject_at.pop(0)
                await self._inject_failure()
            await asyncio.sleep(min(period, left))
            if every is not None:
                await every()
            if until is not None and await until():
                break
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 0.5
                await self._show_progress(phase.name, end)
        await asyncio.gather(*(a.call("halt", phase.name) for a in self.active()))
        self.out.windows.append(PhaseWindow(phase.name, started, time.monotonic()))
        snap = await self.snapshot(phase.name)
        self.out.snapshots.append(snap)
        now = self.daemon.clock.now()
        self.out.samples.append(make_sample(now, phase.name, snap["results"], snap["status"]))
        self.out.phases.append(
            {
                "name": phase.name,
                "seconds": round(time.monotonic() - started, 3),
                "vms": [a.name for a in agents],
                "left_the_run": [a.name for a in agents if not a.active],
            }
        )
        return True

    async def _inject_failure(self) -> None:
        # Not sent again after a lost connection: it may have retired a frame already.
        result = await self.daemon.call("retire", idempotent=False, random_used=True)
        if result is None:
            error = self.daemon.refused[-1]["error"] if self.daemon.refused else "unreachable"
            result = {"error": error}
        self.out.injected.append(result)

    async def _show_progress(self, phase: str, end: float) -> None:
        agents = self.active()
        answers = await asyncio.gather(
            *(a.call("progress", phase, timeout=PROGRESS_TIMEOUT, drop_slow=False) for a in agents)
        )
        shown = [p for p in answers if p is not None]
        if time.monotonic() >= self._next_sample:
            self._next_sample = time.monotonic() + SAMPLE_PERIOD
            await self._sample(phase)
        self.progress.show(phase, max(0.0, end - time.monotonic()), shown, self._status)

    async def _sample(self, phase: str) -> None:
        """A sample of the figures plotted over time (samples.py). Only nice to have: a slow
        agent is not dropped for it, and the daemon is asked once, never waited for (a gap
        is for the phase boundaries to report)."""
        agents = self.active()
        results = await asyncio.gather(
            *(a.call("results", phase, timeout=PROGRESS_TIMEOUT, drop_slow=False) for a in agents)
        )
        self._status = await self.daemon.peek("status")
        got = {a.name: r for a, r in zip(agents, results, strict=True) if r is not None}
        self.out.samples.append(make_sample(self.daemon.clock.now(), phase, got, self._status))

    async def snapshot(self, phase: str) -> dict[str, Any]:
        """The agents' results and the daemon's status (None if unreachable) after a phase."""
        agents = self.active()
        results = await asyncio.gather(*(a.call("results", phase) for a in agents))
        return {
            "phase": phase,
            "results": {a.name: r for a, r in zip(agents, results, strict=True) if r is not None},
            "status": await self.daemon.call("status"),
        }

    async def lowprio_sections(self) -> None:
        """The scenario's own report section, or why it is missing."""
        name, out = self.scenario.name, self.out
        if name not in ("sharing", "latency", "sampling"):
            return
        section = "lowprio" if name == "latency" else name
        try:
            out.extra[section] = await self._lowprio_section(name)
        except (KeyError, IndexError, TypeError) as exc:
            # A snapshot the daemon could not give, a VM that left: say so, do not guess.
            out.extra[section] = {"unavailable": f"incomplete data ({type(exc).__name__}: {exc})"}

    async def _lowprio_section(self, name: str) -> dict[str, Any]:
        out = self.out
        if name == "sharing":
            if any(s["status"] is None for s in out.snapshots):
                return {"unavailable": "the daemon did not answer after every phase"}
            return sharing_report(out.snapshots)
        if name == "latency":
            agents, window = self.active(), out.windows[-1]
            summaries = await asyncio.gather(*(_agent_rounds(a, window) for a in agents))
            got = {a.name: s for a, s in zip(agents, summaries, strict=True) if s is not None}
            return latency_report(got, window)
        history = await self.daemon.call("sampling")
        if history is None:
            return {"unavailable": "the daemon did not give its sampling history"}
        last = out.snapshots[-1]["results"]
        truths = {vm: res["sampling"]["truth"] for vm, res in last.items()}
        windows = {vm: res["sampling"]["truth_windows"] for vm, res in last.items()}
        return sampling_report(history, truths, out.windows, windows)

    async def restore_lowprio(self) -> None:
        if self._lowprio_before:
            await self.daemon.call("set_lowprio", **self._lowprio_before)
        for name, value in self._sensitivities.items():
            await self.agents[name].call("set_latency_sensitivity", "restore", value=value)

    async def verify(self) -> None:
        """Every active VM reads back every page it wrote; then its results."""
        # Pages not exposed are faulted in through the daemon: without it there is nothing
        # to wait for but the agents giving up, so the VMs are reported unverified instead.
        if await self.daemon.call("status") is None:
            for agent in self.active():
                agent.drop(VmState.UNVERIFIED, "the platform daemon is unreachable at verification")
            return
        agents = self.active()
        verify = await asyncio.gather(*(a.call_long("verify", "verify") for a in agents))
        results = await asyncio.gather(*(a.call("results", "verify") for a in agents))
        for agent, ver, res in zip(agents, verify, results, strict=True):
            if ver is not None and res is not None and agent.active:
                self.out.verify[agent.name] = ver
                self.out.results[agent.name] = res

    async def finish(self) -> None:
        """The daemon's final status, then put the host limit back."""
        self.out.status = await self.daemon.call("status")
        if self.scenario.host_limit and self._limit_before is not None:
            await self.daemon.call("set_host_limit", size=self._limit_before * PAGE_SIZE)

    def left_the_run(self) -> dict[str, dict[str, Any]]:
        """Every VM that was not verified, with why, when, and what it showed last."""
        return {
            a.name: {
                "state": a.state.value,
                "reason": a.reason,
                "phase": a.phase,
                "at_seconds": a.at_seconds,
                "pid": a.pid,
                "mismatches_seen": int(a.last.get("mismatches", 0)),
                "pages_written_seen": int(a.last.get("pages_written", 0)),
            }
            for a in self.agents.values()
            if not a.active
        }
