"""The platform daemon's server: startup → main loop → shutdown, and message dispatch.

Dispatch runs inside the transport's read callback: the fast paths (most faults, every
GetRequest and CompleteRequest) are answered synchronously with no task per message. Only
work that must wait (swap-in I/O, free memory) becomes a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from prometheus_client import CollectorRegistry, start_http_server

from shared.config import PlatformConfig
from shared.constants import (
    HIGH_PRIORITY_MASK,
    NO_FRAME,
    FreeState,
    PageState,
    PageStatus,
    ServiceType,
)
from shared.ctl_reply import reply_frame
from shared.errors import ErrorCode, RemoteProtocolError, VMMemError
from shared.layout import ControlRegion, region_size
from shared.messages import (
    CompleteRequest,
    CtlReply,
    CtlRequest,
    Error,
    Fault,
    FaultReply,
    GetRequest,
    Kick,
    Message,
    Register,
)
from shared.sd_notify import Notifier
from shared.shm import create_mapped, open_mapped
from shared.sockets import check_socket_path, listen_private

from . import agent_process
from .connection import PlatformConnection, ReleaseReason
from .context import ServiceContext
from .ctl_ops import CtlOps
from .faults import FaultResolver, NeedsAsync
from .invariants import HostState, check
from .log_throttle import ThrottledEvent
from .lowprio import LowPriorityScheduler
from .machine import MachineMemory, check_fits_ram
from .memsched import MemSched
from .metrics import PlatformMetrics, StateCollector
from .p2m import FLAG_SHARED
from .persist import P2MFile, StateError, StatePaths
from .recovery import Reconciled, open_p2ms, open_state, reconcile
from .registration import Registry
from .retire import FrameRetirement
from .rounds import LowRoundClosed, RoundEngine, RoundState
from .services import build_services
from .services.base import LowPriorityService
from .services.swap import SwapService
from .shared_frames import SharedFrames
from .swapfile import SwapFile
from .vm import DETACHED, VM
from .waits import FrameWaits

log = structlog.get_logger("vmmem.platform")
#: Seconds between two ``fault_failed`` lines of one VM (``log_throttle.py``).
FAULT_FAILED_LOG_SECONDS = 5.0
# Plain ints: comparing a NumPy value with an IntEnum member costs microseconds (see faults.py).
_ZERO, _IN_FLIGHT, _SWAPPED = int(PageState.ZERO), int(PageState.IN_FLIGHT), int(PageState.SWAPPED)
#: How often VMs taken over are looked at until their agents resumed or exited.
DETACHED_POLL_SECONDS = 0.2


def _socket_is_live(path: Path) -> bool:
    """True when something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class PlatformServer:
    """One platform daemon: machine memory, VMs, services and the Unix socket."""

    def __init__(self, config: PlatformConfig, registry: CollectorRegistry | None = None) -> None:
        # Before any file is created: the swap file is opened with O_TRUNC and removed at
        # exit, so a second daemon on a live one's socket (same configuration) would wipe the
        # live daemon's swapped pages. startup() checks again when it binds the socket.
        if config.socket.exists() and _socket_is_live(config.socket):
            raise VMMemError(f"another daemon is serving {config.socket}", ErrorCode.BAD_REQUEST)
        self.config = config
        # Out of memory, every waiting fault fails: one line per VM per interval, counted.
        self.fault_failed_log = ThrottledEvent(log, "fault_failed", FAULT_FAILED_LOG_SECONDS)
        self.metrics_registry = registry or CollectorRegistry()
        self.metrics = PlatformMetrics(self.metrics_registry)
        self.metrics_registry.register(StateCollector(weakref.ref(self)))
        self.paths = StatePaths.for_socket(config.mem_dir, config.socket)
        self.state, self.recovered = open_state(config, self.paths)
        files: list[P2MFile] = []
        self.swap: SwapFile | None = None
        try:
            reconciled = None
            if self.recovered:
                t0 = time.perf_counter()
                files = open_p2ms(self.paths)
                reconciled = reconcile(self.state, files)
                self._reconcile_seconds = time.perf_counter() - t0
            else:
                check_fits_ram(config.host_memory, config.allow_beyond_ram)
            if config.swap_file is not None and config.swap_size > 0:
                self.swap = SwapFile(
                    config.swap_file,
                    config.swap_size,
                    checksum=self.state.swap_checksum,
                    existing=self.recovered,
                )
            self.machine = MachineMemory(
                self.paths.machine,
                config.host_pages,
                config.numa_nodes,
                prefault=config.prefault,
                frame_state=self.state.frame_state,
                failing=self.state.failing,
                existing=self.recovered,
                zero_frames=self.state.header.zero_frames if self.recovered else None,
            )
            if not self.recovered:
                self.state.header.zero_frames = list(self.machine.zero_frame)
                self.state.write_header()
        except BaseException:
            # Nothing of a fresh start is left behind (a signal during prefault included); a
            # crashed daemon's files stay as they were, for the next attempt.
            for f in files:
                f.close(unlink=False)
            if self.swap is not None:
                self.swap.close(unlink=not self.recovered)
            if not self.recovered:
                self.paths.machine.unlink(missing_ok=True)
            self.state.close(unlink=not self.recovered)
            raise
        self.vms: dict[int, VM] = {}
        self.rounds: dict[int, RoundState] = {}
        self.connections: set[PlatformConnection] = set()
        self.shared = SharedFrames(
            self.machine, origin=self.state.shared_origin, joined=self.state.shared_joined
        )
        self.faults = FaultResolver(self.machine, self.shared, config.max_fault_around)
        self.registry = Registry(self)
        self.memsched = MemSched(self)
        self.waits = FrameWaits(
            self.machine,
            config.low_wait_seconds,
            lambda: self.memsched.tick(time.monotonic()),
            self.metrics.low_waits,
        )
        self.tasks: set[asyncio.Task[Any]] = set()
        #: Services' own never-ending work (the page-sharing scanner), cancelled at shutdown.
        self.background: set[asyncio.Task[Any]] = set()
        self.context = ServiceContext(
            machine=self.machine,
            mapper=self.faults,
            shared=self.shared,
            metrics=self.metrics,
            config=config,
            clock=time.monotonic,
            spawn=self.spawn,
            waits=self.waits,
            swap=self.swap,
            targets=self.memsched,
            cancel=self._cancel_in_flight,
        )
        self.services = build_services(self.context)
        self.engine = RoundEngine(
            self.services,
            clock=time.monotonic,
            scheduler=LowPriorityScheduler(aging_seconds=config.lowprio_aging_seconds),
        )
        self.engine.on_batch_done = self._record_batch
        self.engine.on_round_open = lambda p: self.metrics.rounds.labels(p.name.lower()).inc()
        self.engine.on_low_round_closed = self._record_low_round
        self.engine.on_low_work = self._record_low_work
        self.retirement = FrameRetirement(
            self.machine,
            self.shared,
            self.vms,
            self.services[ServiceType.PAGE_RETIRE],  # type: ignore[arg-type]
            self.services[ServiceType.P2M_UPDATE],  # type: ignore[arg-type]
            self.kick,
            self.metrics,
        )
        self.ctl = CtlOps(self)
        self.should_exit = False
        self._stop: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._http: Any = None
        self._owns_socket = False
        self.metrics_port: int | None = None
        self.started = time.time()
        self.notifier = Notifier.from_env()  # systemd Type=notify; a no-op elsewhere
        if reconciled is not None:
            try:
                self.machine.limit_pages = min(
                    self.state.header.limit_pages, self.machine.host_pages
                )
                self._take_over(reconciled)
            except BaseException:
                self._close_files(unlink=False)  # refused: the files stay for another try
                raise

    def _take_over(self, reconciled: Reconciled) -> None:
        """Adopt what ``reconcile`` made of a crashed daemon's state: owners of private
        frames, merged frames, swap slots, and every VM, detached until its agent is back."""
        t0 = time.perf_counter()
        for f in reconciled.files:
            p2m = f.p2m
            private = np.flatnonzero((p2m.frame >= 0) & ((p2m.flags & FLAG_SHARED) == 0))
            self.machine.set_owner(p2m.frame[private], f.header.vm_id, private)
        self.shared.adopt(reconciled.refs)
        if self.swap is not None:
            self.swap.adopt(reconciled.swap_slots_in_use)
        cfg = self.config
        for f in reconciled.files:
            h = f.header
            capacity = cfg.slot_capacity_of(h.guest_pages)  # what its agent mapped, same rule
            size = region_size(cfg.slot_count, capacity)
            # The agent names the generation it was given, which the header keeps through
            # any number of takeovers until the agent is back (agent_generation).
            h.generation = self.registry.next_generation()
            f.write_header()
            path = self.paths.region(h.vm_id)
            # Opened in place, never truncated: the agent still maps this very file.
            mapped = open_mapped(path) if path.exists() else create_mapped(path, size)
            if len(mapped.mm) < size:
                mapped.close()
                raise StateError(f"{path}: too small for this daemon's slot geometry")
            region = ControlRegion.initialize(
                mapped.mm,
                vm_id=h.vm_id,
                generation=h.generation,
                slot_count=cfg.slot_count,
                capacity=capacity,
                guest_pages=h.guest_pages,
            )
            vm = VM(
                h.vm_id,
                h.generation,
                h.info,
                h.home_node,
                f.p2m,
                region,
                mapped,
                DETACHED,
                store=f,
                resume_generation=h.agent_generation,
            )
            # Counters start again with this daemon, but memsched reads swapped-out minus
            # swapped-in as "pages in swap now": that must hold from the start.
            vm.stats.swapped_out = int(np.count_nonzero(f.p2m.state == PageState.SWAPPED))
            self.vms[vm.vm_id] = vm
            self.on_vm_registered(vm)
        violations = check(HostState.of(self))
        if violations:
            raise StateError(
                "the state left by the crashed daemon breaks invariants: "
                + "; ".join(f"{v.name} ({v.count}: {v.detail})" for v in violations)
                + ". Start with --fresh to discard it (its VMs' memory is lost)"
            )
        self.metrics.recovered_vms.inc(len(reconciled.files))
        log.info(
            "platform_recovered",
            generation=self.state.header.generation,
            previous_pid=self.state.previous_pid,
            reconcile_seconds=round(self._reconcile_seconds, 4),
            adopt_seconds=round(time.perf_counter() - t0, 4),
            **reconciled.summary(),
        )

    def _save_host_limit(self) -> None:
        """The host limit survives a crash too (a header write, only when it changed)."""
        if self.machine.limit_pages != self.state.header.limit_pages:
            self.state.header.limit_pages = self.machine.limit_pages
            self.state.write_header()

    async def _release_unresumed(self) -> None:
        """VMs taken over whose agents will not come back are released.

        An agent whose process has exited is released at once. One whose process still
        runs is kept, even past ``--reattach-seconds``: it may be stopped (SIGSTOP, a
        debugger) with writable mappings of its frames, and handed to another VM they would
        be written by its vCPUs before they notice the daemon changed. It resumes when it
        runs again, or is released when it exits. An agent whose process cannot be looked
        up (another pid namespace) is released after the window, as before.
        """
        deadline = time.monotonic() + self.config.reattach_seconds
        kept: set[int] = set()
        while detached := [vm for vm in self.vms.values() if vm.detached]:
            past = time.monotonic() >= deadline
            for vm in detached:
                started = vm.store.header.agent_started if vm.store is not None else 0
                running = agent_process.still_running(vm.info.pid, started)
                if running is False or (running is None and past):
                    log.warning(
                        "vm_not_resumed",
                        vm=vm.name,
                        agent="exited" if running is False else "unknown",
                        waited=round(time.monotonic() - deadline + self.config.reattach_seconds, 3),
                    )
                    self.registry.unregister(vm, ReleaseReason.NOT_RESUMED)
                elif running and past and vm.vm_id not in kept:
                    kept.add(vm.vm_id)
                    log.warning(
                        "vm_kept_agent_running",
                        vm=vm.name,
                        pid=vm.info.pid,
                        reason="its agent runs but has not resumed (stopped?): its memory is "
                        "kept until it resumes or exits",
                    )
            await asyncio.sleep(DETACHED_POLL_SECONDS)

    # ---- life cycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or ``request_stop``), then shut down cleanly."""
        try:
            await self.startup()
        except BaseException:
            await self._abandon_startup()
            raise
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def _abandon_startup(self) -> None:
        """Startup failed (a taken metrics port, a socket path refused): undo what it did.
        A crashed daemon's state taken over stays, VMs and all, for another try; a daemon
        that started fresh had nothing and removes its files, as a clean stop does."""
        for task in self.background:
            task.cancel()
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._owns_socket:
            self.config.socket.unlink(missing_ok=True)
        if self.recovered:
            log.warning(
                "platform_start_failed",
                state_kept=str(self.paths.state),
                vms=len(self.vms),
                reason="the crashed daemon's VMs are kept for the next start",
            )
        self._close_files(unlink=not self.recovered)

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        path = self.config.socket
        if self.config.metrics_port >= 0:  # first: a taken port must not cost the socket
            self._http, _ = start_http_server(
                self.config.metrics_port, addr="127.0.0.1", registry=self.metrics_registry
            )
            self.metrics_port = self._http.server_port
        check_socket_path(path)  # another user's path is refused, never removed
        if path.exists():
            if _socket_is_live(path):
                raise VMMemError(f"another daemon is serving {path}", ErrorCode.BAD_REQUEST)
            path.unlink()  # left behind by a daemon that died
        # 0600 from the moment it exists; 0666 when --allow-uid admits others (SO_PEERCRED).
        sock = listen_private(path, 0o666 if self.config.allow_uid else 0o600)
        self._owns_socket = True
        self._server = await loop.create_unix_server(lambda: PlatformConnection(self), sock=sock)
        for svc in self.services.values():
            if isinstance(svc, LowPriorityService) and (work := svc.background()) is not None:
                self.background.add(loop.create_task(work))
        if self.recovered:
            self.background.add(loop.create_task(self._release_unresumed()))
            # Frames marked failing before the crash: their pages move off them again.
            # The mark stays set all along: a crash meanwhile must not forget it.
            for mpn in np.flatnonzero(self.machine.failing).tolist():
                self.retire_frame(mpn, again=True)
        log.info(
            "platform_started",
            socket=str(path),
            host_pages=self.machine.host_pages,
            numa_nodes=self.machine.nodes,
            metrics_port=self.metrics_port,
            swap_slots=self.swap.slots if self.swap else 0,
            pid=os.getpid(),
        )
        self.notifier.notify("READY=1", f"STATUS=serving {path}", f"MAINPID={os.getpid()}")
        if (interval := self.notifier.watchdog_interval) is not None:
            self.background.add(loop.create_task(self._watchdog(interval)))

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog from the event loop: a loop stuck for WatchdogSec gets
        the daemon restarted (the VMs' state survives it, see docs/reliability.md)."""
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        """Signal handlers only set a flag; the main loop does the work."""
        self.should_exit = True
        if self._stop is not None:
            self._stop.set()

    async def main_loop(self) -> None:
        assert self._stop is not None
        while not self.should_exit:
            self.memsched.tick(time.monotonic())
            self._save_host_limit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.memsched.period)

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight work for a bounded time, release everything."""
        log.info("platform_stopping", vms=len(self.vms))
        self.notifier.notify("STOPPING=1")
        self.fault_failed_log.flush()
        for task in self.background:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5.0)
            for task in pending:
                task.cancel()
        for vm in list(self.vms.values()):
            self.registry.unregister(vm, ReleaseReason.SHUTDOWN)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._owns_socket:
            self.config.socket.unlink(missing_ok=True)
        self._close_files(unlink=True)
        log.info("platform_stopped")

    def _close_files(self, unlink: bool) -> None:
        """Unmap and close every state file; ``unlink`` also removes them (a clean stop)."""
        for vm in self.vms.values():
            vm.region_file.close()
            if vm.store is not None:
                vm.store.close(unlink)
            if unlink:
                vm.region_file.unlink()
        self.machine.close(unlink)
        if self.swap is not None:
            self.swap.close(unlink)
        self.state.close(unlink)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task the server tracks, so shutdown can drain it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---- dispatch ---------------------------------------------------------------------------

    def dispatch(self, conn: PlatformConnection, request_id: int, msg: Message) -> None:
        """Handle one decoded message; protocol violations disconnect this peer only."""
        if type(msg) is Fault and conn.vm is not None:  # the hot path: no isinstance chain
            self._handle(conn, conn.vm, request_id, msg)
            return
        if isinstance(msg, CtlRequest):
            self.spawn(self._ctl(conn, request_id, msg))
            return
        if isinstance(msg, Register):
            try:
                conn.send(self.registry.register(conn, msg), request_id)
            except VMMemError as exc:
                conn.fail(exc, request_id)
            else:
                if msg.resume_vm_id and conn.vm is not None:
                    self.metrics.resumed_vms.inc()
                    log.info("vm_resumed", vm=msg.name, vm_id=conn.vm.vm_id)
                    self.kick(conn.vm)  # work may have waited for it
                    return
                self.metrics.registrations.inc()
                log.info(
                    "vm_registered",
                    vm=msg.name,
                    vm_id=conn.vm.vm_id if conn.vm else None,
                    guest_pages=msg.guest_pages,
                    vcpus=msg.vcpus,
                )
            return
        if isinstance(msg, Error):
            log.warning("peer_error", code=msg.code, error=msg.message)
            return
        vm = conn.vm
        if vm is None:
            conn.fail(RemoteProtocolError("register first", ErrorCode.NOT_REGISTERED), request_id)
            return
        self._handle(conn, vm, request_id, msg)

    def _handle(self, conn: PlatformConnection, vm: VM, request_id: int, msg: Message) -> None:
        """A registered VM's Fault, GetRequest or CompleteRequest."""
        try:
            if isinstance(msg, Fault):
                self.fault(conn, vm, request_id, msg.bpn, msg.write, msg.around)
            elif isinstance(msg, GetRequest):
                conn.send(self.engine.get_request(vm, self.rounds[vm.vm_id], msg), request_id)
            elif isinstance(msg, CompleteRequest):
                self.engine.complete(vm, self.rounds[vm.vm_id], msg)
            else:
                raise RemoteProtocolError(
                    f"{type(msg).__name__} is not a message the daemon accepts", ErrorCode.PROTOCOL
                )
        except VMMemError as exc:
            self._failed(conn, vm, request_id, exc)

    def fault(
        self, conn: PlatformConnection, vm: VM, request_id: int, bpn: int, write: bool, around: int
    ) -> None:
        """A registered VM's fault (the connection's fast path calls this with no message
        object): answered now when it can be, else from a task."""
        try:
            if bpn >= vm.guest_pages:
                raise RemoteProtocolError(
                    f"BPN {bpn} out of range 0..{vm.guest_pages - 1}", ErrorCode.BPN_OUT_OF_RANGE
                )
            t0 = time.perf_counter()
            vm.stats.faults += 1
            state = vm.p2m.state.item(bpn)
            # While memsched blocks allocations (LOW, until free memory is back above the hard
            # threshold) a first touch that needs a frame (a write) waits for reclaim; a read
            # maps the shared zero frame and needs none.
            if not (state == _ZERO and write and self.memsched.blocking):
                try:
                    if state == _ZERO and around <= 0:  # first touch of one page: most faults
                        reply = self.faults.first_touch_one(vm, bpn, write)
                    else:
                        reply = self._resolve_now(vm, bpn, write, around, state)
                except NeedsAsync:
                    pass
                else:
                    self._send_fault_reply(vm, request_id, reply, t0)
                    return
            if vm.outstanding_faults >= self.config.max_outstanding_faults:
                raise RemoteProtocolError(
                    f"more than {self.config.max_outstanding_faults} faults outstanding",
                    ErrorCode.TOO_MANY_FAULTS,
                )
            vm.outstanding_faults += 1
            self.spawn(self._fault_async(vm, request_id, Fault(bpn, write, around), t0))
        except VMMemError as exc:
            self._failed(conn, vm, request_id, exc)

    def _failed(self, conn: PlatformConnection, vm: VM, request_id: int, exc: VMMemError) -> None:
        if isinstance(exc, RemoteProtocolError):
            conn.fail(exc, request_id)
        else:
            # Our own limits (e.g. no memory right now): a clear error, the VM stays.
            log.warning("request_failed", vm=vm.name, error=str(exc), code=exc.code.name)
            conn.send_error(exc, request_id)

    async def _ctl(self, conn: PlatformConnection, request_id: int, msg: CtlRequest) -> None:
        try:
            result = await self.ctl.handle(msg.op, msg.args, conn)
        except (VMMemError, ValueError, OverflowError, TypeError) as exc:
            conn.send(CtlReply(ok=False, error=str(exc)), request_id)
        else:
            conn.send_frame(reply_frame(conn.codec, msg.op, result, request_id))

    # ---- faults -----------------------------------------------------------------------------

    def _resolve_now(self, vm: VM, bpn: int, write: bool, around: int, state: int) -> FaultReply:
        if state == _ZERO:  # first touch with fault-around (``fault`` took the one-page case)
            return self.faults.first_touch(vm, bpn, write, around)
        if state == _IN_FLIGHT:
            reply = self.services[vm.p2m.op[bpn]].on_fault(vm, bpn, write)
            if isinstance(reply, FaultReply):
                return reply
            raise NeedsAsync
        if state == _SWAPPED:
            reply = self.services_swap().try_swap_in_now(vm, bpn, around)
            if reply is None:
                raise NeedsAsync
            return reply
        return self.faults.try_resolve(vm, bpn, write, around)

    async def _fault_async(self, vm: VM, request_id: int, msg: Fault, t0: float) -> None:
        try:
            reply = await self._resolve_waiting(vm, msg)
        except VMMemError as exc:
            if vm.alive:  # a VM that left: its waiting faults are counted in vm_released
                self.fault_failed_log.record(vm.name, vm=vm.name, bpn=msg.bpn, error=str(exc))
            vm.connection.send(Error(code=int(exc.code), message=str(exc)), request_id)
        else:
            if vm.alive:
                self._send_fault_reply(vm, request_id, reply, t0)
        finally:
            vm.outstanding_faults -= 1

    async def _resolve_waiting(self, vm: VM, msg: Fault) -> FaultReply:
        """Swap-in, or wait (bounded, counted) for reclaim to free a frame."""
        deadline = time.monotonic() + self.config.low_wait_seconds
        waited = False
        while True:
            if not vm.alive:
                raise VMMemError("VM is gone")
            state = int(vm.p2m.state[msg.bpn])
            if state == _SWAPPED:
                swapped_in: FaultReply | None = await self.services_swap().swap_in(
                    vm, msg.bpn, msg.around
                )
                if swapped_in is not None:
                    return swapped_in
                continue  # another fault read it: look at the page again
            if state == _IN_FLIGHT:
                outcome = self.services[vm.p2m.op[msg.bpn]].on_fault(vm, msg.bpn, msg.write)
                if isinstance(outcome, FaultReply):
                    return outcome
                awaited: FaultReply = await outcome
                return awaited
            low = self.memsched.blocking and state == _ZERO and msg.write
            if not low or time.monotonic() >= deadline:
                try:
                    reply = self.faults.try_resolve(vm, msg.bpn, msg.write, msg.around)
                except NeedsAsync:
                    if time.monotonic() >= deadline:
                        self.metrics.low_waits.labels("failed").inc()
                        raise VMMemError(
                            f"no free frame after waiting {self.config.low_wait_seconds}s",
                            ErrorCode.OUT_OF_MEMORY,
                        ) from None
                else:
                    if waited:
                        self.metrics.low_waits.labels("served").inc()
                    return reply
            if not waited:
                waited = True
                vm.stats.low_waits += 1
                self.memsched.tick(time.monotonic())
            await self.waits.freed_or_timeout()

    def _cancel_in_flight(self, vm: VM, bpns: npt.NDArray[np.int64]) -> None:
        """End the operations in flight on ``bpns`` as a write fault would: each owning
        service gives the page back, exposed with its frame (every ``on_fault`` of a page in
        flight answers at once). The reply that fault would get is not sent."""
        for bpn in bpns.tolist():
            if vm.p2m.state[bpn] == _IN_FLIGHT:
                self.services[vm.p2m.op[bpn]].on_fault(vm, bpn, True)

    def retire_frame(self, mpn: int, again: bool = False) -> dict[str, Any]:
        """Mark ``mpn`` failing: take it out of use, moving whatever page it holds (``again``:
        it is marked already, by a crashed daemon; its page is moved off it anew)."""
        result = self.retirement.retire(mpn, again)
        if self.machine.zero_frame != self.state.header.zero_frames:  # a zero frame moved
            self.state.header.zero_frames = list(self.machine.zero_frame)
            self.state.write_header()
        return result

    def _send_fault_reply(self, vm: VM, request_id: int, reply: FaultReply, t0: float) -> None:
        self.metrics.faults.observe(reply.reason, time.perf_counter() - t0)
        vm.fault_reasons[reply.reason] += 1
        if reply.count > 1:
            self.metrics.fault_around_pages.inc(reply.count - 1)
        vm.connection.send(reply, request_id)

    # ---- hooks ------------------------------------------------------------------------------

    def services_swap(self) -> SwapService:
        svc = self.services.get(ServiceType.SWAP)
        if not isinstance(svc, SwapService):
            raise VMMemError("page is swapped but no swap service is configured")
        return svc

    def free_state(self) -> FreeState:
        return self.memsched.state

    def on_vm_registered(self, vm: VM) -> None:
        self.rounds[vm.vm_id] = RoundState()

    def on_vm_gone(self, vm: VM, reason: ReleaseReason = ReleaseReason.CLOSED) -> None:
        """Release everything the VM held: frames, swap slots, queues."""
        for svc in self.services.values():
            svc.on_vm_gone(vm)
        p2m = vm.p2m
        frames = p2m.private_frames()
        self.machine.release_or_retire(frames)
        shared = p2m.frame[(p2m.flags & FLAG_SHARED) != 0]
        self.shared.unref(shared[self.shared.refs[shared] > 0])  # zero frames are not counted
        self.shared.origin[self.shared.origin == vm.vm_id] = -1  # its frames live on, unowned
        self.memsched.on_vm_gone(vm)
        if self.swap is not None:
            self.swap.release(p2m.swap_slot[p2m.swap_slot >= 0])
        p2m.frame[:] = NO_FRAME
        p2m.swap_slot[:] = -1
        self.rounds.pop(vm.vm_id, None)
        self.waits.freed.set()
        self.metrics.disconnects.inc()
        log.info(
            "vm_released",
            vm=vm.name,
            reason=reason.value,
            frames=len(frames),
            waiting_faults=vm.outstanding_faults,
        )

    def connection_lost(self, conn: PlatformConnection) -> None:
        self.connections.discard(conn)
        if conn.vm is not None:
            self.registry.unregister(conn.vm, conn.release_reason())

    def kick(self, vm: VM) -> None:
        """Action-driven half of the high-priority loop: tell the agent work is pending.

        Low-priority bits are refreshed too, but only high-priority work is worth a message:
        the agent's 10 Hz low-priority rounds read the word themselves.
        """
        word = self.engine.refresh_pending(vm)
        if word & HIGH_PRIORITY_MASK:
            vm.connection.send(Kick(word))

    def _record_low_round(self, vm: VM, closed: LowRoundClosed) -> None:
        self.metrics.lowprio_rounds.labels(closed.end.value).inc()
        for service, pages in closed.deferred.items():
            self.metrics.lowprio_deferred.labels(service.name.lower()).inc(pages)

    def _record_low_work(self, service: ServiceType, pages: int, seconds: float) -> None:
        name = service.name.lower()
        self.metrics.lowprio_pages.labels(name).inc(pages)
        self.metrics.lowprio_work_seconds.labels(name).inc(seconds)

    def _record_batch(self, service: Any, seconds: float, status: np.ndarray) -> None:
        name = service.name.lower()
        self.metrics.batch_seconds.labels(name).observe(seconds)
        counts = np.bincount(status, minlength=len(PageStatus))
        for st in PageStatus:
            if counts[st]:
                self.metrics.batch_pages.labels(name, st.name.lower()).inc(int(counts[st]))
