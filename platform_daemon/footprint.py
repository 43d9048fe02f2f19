"""What the daemon's metadata costs: bytes per guest page of each VM, and per host frame.

For the scale benchmark (``benchmarks/scale.py``, through ``vmmem-ctl`` op ``footprint``).
A VM's metadata is everything reachable from its p2m, its round state and the services'
per-VM entries (the dictionaries keyed by its id); the host's is the allocator, the machine's
own arrays (not the frames themselves, through either mapping: guest memory) and the
shared-frame table. Arrays are measured by ``shared.footprint``, each byte once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.footprint import array_bytes

from .connection import PlatformConnection
from .context import ServiceContext
from .machine import MachineMemory
from .vm import VM

if TYPE_CHECKING:
    from .server import PlatformServer

#: A walk never follows these: they lead from one VM to the whole daemon.
_SKIP = (VM, ServiceContext, MachineMemory, PlatformConnection)


def vm_roots(server: PlatformServer, vm: VM) -> dict[str, list[Any]]:
    """What holds ``vm``'s metadata, by owner."""
    roots: dict[str, list[Any]] = {"p2m": [vm.p2m], "rounds": [server.rounds.get(vm.vm_id)]}
    for stype, svc in server.services.items():
        held = [
            value[vm.vm_id]
            for value in vars(svc).values()
            if isinstance(value, dict) and vm.vm_id in value
        ]
        if held:
            roots[stype.name.lower()] = held
    return roots


def footprint(server: PlatformServer) -> dict[str, Any]:
    """Metadata bytes per VM (total, per guest page, by owner) and for the host."""
    machine = server.machine
    vms = []
    for vm in server.vms.values():
        owners = {
            name: array_bytes(roots, _SKIP, exclude=[machine.frames, machine.source])
            for name, roots in vm_roots(server, vm).items()
        }
        total = sum(owners.values())
        vms.append(
            {
                "vm": vm.name,
                "guest_pages": vm.guest_pages,
                "bytes": total,
                "bytes_per_page": round(total / vm.guest_pages, 2),
                "by_owner": owners,
            }
        )
    host_roots = [machine.allocator, server.shared, vars(machine)]
    host = array_bytes(host_roots, _SKIP, exclude=[machine.frames, machine.source])
    return {
        "vms": vms,
        "host": {
            "frames": machine.host_pages,
            "bytes": host,
            "bytes_per_frame": round(host / machine.host_pages, 2),
        },
    }
