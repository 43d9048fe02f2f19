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
from pathlib import Path
from typing import Any

from shared.loops import run
from shared.sizes import parse_size

from ..rpc import PeerError, RpcClient
from .report import build_report, render_table
from .scenarios import SCENARIOS, Scenario, basic, overcommit


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
    a("--host-limit", help="overcommit: memory the host may use during the run, e.g. 128MiB")
    a(
        "--inject-failures",
        type=int,
        default=0,
        metavar="N",
        help="retire N random in-use frames during the run (page-retire)",
    )
    a("--expect-vms", type=int, default=1, help="wait until this many VMs are registered")
    a("--json", type=Path, help="write the report as JSON to this file")
    a("--no-progress", action="store_true", help="no live progress line")
    return p


def make_scenario(args: argparse.Namespace) -> Scenario:
    if args.scenario == "overcommit":
        pinned = 32 if args.pinned_pages is None else args.pinned_pages
        return overcommit(args.duration, args.host_limit, pinned)
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


async def run_phases(
    scenario: Scenario,
    agents: dict[str, RpcClient],
    daemon: RpcClient,
    inject: int,
    progress: Progress,
) -> list[dict[str, Any]]:
    injected: list[dict[str, Any]] = []
    total = sum(p.duration for p in scenario.phases)
    inject_at = sorted(random.Random(7).uniform(0.1, 0.9) * total for _ in range(inject))
    t_start = time.monotonic()
    for phase in scenario.phases:
        await asyncio.gather(
            *(a.ctl("run_phase", phase=phase.model_dump()) for a in agents.values())
        )
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
    progress.done()
    return injected


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
        t0 = time.monotonic()
        injected = await run_phases(
            scenario, agents, daemon, args.inject_failures, Progress(not args.no_progress)
        )
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
            injected,
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
