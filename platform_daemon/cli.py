"""``vmmem-platform``: run the platform daemon (one per host)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import structlog

from shared.config import PlatformConfig, settings_from_cli
from shared.errors import VMMemError
from shared.logs import configure_logging
from shared.loops import run

from .gil_tuning import shorten_switch_interval
from .malloc_tuning import fix_mmap_threshold


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmmem-platform",
        description=(
            "The VMMem platform daemon: owns machine memory (a shared file of 4 KiB frames "
            "split into NUMA nodes), the p2m of every VM, the swap file and the memory "
            "services. VMM agents (vmmem-vmm) connect to its Unix socket. Every flag can also "
            "be set as VMMEM_<NAME> in the environment or in a TOML file (--config)."
        ),
        epilog="Sizes accept 4096, 64MiB, 1GiB. Example: vmmem-platform --socket /tmp/vmmem.sock "
        "--host-memory 256MiB --swap-file /var/tmp/vmmem.swap --swap-size 1GiB",
    )
    a = p.add_argument
    a("--config", type=Path, help="TOML file with a [platform] table of these settings")
    a("--socket", help="Unix socket path agents connect to (default /tmp/vmmem.sock)")
    a("--host-memory", help="machine memory to manage, e.g. 256MiB (default 256MiB)")
    a("--numa-nodes", type=int, help="NUMA nodes to split machine memory into (default 2)")
    a(
        "--metrics-port",
        type=int,
        help="Prometheus port on 127.0.0.1 (default 9470; 0 picks a free port; -1 disables)",
    )
    a("--mem-dir", help="directory for the shared memory files (default /dev/shm)")
    a(
        "--prefault",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="back all machine memory with RAM at startup (default on)",
    )
    a("--swap-file", help="path of the swap file (created, removed at exit)")
    a("--swap-size", help="size of the swap file, e.g. 1GiB (default: no swap)")
    a(
        "--slot-capacity",
        type=int,
        help="pages per PageList batch, for every VM (default: 1/32 of each guest, 512 to 4096)",
    )
    a("--max-fault-around", type=int, help="most neighbour pages one fault may map (default 16)")
    a("--free-high-pct", type=float, help="free memory %% where reclaim stops (default 6)")
    a("--free-soft-pct", type=float, help="below this %% free: soft state (default 4)")
    a("--free-hard-pct", type=float, help="below this %% free: hard state, swapping (default 2)")
    a("--free-low-pct", type=float, help="below this %% free: low state, faults wait (default 1)")
    a("--sample-pages", type=int, help="working-set sample size per VM and period (default 100)")
    a("--sample-period", type=float, help="seconds per working-set sampling period (default 30)")
    a("--sample-seed", type=int, help="seed of the sample draws (default: random)")
    a(
        "--share-scan-period",
        type=float,
        help="page sharing scans each VM's memory once per this many seconds (default 30)",
    )
    a(
        "--numa-migrate-rate",
        type=float,
        help="NUMA migration moves at most this many pages per second per VM (default 4096; "
        "0: no migration)",
    )
    a(
        "--numa-host-migrate-rate",
        type=float,
        help="... and at most this many pages per second for the whole host (default 16384)",
    )
    a(
        "--hugepages",
        action=argparse.BooleanOptionalAction,
        help="2M promotion and 2M defrag: map fully backed private 2 MB regions large "
        "(default off)",
    )
    a(
        "--hold-read-ahead",
        action=argparse.BooleanOptionalAction,
        help="swap read-ahead validation: hold read-ahead pages until a low-priority "
        "verdict keeps or drops them; holds end at once when the host needs frames "
        "(default on)",
    )
    a(
        "--lowprio-aging-seconds",
        type=float,
        help="a low-priority type waiting this long moves up one class (default 1)",
    )
    a("--idle-tax", type=float, help="memsched's idle memory tax, 0..1 (default 0.75, ESX)")
    a(
        "--balloon",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reclaim by ballooning first (default on; --no-balloon: swap only)",
    )
    a(
        "--balloon-max-fraction",
        type=float,
        help="the most of a guest's memory its balloon may hold (default 0.65, ESX)",
    )
    a("--balance-period", type=float, help="seconds between memsched's balances (default 1)")
    a(
        "--fresh",
        action="store_const",
        const=True,
        help="discard the state a crashed daemon left on this socket (its VMs' memory) "
        "instead of taking it over, which is the default",
    )
    a(
        "--reattach-seconds",
        type=float,
        help="after taking over from a crashed daemon, how long its VMs wait for their "
        "agents to come back before they are released (default 60)",
    )
    a(
        "--allow-beyond-ram",
        action="store_const",
        const=True,
        help="allow --host-memory beyond this machine's RAM (the host kernel would swap it)",
    )
    a(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="also admit this user's processes on the socket (repeatable; default: only the "
        "daemon's own user). The socket is then mode 0666 and the peer's uid (SO_PEERCRED) "
        "decides",
    )
    a("--log-format", choices=["auto", "json", "console"], help="log format (default auto)")
    a("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    config = settings_from_cli(
        PlatformConfig, vars(build_parser().parse_args(argv)), "vmmem-platform"
    )
    if config is None:
        return 2
    configure_logging(config.log_format, config.log_level)
    shorten_switch_interval()  # the swap writer and the event loop wait less for the GIL
    # Before the thread pool exists: swap batches must not pile up in its threads' arenas.
    if not fix_mmap_threshold():
        structlog.get_logger("vmmem.platform").warning(
            "malloc_not_tuned", reason="no glibc mallopt: freed swap buffers may stay mapped"
        )
    from .server import PlatformServer

    # Until the event loop handles SIGTERM, it interrupts startup (prefaulting gigabytes
    # takes a while) like Ctrl-C does, so that what startup created is removed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server = PlatformServer(config)
    except (VMMemError, OSError) as exc:
        print(f"vmmem-platform: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "vmmem-platform: interrupted while starting (the files it created are removed)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        run(server.serve())
    except (VMMemError, OSError) as exc:
        print(f"vmmem-platform: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
