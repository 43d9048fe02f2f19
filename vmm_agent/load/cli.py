"""``vmmem-load``: push workload phases to every running agent, then verify every page.

It finds the agents through the platform daemon (``--socket``), runs a scenario's phases on
all of them at once with live progress, optionally injects frame failures, then runs a full
verification pass, prints a report and (``--json``) writes it. Exit status 1 on any
mismatch or unverifiable page: that is data loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.loops import run
from shared.sizes import parse_size

from ..rpc import PeerError, RpcClient
from .lowprio_report import PhaseWindow, latency_report, sampling_report, sharing_report
from .report import build_report, render_table
from .scenarios import SCENARIOS, Scenario, basic, latency, overcommit, sampling, sharing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmmem-load",
        description="Drive a workload on every VM of a running VMMem host, then verify every "
        "page the guests wrote. Exits 1 on any mismatch.",
        epilog="Example: vmmem-load --socket /tmp/vmmem.sock --scenario overcommit "
        "--host-limit 128MiB --json report.json",
    )
    a = p.add_argument
    a(
        "--socket",
        default=os.environ.get("VMMEM_SOCKET", "/tmp/vmmem.sock"),
        help="the platform daemon's socket (default $VMMEM_SOCKET or /tmp/vmmem.sock)",
    )
    a("--scenario", choices=SCENARIOS, default="basic", help="what to run (default basic)")
    a("--duration", type=float, default=20.0, help="seconds of workload in total (default 20)")
    a("--working-set", type=float, default=0.5, help="basic: fraction of guest memory touched")
    a(
        "--distribution",
        choices=["uniform", "zipf", "sequential"],
        default="uniform",
        help="basic: access distribution (default uniform)",
    )
    a("--write-ratio", type=float, default=0.3, help="basic: fraction of accesses that write")
    a(
        "--pinned-pages",
        type=int,
        default=None,
        help="pages each guest keeps pinned in translation (overcommit default 32)",
    )
    a(
        "--host-limit",
        help="overcommit, sampling: memory the host may use during the run, e.g. 128MiB",
    )
    a(
        "--inject-failures",
        type=int,
        default=0,
        metavar="N",
        help="retire N random in-use frames during the run (page-retire)",
    )
    a(
        "--sample-pages",
        type=int,
        help="sharing, sampling: pages per working-set sample during the run (default: as set)",
    )
    a(
        "--sample-period",
        type=float,
        help="sampling: seconds of guest time per sampling period (default: a tenth of a phase)",
    )
    a("--expect-vms", type=int, default=1, help="wait until this many VMs are registered")
    a("--json", type=Path, help="write the report as JSON to this file")
    a("--no-progress", action="store_true", help="no live progress line")
    return p


def make_scenario(args: argparse.Namespace) -> Scenario:
    if args.scenario == "overcommit":
        pinned = 32 if args.pinned_pages is None else args.pinned_pages
        return overcommit(args.duration, args.host_limit, pinned)
    if args.scenario == "sharing":
        return sharing(args.duration, args.sample_pages)
    if args.scenario == "latency":
        return latency(args.duration)
    if args.scenario == "sampling":
        return sampling(args.duration, args.sample_pages, args.host_limit, args.sample_period)
    return basic(
        args.duration, args.working_set, args.distribution, args.write_ratio, args.pinned_pages or 0
    )


async def find_agents(
    daemon: RpcClient, expect: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        vms = (await daemon.ctl("list_vms"))["vms"]
        if len(vms) >= expect:
            return list(vms)
        if time.monotonic() > deadline:
            raise PeerError(f"only {len(vms)} VMs registered, expected {expect}")
        await asyncio.sleep(0.2)


class Progress:
    """One live line on a terminal; a line every few seconds otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, phase: str, left: float, progress: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 5:
            return
        self.last = now
        ops = sum(p["reads"] + p["writes"] for p in progress)
        faults = sum(p["faults"] for p in progress)
        mism = sum(p["mismatches"] for p in progress)
        line = (
            f"[{phase:<9}] {left:5.1f}s left  accesses {ops:>11,}  faults {faults:>9,}  "
            f"mismatches {mism}"
        )
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


@dataclass
class Run:
    """What running the phases produced: injected failures, phase windows, snapshots."""

    injected: list[dict[str, Any]] = field(default_factory=list)
    windows: list[PhaseWindow] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)


async def run_phases(
    scenario: Scenario,
    agents: dict[str, RpcClient],
    daemon: RpcClient,
    inject: int,
    progress: Progress,
) -> Run:
    run_ = Run()
    injected = run_.injected
    total = sum(p.duration for p in scenario.phases)
    inject_at = sorted(random.Random(7).uniform(0.1, 0.9) * total for _ in range(inject))
    t_start = time.monotonic()
    for phase in scenario.phases:
        await asyncio.gather(
            *(a.ctl("run_phase", phase=phase.model_dump()) for a in agents.values())
        )
        started = time.monotonic()
        end = time.monotonic() + phase.duration
        while (left := end - time.monotonic()) > 0:
            while inject_at and time.monotonic() - t_start >= inject_at[0]:
                inject_at.pop(0)
                injected.append(await daemon.ctl("retire", random_used=True))
            await asyncio.sleep(min(0.5, left))
            progress.show(
                phase.name,
                max(0.0, end - time.monotonic()),
                await asyncio.gather(*(a.ctl("progress") for a in agents.values())),
            )
        await asyncio.gather(*(a.ctl("halt") for a in agents.values()))
        run_.windows.append(PhaseWindow(phase.name, started, time.monotonic()))
        run_.snapshots.append(await snapshot(phase.name, agents, daemon))
    progress.done()
    return run_


async def snapshot(phase: str, agents: dict[str, RpcClient], daemon: RpcClient) -> dict[str, Any]:
    """The agents' results and the daemon's status at the end of a phase."""
    names = list(agents)
    results = await asyncio.gather(*(agents[n].ctl("results") for n in names))
    return {
        "phase": phase,
        "results": dict(zip(names, results, strict=True)),
        "status": await daemon.ctl("status"),
    }


async def configure(
    scenario: Scenario, agents: dict[str, RpcClient], daemon: RpcClient
) -> tuple[dict[str, Any], dict[str, int]]:
    """Apply the scenario's daemon and agent settings; return what to restore afterwards."""
    before: dict[str, Any] = {}
    sensitivities: dict[str, int] = {}
    if scenario.lowprio:
        st = (await daemon.ctl("status"))["lowprio"]
        before = {
            "sample_period": st["sample_period_seconds"],
            "sample_pages": st["sample_pages"],
            "share_scan_period": st["share_scan_period_seconds"],
        }
        await daemon.ctl("set_lowprio", **scenario.lowprio)
    if scenario.latency:
        for i, (name, agent) in enumerate(agents.items()):
            sensitivities[name] = (await agent.ctl("lowprio"))["latency_sensitivity"]
            value = scenario.latency[i % len(scenario.latency)]
            await agent.ctl("set_latency_sensitivity", value=value)
    return before, sensitivities


async def restore(
    before: dict[str, Any],
    sensitivities: dict[str, int],
    agents: dict[str, RpcClient],
    daemon: RpcClient,
) -> None:
    if before:
        await daemon.ctl("set_lowprio", **before)
    for name, value in sensitivities.items():
        await agents[name].ctl("set_latency_sensitivity", value=value)


async def lowprio_sections(
    scenario: Scenario, run_: Run, agents: dict[str, RpcClient], daemon: RpcClient
) -> dict[str, Any]:
    """The scenario's own report section, from the run and the agents' and daemon's data."""
    if scenario.name == "sharing":
        return {"sharing": sharing_report(run_.snapshots)}
    if scenario.name == "latency":
        names = list(agents)
        summaries = await asyncio.gather(*(agents[n].ctl("lowprio") for n in names))
        window = run_.windows[-1]
        return {"lowprio": latency_report(dict(zip(names, summaries, strict=True)), window)}
    if scenario.name == "sampling":
        history = await daemon.ctl("sampling")
        last = run_.snapshots[-1]["results"]
        truths = {name: res["sampling"]["truth"] for name, res in last.items()}
        return {"sampling": sampling_report(history, truths, run_.windows)}
    return {}


async def main_async(args: argparse.Namespace) -> int:
    scenario = make_scenario(args)
    daemon = await RpcClient.connect(args.socket)
    agents: dict[str, RpcClient] = {}
    try:
        vms = await find_agents(daemon, args.expect_vms)
        for vm in vms:
            agents[vm["name"]] = await RpcClient.connect(vm["control_socket"])
        if scenario.host_limit:
            await daemon.ctl("set_host_limit", size=scenario.host_limit)
        settings = await configure(scenario, agents, daemon)
        t0 = time.monotonic()
        run_ = await run_phases(
            scenario, agents, daemon, args.inject_failures, Progress(not args.no_progress)
        )
        extra = await lowprio_sections(scenario, run_, agents, daemon)
        await restore(*settings, agents, daemon)
        names = list(agents)
        verify = await asyncio.gather(*(agents[n].ctl("verify", timeout=600) for n in names))
        results = await asyncio.gather(*(agents[n].ctl("results") for n in names))
        status = await daemon.ctl("status")
        if scenario.host_limit:
            await daemon.ctl("set_host_limit", size=status["host"]["pages"] * 4096)
        report = build_report(
            scenario.name,
            time.monotonic() - t0,
            dict(zip(names, results, strict=True)),
            dict(zip(names, verify, strict=True)),
            status,
            run_.injected,
            extra,
        )
    finally:
        for client in [daemon, *agents.values()]:
            client.close()
    print(render_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host_limit:
        try:
            parse_size(args.host_limit)
        except ValueError as exc:
            print(f"vmmem-load: {exc}", file=sys.stderr)
            return 2
    try:
        return run(main_async(args))
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"vmmem-load: cannot reach the platform at {args.socket}: {exc}", file=sys.stderr)
        return 2
    except PeerError as exc:
        print(f"vmmem-load: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
