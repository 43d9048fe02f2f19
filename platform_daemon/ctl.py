"""``vmmem-ctl``: inspect and steer a running platform daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shared.loops import run
from shared.sizes import format_size


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
    return p


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
        lines.append(f"swap: {sw['path']}  {sw['used']:,}/{sw['slots']:,} slots used")
    if not st["vms"]:
        lines.append("no VMs registered")
    for vm in st["vms"]:
        pages = "  ".join(f"{k} {v:,}" for k, v in vm["pages"].items() if v)
        lines.append(
            f"vm {vm['name']} (id {vm['vm_id']}, {vm['guest_pages']:,} pages, "
            f"home node {vm['home_node']}, pid {vm['pid']}): {pages}"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    from vmm_agent.rpc import PeerError, RpcClient

    client = await RpcClient.connect(args.socket)
    try:
        if args.command == "status":
            st = await client.ctl("status")
            print(json.dumps(st, indent=2) if args.json else render_status(st))
        elif args.command == "retire":
            print(json.dumps(await client.ctl("retire", mpn=args.mpn)))
        else:
            print(json.dumps(await client.ctl("set_host_limit", size=args.size)))
    except PeerError as exc:
        print(f"vmmem-ctl: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(_main(args))
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        print(f"vmmem-ctl: cannot reach the platform at {args.socket}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
