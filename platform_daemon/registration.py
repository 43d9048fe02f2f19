"""VM registration and teardown: control region files, home nodes, releasing everything."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shared.constants import PAGE_SIZE
from shared.errors import ErrorCode, VMMemError
from shared.layout import ControlRegion, region_size
from shared.messages import Register, Registered
from shared.shm import create_mapped

from . import agent_process
from .connection import ReleaseReason
from .persist import P2MFile, P2MHeader
from .vm import VM

if TYPE_CHECKING:
    from .connection import PlatformConnection
    from .server import PlatformServer


class Registry:
    """Creates, resumes and tears down VMs; VM ids and generations come from the state file,
    so they stay unique across a daemon crash and restart."""

    def __init__(self, server: PlatformServer) -> None:
        self.server = server

    def _next(self, counter: str) -> int:
        header = self.server.state.header
        value = int(getattr(header, counter))
        setattr(header, counter, value + 1)
        self.server.state.write_header()
        return value

    def next_generation(self) -> int:
        return self._next("next_vm_generation")

    def register(self, conn: PlatformConnection, info: Register) -> Registered:
        """Create the VM's p2m and control region; raise a clear error if it cannot be."""
        server, cfg = self.server, self.server.config
        if conn.vm is not None:
            raise VMMemError(
                "this connection already registered a VM", ErrorCode.ALREADY_REGISTERED
            )
        if info.resume_vm_id:
            return self.reattach(conn, info)
        if any(vm.name == info.name for vm in server.vms.values()):
            raise VMMemError(f"a VM named {info.name!r} is already running", ErrorCode.BAD_REQUEST)
        if info.guest_pages * PAGE_SIZE > cfg.max_guest_memory:
            raise VMMemError(
                f"guest of {info.guest_pages} pages exceeds --max-guest-memory "
                f"({cfg.max_guest_memory // PAGE_SIZE} pages)",
                ErrorCode.BAD_REQUEST,
            )
        if info.home_node >= server.machine.nodes:
            raise VMMemError(
                f"home node {info.home_node} does not exist (nodes: {server.machine.nodes})",
                ErrorCode.BAD_REQUEST,
            )
        home = info.home_node if info.home_node >= 0 else self._pick_home_node()
        vm_id, generation = self._next("next_vm_id"), self.next_generation()
        paths = server.paths
        header = P2MHeader(
            vm_id, generation, info.guest_pages, home, info, agent_started=_started(conn, info)
        )
        store = P2MFile.create(paths.p2m(vm_id), header)
        capacity = cfg.slot_capacity_of(info.guest_pages)
        try:
            mapped = create_mapped(paths.region(vm_id), region_size(cfg.slot_count, capacity))
        except BaseException:
            store.close(unlink=True)
            raise
        region = ControlRegion.initialize(
            mapped.mm,
            vm_id=vm_id,
            generation=generation,
            slot_count=cfg.slot_count,
            capacity=capacity,
            guest_pages=info.guest_pages,
        )
        vm = VM(vm_id, generation, info, home, store.p2m, region, mapped, conn, store=store)
        server.vms[vm_id] = vm
        conn.vm = vm
        server.on_vm_registered(vm)
        return self.registered(vm)

    def registered(self, vm: VM) -> Registered:
        server, cfg = self.server, self.server.config
        return Registered(
            vm_id=vm.vm_id,
            machine_memory_path=str(server.machine.path),
            host_pages=server.machine.host_pages,
            control_region_path=str(vm.region_path),
            slot_count=vm.region.slot_count,
            slot_capacity=vm.region.slot_capacity,
            home_node=vm.home_node,
            numa_nodes=server.machine.nodes,
            max_outstanding_faults=cfg.max_outstanding_faults,
            generation=vm.generation,
        )

    def reattach(self, conn: PlatformConnection, info: Register) -> Registered:
        """The agent of a VM recovered after a daemon crash is back: it carries on.

        It must name the VM exactly as it was (id, name, size, pid and the generation it
        was given), so no other process can take a recovered VM's memory over.
        """
        vm = self.server.vms.get(info.resume_vm_id)
        if (
            vm is None
            or vm.name != info.name
            or vm.guest_pages != info.guest_pages
            or vm.info.pid != info.pid
            or vm.resume_generation != info.resume_generation
        ):
            raise VMMemError(
                f"no VM {info.name!r} (id {info.resume_vm_id}, generation "
                f"{info.resume_generation}) to resume: this daemon did not take it over",
                ErrorCode.BAD_REQUEST,
            )
        if not vm.detached:
            raise VMMemError(f"VM {vm.name!r} has resumed already", ErrorCode.BAD_REQUEST)
        vm.connection = conn
        conn.vm = vm
        if vm.store is not None:  # the agent has this daemon's generation from now on
            vm.store.header.agent_generation = vm.generation
            vm.store.write_header()
        return self.registered(vm)

    def _pick_home_node(self) -> int:
        """The node with the most free frames, so VMs spread over the host."""
        alloc = self.server.machine.allocator
        return int(np.argmax([alloc.free_on(n) for n in range(alloc.nodes)]))

    def unregister(self, vm: VM, reason: ReleaseReason = ReleaseReason.CLOSED) -> None:
        """Release every frame, swap slot and file the VM held. Other VMs are untouched."""
        if not vm.alive:
            return
        vm.alive = False
        self.server.vms.pop(vm.vm_id, None)
        self.server.on_vm_gone(vm, reason)
        vm.region_file.unlink()
        vm.region.release()  # its views pin the mapping: unmap and close its descriptor now
        vm.region_file.close(strict=True)
        if vm.store is not None:
            vm.store.close(unlink=True)


def _started(conn: PlatformConnection, info: Register) -> int:
    """The agent process's start time, when the kernel vouches for its pid (SO_PEERCRED);
    a pid from another pid namespace is not looked up: the daemon cannot see it."""
    peer = getattr(conn, "peer", None)  # connections built in tests have no credentials
    if peer is None or peer.pid != info.pid:
        return agent_process.UNKNOWN
    return agent_process.start_time(info.pid)
