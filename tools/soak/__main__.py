"""``python -m tools.soak --minutes N``: run the soak, print its timeline and summary.

Exit 0 when it passed, 1 with every failure named, 2 on bad flags, 130 when interrupted.
Whatever happens, every process it started is stopped and every file it made is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from .driver import Soak
from .plan import Settings
from .procs import Fleet

MiB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.soak",
        description="Soak VMMem: overcommit with swap, random frame retirement, an agent and "
        "the daemon SIGKILLed and restarted, all at once; the invariants checked every few "
        "seconds; at the end every page verified and the daemon's memory flat.",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the workload runs (default 5)")
    length.add_argument("--seconds", type=float, help="the same, in seconds")
    p.add_argument("--agents", type=int, default=3, help="guests (default 3)")
    p.add_argument(
        "--memory",
        type=int,
        default=16,
        metavar="MIB",
        help="memory of each guest in MiB (default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule and choices")
    p.add_argument("--check-every", type=float, default=3.0, help="seconds between checks")
    p.add_argument(
        "--rss-tolerance",
        type=float,
        default=8.0,
        metavar="MIB",
        help="how much a daemon's RSS may grow after warm-up (default 8 MiB)",
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy every process's log into DIR before the files are removed",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings; ValueError naming the flag that is out of range."""
    minutes = args.minutes if args.minutes is not None else 5.0
    seconds = args.seconds if args.seconds is not None else 60 * minutes
    if not 20 <= seconds <= 24 * 3600:
        raise ValueError(f"--minutes/--seconds: {seconds:g} s is outside 20 s .. 24 h")
    if not 1 <= args.agents <= 16:
        raise ValueError(f"--agents: {args.agents} is outside 1..16")
    if not 4 <= args.memory <= 1024:
        raise ValueError(f"--memory: {args.memory} MiB is outside 4..1024")
    if not 0.5 <= args.check_every <= 60:
        raise ValueError(f"--check-every: {args.check_every:g} s is outside 0.5..60")
    if args.rss_tolerance <= 0:
        raise ValueError(f"--rss-tolerance: {args.rss_tolerance:g} must be > 0")
    return Settings(
        seconds=seconds,
        agents=args.agents,
        guest_mib=args.memory,
        seed=args.seed,
        check_every=args.check_every,
        rss_tolerance_mib=args.rss_tolerance,
    )


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the finally blocks stop the processes and remove the files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    # Sockets in a short directory (the path limit is ~108 bytes); machine memory on tmpfs.
    tmp = Path(tempfile.mkdtemp(prefix="soak", dir="/tmp"))
    mem_dir = Path(tempfile.mkdtemp(prefix=f"vmmem-soak-{os.getpid()}-", dir="/dev/shm"))
    fleet = Fleet(
        tmp,
        mem_dir,
        [
            *("--host-memory", f"{settings.host_mib}MiB"),
            *("--swap-file", str(tmp / "swap"), "--swap-size", f"{settings.swap_mib}MiB"),
            # Page sharing and sampling run several times even in a short soak.
            *("--share-scan-period", "10", "--sample-period", "10"),
        ],
    )
    print(f"soak: {settings.seconds:g} s, seed {settings.seed}; files in {tmp} and {mem_dir}")
    soak = Soak(settings, fleet)
    soak.report.files = [str(tmp), str(mem_dir)]
    try:
        report = soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        fleet.stop_all(timeout=10)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mem_dir, ignore_errors=True)
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
