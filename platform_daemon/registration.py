"""VM registration and teardown: control region files, home nodes, releasing everything."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.constants import PAGE_SIZE
from shared.errors import ErrorCode, VMMemError
from shared.layout import ControlRegion, region_size
from shared.messages import Register, Registered
from shared.shm import create_mapped

from .p2m import P2M
from .vm import VM

if TYPE_CHECKING:
    from .connection import PlatformConnection
    from .server import PlatformServer


class Registry:
    """Creates and tears down VMs; owns the VM id and generation counters."""

    def __init__(self, server: PlatformServer) -> None:
        self.server = server
        self._ids = itertools.count(1)
        self._generations = itertools.count(1)

    def region_path(self, vm_id: int) -> Path:
        return self.server.config.mem_dir / f"vmmem-{os.getpid()}-vm{vm_id}"

    def register(self, conn: PlatformConnection, info: Register) -> Registered:
        """Create the VM's p2m and control region; raise a clear error if it cannot be."""
        server, cfg = self.server, self.server.config
        if conn.vm is not None:
            raise VMMemError(
                "this connection already registered a VM", ErrorCode.ALREADY_REGISTERED
            )
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
        vm_id, generation = next(self._ids), next(self._generations)
        path = self.region_path(vm_id)
        mapped = create_mapped(path, region_size(cfg.slot_count, cfg.slot_capacity))
        region = ControlRegion.initialize(
            mapped.mm,
            vm_id=vm_id,
            generation=generation,
            slot_count=cfg.slot_count,
            capacity=cfg.slot_capacity,
            guest_pages=info.guest_pages,
        )
        vm = VM(vm_id, generation, info, home, P2M(info.guest_pages), region, mapped, conn)
        server.vms[vm_id] = vm
        conn.vm = vm
        server.on_vm_registered(vm)
        return Registered(
            vm_id=vm_id,
            machine_memory_path=str(server.machine.path),
            host_pages=server.machine.host_pages,
            control_region_path=str(path),
            slot_count=cfg.slot_count,
            slot_capacity=cfg.slot_capacity,
            home_node=home,
            numa_nodes=server.machine.nodes,
            max_outstanding_faults=cfg.max_outstanding_faults,
            generation=generation,
        )

    def _pick_home_node(self) -> int:
        """The node with the most free frames, so VMs spread over the host."""
        alloc = self.server.machine.allocator
        return int(np.argmax([alloc.free_on(n) for n in range(alloc.nodes)]))

    def unregister(self, vm: VM) -> None:
        """Release every frame, swap slot and file the VM held. Other VMs are untouched."""
        if not vm.alive:
            return
        vm.alive = False
        self.server.vms.pop(vm.vm_id, None)
        self.server.on_vm_gone(vm)
        vm.region_file.unlink()
        vm.region.release()  # its views pin the mapping: unmap and close its descriptor now
        vm.region_file.close(strict=True)
