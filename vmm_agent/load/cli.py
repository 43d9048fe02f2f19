"""``vmmem-load``: push workload phases to every running agent, then verify every page.

It finds the agents through the platform daemon (``--socket``), runs a scenario's phases on
all of them at once with live progress, optionally injects frame failures, then runs a full
verification pass, prints a report and (``--json``) writes it.

It reports, it never crashes: a VM that goes away or stops answering is named in the report
and the others are still verified; the daemon may go away and come back during the run.
Exit status: 0 every page verified; 1 data loss or a violation; 2 bad flags or the run could
not start; 3 incomplete (a VM left the run, the daemon is unreachable) or unreachable (the
host is out of memory and swap), with no mismatch found.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from shared.loops import run
from shared.sizes import parse_size

from . import compare, scenario_file
from .balloon_run import BalloonRun
from .driver import LoadRun, StartError, connect_agents, find_agents
from .hugepages_run import HugepagesRun
from .links import AgentLink, Clock, DaemonLink
from .numa_run import NumaRun
from .plot import write_plot
from .progress import Progress
from .report import build_report, exit_status, render_table
from .scenarios import (
    SCENARIOS,
    Scenario,
    balloon,
    basic,
    hugepages,
    latency,
    numa,
    overcommit,
    sampling,
    sharing,
)

PROG = "vmmem-load"
#: Seconds of workload of a built-in scenario when ``--duration`` is not given.
DEFAULT_DURATION = 20.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _number(
    cast: Callable[[str], float], low: float | None, high: float | None = None, strict: bool = False
) -> Callable[[str], float]:
    """An argparse type: a number of ``cast``'s kind within [low, high] (low excluded if
    ``strict``); argparse names the flag in its message."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if strict else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    want = " and ".join(bounds)

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        too_low = low is not None and (value <= low if strict else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def _size(text: str) -> str:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Drive a workload on every VM of a running VMMem host, then verify every "
        "page the guests wrote. Exit status: 0 all verified; 1 data loss or a violation; "
        "2 bad flags or cannot start; 3 incomplete or unreachable (no mismatch found).",
        epilog="Example: vmmem-load --socket /tmp/vmmem.sock --scenario overcommit "
        "--host-limit 128MiB --json report.json. Compare two reports: vmmem-load compare "
        "A.json B.json",
    )
    a = p.add_argument
    fraction = _number(float, 0.0, 1.0)
    a(
        "--socket",
        default=os.environ.get("VMMEM_SOCKET", "/tmp/vmmem.sock"),
        help="the platform daemon's socket (default $VMMEM_SOCKET or /tmp/vmmem.sock)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--scenario", choices=SCENARIOS, help="a built-in scenario to run (default basic)"
    )
    which.add_argument(
        "--scenario-file",
        type=Path,
        metavar="FILE",
        help="a scenario as TOML (docs/scenarios.md; scenarios/ has the built-in ones); "
        "--duration scales its phases, --host-limit overrides its limit, the other "
        "scenario flags do not apply",
    )
    a(
        "--duration",
        type=_number(float, 0.0, 86400.0, strict=True),
        help=f"seconds of workload in total (default {DEFAULT_DURATION:g}; a scenario "
        "file: its phases' total)",
    )
    a(
        "--working-set",
        type=_number(float, 0.0, 1.0, strict=True),
        default=0.5,
        help="basic: fraction of guest memory touched",
    )
    a(
        "--distribution",
        choices=["uniform", "zipf", "sequential"],
        default="uniform",
        help="basic: access distribution (default uniform)",
    )
    a("--write-ratio", type=fraction, default=0.3, help="basic: fraction of accesses that write")
    a(
        "--pinned-pages",
        type=_number(int, 0),
        default=None,
        help="pages each guest keeps pinned in translation (overcommit default 32)",
    )
    a(
        "--host-limit",
        type=_size,
        help="overcommit, sampling: memory the host may use during the run, e.g. 128MiB; "
        "balloon: during each reclaim phase (default 70 %% of the frames in use then)",
    )
    a(
        "--no-balloon",
        action="store_true",
        help="balloon: run the swap-only pass alone (default: a pass with ballooning, then "
        "one with swap only, side by side in the report)",
    )
    a(
        "--inject-failures",
        type=_number(int, 0),
        default=0,
        metavar="N",
        help="retire N random in-use frames during the run (page-retire)",
    )
    a(
        "--sample-pages",
        type=_number(int, 1, 1 << 20),
        help="sharing, sampling, balloon: pages per working-set sample during the run "
        "(default: as set; balloon 400)",
    )
    a(
        "--sample-period",
        type=_number(float, 0.0, 86400.0, strict=True),
        help="sampling: seconds of guest time per sampling period (default: a tenth of a phase)",
    )
    a(
        "--expect-vms",
        type=_number(int, 1),
        default=1,
        help="wait until this many VMs with a control socket are registered (default 1)",
    )
    a(
        "--vm-timeout",
        type=_number(float, 0.0, strict=True),
        default=30.0,
        metavar="SECONDS",
        help="a VM that takes longer to answer a request (at a phase boundary; a liveness "
        "check during verification) is reported as not answering and leaves the run; also "
        "the bound on each request to the daemon (default 30)",
    )
    a(
        "--daemon-wait",
        type=_number(float, 0.0),
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the platform daemon to come back when it cannot be "
        "reached during the run (a crash, a restart); the gap is reported (default 30)",
    )
    a("--json", type=Path, help="write the report as JSON to this file")
    a(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw the run over time into this PNG: each VM's resident, swapped and shared "
        "pages, the host's free frames, each VM's fault latency p50/p99",
    )
    a("--no-progress", action="store_true", help="no live progress line")
    return p


def make_scenario(args: argparse.Namespace) -> Scenario:
    """The built-in scenario the flags ask for."""
    if args.duration is None:
        args.duration = DEFAULT_DURATION
    if args.scenario == "overcommit":
        pinned = 32 if args.pinned_pages is None else args.pinned_pages
        return overcommit(args.duration, args.host_limit, pinned)
    if args.scenario == "sharing":
        return sharing(args.duration, args.sample_pages)
    if args.scenario == "latency":
        return latency(args.duration)
    if args.scenario == "sampling":
        return sampling(args.duration, args.sample_pages, args.host_limit, args.sample_period)
    if args.scenario == "balloon":
        return balloon(args.duration, args.no_balloon, args.sample_pages)
    if args.scenario == "numa":
        return numa(args.duration)
    if args.scenario == "hugepages":
        return hugepages(args.duration)
    return basic(
        args.duration, args.working_set, args.distribution, args.write_ratio, args.pinned_pages or 0
    )


async def main_async(args: argparse.Namespace, scenario: Scenario) -> int:
    clock = Clock()
    daemon = DaemonLink(args.socket, args.daemon_wait, args.vm_timeout, clock)
    try:
        await daemon.connect()
    except OSError as exc:
        raise StartError(f"cannot reach the platform at {args.socket}: {exc}") from None
    agents: dict[str, AgentLink] = {}
    try:
        agents = await connect_agents(
            await find_agents(daemon, args.expect_vms), args.vm_timeout, clock
        )
        load = LoadRun(
            scenario, daemon, agents, args.inject_failures, Progress(not args.no_progress)
        )
        await load.setup()
        clock.restart()
        if scenario.name == "balloon":
            await BalloonRun(load, args.host_limit).run()
        elif scenario.name == "numa":
            await NumaRun(load).run()
        elif scenario.name == "hugepages":
            await HugepagesRun(load).run()
        else:
            await load.run_phases()
        await load.lowprio_sections()
        await load.restore_lowprio()
        await load.verify()
        seconds = clock.now()
        await load.finish()
    finally:
        daemon.close()
        for agent in agents.values():
            agent.close()
    out = load.out
    report = build_report(
        scenario.title or scenario.name,
        seconds,
        out.results,
        out.verify,
        out.status,
        out.injected,
        {**out.extra, "samples": out.samples},
        load.left_the_run(),
        daemon.summary(),
        out.phases,
    )
    print(render_table(report), flush=True)
    code = exit_status(report)
    if args.json:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"{PROG}: cannot write the report to {args.json}: {exc}", file=sys.stderr)
            return code or 2
    if args.plot:
        try:
            write_plot(report, args.plot)
        except OSError as exc:
            print(f"{PROG}: cannot write the plot to {args.plot}: {exc}", file=sys.stderr)
            return code or 2
    return code


def _scenario_or_none(args: argparse.Namespace) -> Scenario | None:
    """The scenario, or None after one line saying which setting is invalid."""
    if args.scenario_file is not None:
        try:
            sf = scenario_file.load(args.scenario_file)
            return sf.scenario(args.duration, args.host_limit)
        except scenario_file.ScenarioFileError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return None
    args.scenario = args.scenario or "basic"
    try:
        return make_scenario(args)
    except ValidationError as exc:  # the flags are checked first: this is a safety net
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        print(f"{PROG}: invalid scenario setting {where}: {err['msg']}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_balloon and args.scenario != "balloon":  # not for a file: its passes say
        parser.error("--no-balloon is for --scenario balloon")
    scenario = _scenario_or_none(args)
    if scenario is None:
        return 2
    if args.json is not None and not args.json.parent.is_dir():
        print(f"{PROG}: --json: no directory {args.json.parent}", file=sys.stderr)
        return 2
    if args.plot is not None and (
        args.plot.suffix.lower() != ".png" or not args.plot.parent.is_dir()
    ):
        why = "must end in .png" if args.plot.suffix.lower() != ".png" else "no directory"
        print(f"{PROG}: --plot: {why}: {args.plot}", file=sys.stderr)
        return 2
    try:
        return run(main_async(args, scenario))
    except StartError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
