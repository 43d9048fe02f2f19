"""``vmmem-ctl``: inspect and steer a running platform daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shared.errors import ErrorCode
from shared.sizes import format_size

from .ctl_client import CtlClient, CtlError
from .ctl_top import SORT_KEYS, DaemonLost, run_top
from .hugepages_status import host_hugepages_line, vm_hugepages_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmmem-ctl", description="Inspect and steer a running VMMem platform daemon."
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("VMMEM_SOCKET", "/tmp/vmmem.sock"),
        help="the platform daemon's socket (default $VMMEM_SOCKET or /tmp/vmmem.sock)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="VMs with their pages by state; host frames by state")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    rt = sub.add_parser("retire", help="mark a machine frame failing (page-retire)")
    rt.add_argument("--mpn", type=int, required=True, help="machine page number to retire")
    hl = sub.add_parser("set-host-limit", help="change the memory VMs may use, e.g. 128MiB")
    hl.add_argument("size", help="a size such as 128MiB or 1GiB")
    lp = sub.add_parser(
        "set-lowprio", help="change working-set sampling or the page-sharing scan at run time"
    )
    lp.add_argument("--sample-period", type=float, help="seconds per sampling period")
    lp.add_argument("--sample-pages", type=int, help="pages sampled per VM and period")
    lp.add_argument("--share-scan-period", type=float, help="seconds to scan each VM's memory once")
    lp.add_argument(
        "--numa-migrate-rate", type=float, help="NUMA migration, pages/s per VM (0: off)"
    )
    lp.add_argument(
        "--numa-host-migrate-rate", type=float, help="NUMA migration, pages/s for the host"
    )
    ms = sub.add_parser(
        "set-memsched", help="turn ballooning on or off, change the idle tax or balloon cap"
    )
    ms.add_argument(
        "--balloon", action=argparse.BooleanOptionalAction, default=None, help="ballooning"
    )
    ms.add_argument("--idle-tax", type=float, help="the idle memory tax, 0..1")
    ms.add_argument("--balloon-max-fraction", type=float, help="a balloon's cap, 0..1")
    ms.add_argument("--balance-period", type=float, help="seconds between balances")
    ck = sub.add_parser(
        "check",
        help="verify the daemon's invariants (frames, sharing, swap slots, what each VM maps); "
        "exits 1 on any violation",
    )
    ck.add_argument(
        "--no-exposures", action="store_true", help="do not ask the agents what they map"
    )
    ck.add_argument("--json", action="store_true", help="print the raw result as JSON")
    tp = sub.add_parser(
        "top", help="a refreshing memory view: host frames and swap, per-VM pages and rates"
    )
    tp.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        help="seconds between screens; rates are over this time (default 2)",
    )
    tp.add_argument(
        "--once", action="store_true", help="print one screen (rates over --interval) and exit"
    )
    tp.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default="faults",
        help="order of the VMs: name ascending, any other column descending (default faults)",
    )
    return p


def _interval(text: str) -> float:
    """``--interval``: a number of seconds from 0.1 to 3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0.1 to 3600 seconds, not {text}")
    return value


def render_status(st: dict[str, Any]) -> str:
    h = st["host"]
    page = h["page_size"]
    lines = [
        f"host: {h['pages']:,} frames ({format_size(h['pages'] * page)}), free {h['free']:,}, "
        f"used {h['used']:,}, retired {h['retired']:,}; "
        f"limit {format_size(h['limit_pages'] * page)}, state {h['free_state']}",
    ]
    for n in h["nodes"]:
        lines.append(
            f"  node {n['node']}: MPN {n['first_mpn']}-{n['last_mpn']}  free {n['free']:,}"
            f"  used {n['used']:,}  retired {n['retired']:,}"
        )
    if st.get("swap"):
        sw = st["swap"]
        full = f"  FULL ({sw['full']}): not counted on for reclaim" if sw.get("full") else ""
        lines.append(f"swap: {sw['path']}  {sw['used']:,}/{sw['slots']:,} slots used{full}")
    if st.get("hugepages"):
        lines.append(host_hugepages_line(st["hugepages"]))
    sh = st.get("sharing")
    if sh:
        lines.append(
            f"sharing: {sh['shared_pages']:,} pages merged into {sh['merged_frames']:,} frames"
            f" (+ zero frames), {sh['frames_saved']:,} frames saved, "
            f"{sh['cow_breaks']:,} COW breaks, scanning {sh['scan_rate_pages_per_second']:,.0f}"
            " pages/s"
        )
    if not st["vms"]:
        lines.append("no VMs registered")
    for vm in st["vms"]:
        pages = "  ".join(f"{k} {v:,}" for k, v in vm["pages"].items() if v)
        lines.append(
            f"vm {vm['name']} (id {vm['vm_id']}, {vm['guest_pages']:,} pages, "
            f"home node {vm['home_node']}, pid {vm['pid']}): {pages}"
        )
        lines.append("  " + _vm_lowprio_line(vm))
        if vm.get("numa"):
            lines.append("  " + _vm_numa_line(vm["numa"]))
        if vm.get("readahead"):
            lines.append("  " + _vm_readahead_line(vm["readahead"]))
        if vm.get("hugepages"):
            lines.append("  " + vm_hugepages_line(vm["hugepages"]))
        if vm.get("memsched"):
            lines.append("  " + _vm_memsched_line(vm["memsched"]))
    return "\n".join(lines)


def _vm_memsched_line(m: dict[str, Any]) -> str:
    """Shares, rho, targets, balloon, swap and guest impact of one VM, on one line."""
    rho = "-" if m["rho"] is None else f"{m['rho']:.3g}"
    target = "-" if m["target_pages"] is None else f"{m['target_pages']:,}"
    wss = "-" if m["wss_pages"] is None else f"{m['wss_pages']:,}"
    return (
        f"memsched: shares {m['shares']}, rho {rho}, target {target} pages, balloon "
        f"{m['balloon_pages']:,}/{m['balloon_target']:,}, swapped {m['swapped_pages']:,}"
        f" (target {m['swap_target']:,}), wss {wss}, refaults {m['refaults']:,}, stall "
        f"{m['stall_seconds']:.1f} s"
        + (", BACKED OFF" if m["backed_off"] else "")
        + (", BALLOON STALLED" if m.get("balloon_stalled") else "")
    )


def _vm_lowprio_line(vm: dict[str, Any]) -> str:
    """Working-set estimate and page sharing of one VM, on one line."""
    sampling, sharing = vm.get("sampling", {}), vm.get("sharing", {})
    fraction = sampling.get("estimate_fraction")
    wss = (
        "working set: not measured yet"
        if fraction is None
        else f"working set ~{fraction:.0%} ({sampling['estimate_pages']:,} pages)"
    )
    return (
        f"{wss}; shared {sharing.get('shared_pages', 0):,} "
        f"(saving {sharing.get('frames_saved', 0):,} frames), "
        f"COW breaks {sharing.get('cow_breaks', 0):,}, "
        f"scanned {sharing.get('scanned_pages', 0):,} "
        f"({sharing.get('scan_rate_pages_per_second', 0):,.0f}/s)"
    )


def _vm_readahead_line(r: dict[str, Any]) -> str:
    """Swap read-ahead validation's payoff, on one line."""
    per = r["faults_avoided_per_validation"]
    return (
        f"swap read-ahead: held {r['held_now']:,} now ({r['held']:,} in all); validated "
        f"{r['validated']:,}: faults avoided {r['faults_avoided']:,}"
        f"{'' if per is None else f' ({per:.0%})'}, frames recovered "
        f"{r['frames_recovered']:,}, kept {r['kept']:,}; faulted while held {r['faulted']:,}, "
        f"released under pressure {r.get('released_under_pressure', 0):,}"
        + (
            f"; hit ratio {r['hit_ratio']:.0%}, window up to {r['window_cap']}"
            if "hit_ratio" in r
            else ""
        )
    )


def _vm_numa_line(n: dict[str, Any]) -> str:
    """Pages on and off the home node, and NUMA migration's work, on one line."""
    fraction = n["local_fraction"]
    share = "-" if fraction is None else f"{fraction:.1%}"
    return (
        f"numa: home node {n['home_node']}, local {n['local_pages']:,}, remote "
        f"{n['remote_pages']:,} ({share} local); migrated {n['migrated_pages']:,} "
        f"(queued {n['queued_pages']:,}), revalidated {n['validated_pages']:,}"
    )


def render_check(result: dict[str, Any]) -> str:
    """One line per violation, by name, then what was checked."""
    lines = [f"VIOLATION {v['name']} ({v['count']}): {v['detail']}" for v in result["violations"]]
    agents = result["agents_checked"]
    lines.append(
        ("OK" if result["ok"] else f"FAILED: {len(result['violations'])} invariant(s) violated")
        + f" in {result['seconds'] * 1000:.0f} ms; agents checked: "
        + (", ".join(agents) if agents else "none")
    )
    for name, why in result["agents_skipped"].items():
        lines.append(f"  agent {name} not checked: {why}")
    return "\n".join(lines)


def _top(client: CtlClient, args: argparse.Namespace) -> int:
    """``top`` until Ctrl-C; a daemon that goes away ends it with one line and exit 2."""

    def sample() -> dict[str, Any]:
        try:
            return client.call("status")
        except OSError as exc:
            raise DaemonLost(str(exc) or type(exc).__name__) from exc
        except CtlError as exc:
            if exc.code == ErrorCode.PROTOCOL:  # closed, or not speaking the protocol
                raise DaemonLost(str(exc)) from exc
            raise

    try:
        run_top(sample, interval=args.interval, once=args.once, sort=args.sort)
    except DaemonLost as exc:
        print(f"vmmem-ctl top: lost the platform daemon at {args.socket}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _command(client: CtlClient, args: argparse.Namespace) -> int:
    """Run one subcommand; its exit code."""
    if args.command == "top":
        return _top(client, args)
    if args.command == "check":
        result = client.call("check", exposures=not args.no_exposures)
        print(json.dumps(result, indent=2) if args.json else render_check(result))
        return 0 if result["ok"] else 1
    if args.command == "status":
        st = client.call("status")
        print(json.dumps(st, indent=2) if args.json else render_status(st))
    elif args.command == "retire":
        print(json.dumps(client.call("retire", mpn=args.mpn)))
    elif args.command == "set-lowprio":
        settings = {
            "sample_period": args.sample_period,
            "sample_pages": args.sample_pages,
            "share_scan_period": args.share_scan_period,
            "numa_migrate_rate": args.numa_migrate_rate,
            "numa_host_migrate_rate": args.numa_host_migrate_rate,
        }
        chosen = {k: v for k, v in settings.items() if v is not None}
        print(json.dumps(client.call("set_lowprio", **chosen)))
    elif args.command == "set-memsched":
        settings = {
            "balloon": args.balloon,
            "idle_tax": args.idle_tax,
            "balloon_max_fraction": args.balloon_max_fraction,
            "balance_period": args.balance_period,
        }
        chosen = {k: v for k, v in settings.items() if v is not None}
        print(json.dumps(client.call("set_memsched", **chosen)))
    else:
        print(json.dumps(client.call("set_host_limit", size=args.size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = CtlClient(args.socket)
    except OSError as exc:
        print(f"vmmem-ctl: cannot reach the platform at {args.socket}: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            return _command(client, args)
        except CtlError as exc:
            print(f"vmmem-ctl: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"vmmem-ctl: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
