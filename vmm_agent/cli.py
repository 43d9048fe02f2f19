"""``vmmem-vmm``: run one VMM agent (one per VM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.config import AgentConfig, settings_from_cli
from shared.errors import VMMemError
from shared.logs import configure_logging
from shared.loops import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmmem-vmm",
        description=(
            "A VMMem VMM agent: one VM. It registers with the platform daemon, maps machine "
            "memory, runs the guest's vCPUs on real frames (every read verified against what "
            "was written) and serves the daemon's memory services. The load generator drives "
            "it through its control socket. Flags can also be set as VMMEM_<NAME> or in a "
            "TOML file (--config, table [vmm])."
        ),
        epilog="Example: vmmem-vmm --socket /tmp/vmmem.sock --name vm1 --memory 64MiB --vcpus 2",
    )
    a = p.add_argument
    a("--config", type=Path, help="TOML file with a [vmm] table of these settings")
    a("--socket", help="the platform daemon's Unix socket (default /tmp/vmmem.sock)")
    a("--name", help="VM name, unique on the host (default vm0)")
    a("--memory", help="guest memory, e.g. 64MiB (default 64MiB)")
    a("--vcpus", type=int, help="virtual CPUs (default 2)")
    a(
        "--metrics-port",
        type=int,
        help="Prometheus port on 127.0.0.1 (default 0: a free port; -1 disables)",
    )
    a("--control-socket", help="control socket for vmmem-load (default beside --socket)")
    a("--latency-sensitivity", type=int, help="VM latency sensitivity (default 0)")
    a("--home-node", type=int, help="NUMA home node (default -1: the daemon picks)")
    a("--shares", type=int, help="memory shares for memsched (default 1000)")
    a("--seed", type=int, help="seed of the guest's random choices (default 0)")
    a(
        "--reconnect-seconds",
        type=float,
        help="if the platform daemon dies: how long the guest waits, stalled, for a daemon "
        "to take it over before the agent exits (default 30)",
    )
    a(
        "--balloon-rate",
        type=float,
        help="pages per second the balloon driver may inflate (default 2048, as Linux's "
        "vmw_balloon under guest memory pressure)",
    )
    a(
        "--balloon-deflate-rate",
        type=float,
        help="pages per second the balloon driver may deflate (default 16384)",
    )
    a(
        "--balloon-max-fraction",
        type=float,
        help="the most of guest memory the balloon may hold (default 0.65, as ESX)",
    )
    a(
        "--page-check-rate",
        type=float,
        help="pages per second the monitor re-verifies against the guest model at low "
        "priority, within the time bound (default 1000; 0: off)",
    )
    a("--log-format", choices=["auto", "json", "console"], help="log format (default auto)")
    a("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    config = settings_from_cli(AgentConfig, vars(build_parser().parse_args(argv)), "vmmem-vmm")
    if config is None:
        return 2
    configure_logging(config.log_format, config.log_level)
    from .agent import Agent
    from .rpc import ConnectionClosed

    agent = Agent(config)
    try:
        code = run(agent.serve())
        if agent.exit_message:
            print(f"vmmem-vmm: {agent.exit_message}", file=sys.stderr)
        return code
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"vmmem-vmm: cannot reach the platform at {config.socket}: {exc}", file=sys.stderr)
        return 1
    except (ConnectionClosed, VMMemError) as exc:
        print(f"vmmem-vmm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
