"""The VMM agent: startup → main loop → shutdown for one VM.

Startup connects to the daemon, registers, maps machine memory and the control region,
opens the control socket and the metrics endpoint. The main loop runs the high-priority
rounds and whatever phases the load generator starts. Shutdown stops the vCPUs, closes the
sockets and removes the control socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import ValidationError

from shared.config import AgentConfig
from shared.constants import HIGH_PRIORITY_MASK, PAGE_SIZE
from shared.errors import ErrorCode, VMMemError
from shared.exposures import exposures_chunk
from shared.layout import ControlRegion
from shared.messages import Kick, Message, Register, Registered
from shared.sd_notify import Notifier
from shared.shm import MappedFile, frames_view, open_mapped
from shared.sockets import allowed_peers_only, check_socket_path, listen_private
from shared.workload import Phase

from .balloon import BalloonDriver
from .batches import BatchProcessor
from .control import ControlConnection
from .exposure import ExposureTable
from .fault_path import FaultPath
from .footprint import footprint
from .guest import GuestMemory
from .guest_os import GuestOS
from .guest_time import GuestGate, GuestProgress
from .link import PlatformLink
from .lowprio import LowPriorityLoop, RoundRecord
from .metrics import AgentMetrics, GuestCollector
from .monitor import MonitorQueue
from .page_check import PageChecker
from .resume import PlatformWatch
from .rounds import HighPriorityLoop
from .rpc import ConnectionClosed, RpcClient
from .runner import WorkloadRunner
from .sampler import Sampler
from .touches import TouchLog

log = structlog.get_logger("vmmem.vmm")
#: Faults this agent keeps on the wire at most (fewer if the daemon says so).
MAX_OUTSTANDING_FAULTS = 64


def _seconds_arg(name: str, value: Any) -> float:
    """A ctl argument that is a finite number of seconds (a JSON integer may be too large
    for a float; NaN and infinities pass JSON decoding): else a clear BAD_REQUEST."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise VMMemError(f"{name}: a number of seconds", ErrorCode.BAD_REQUEST)
    try:
        seconds = float(value)
    except OverflowError:
        raise VMMemError(f"{name}: out of range", ErrorCode.BAD_REQUEST) from None
    if not math.isfinite(seconds):
        raise VMMemError(f"{name}: a finite number of seconds", ErrorCode.BAD_REQUEST)
    return seconds


class Agent:
    """One VMM agent process."""

    def __init__(self, config: AgentConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics_registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.metrics_registry, config.name)
        self.metrics_registry.register(GuestCollector(weakref.ref(self)))
        self.exposure = ExposureTable(config.guest_pages)
        self.guest = GuestMemory(hash(config.name) & 0xFFFFFFFF ^ config.seed, config.guest_pages)
        self.guest_os = GuestOS(config.guest_pages)
        self.should_exit = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.exit_code = 0
        #: Why the agent stopped on its own (printed by the CLI), if it did.
        self.exit_message = ""
        self.metrics_port: int | None = None

    async def serve(self) -> int:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return self.exit_code

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        self._http = None
        if cfg.metrics_port >= 0:
            self._http, _ = start_http_server(
                cfg.metrics_port, addr="127.0.0.1", registry=self.metrics_registry
            )
            self.metrics_port = self._http.server_port
        self.link = PlatformLink()
        client = await RpcClient.connect(str(cfg.socket), on_message=self._on_message)
        try:
            reg: Registered = await client.request(self.register_message(), timeout=10)
        except BaseException:
            client.close()
            raise
        self.link.attach(client)
        self.registered = reg
        self.machine: MappedFile = open_mapped(
            Path(reg.machine_memory_path), reg.host_pages * PAGE_SIZE
        )
        self.frames = frames_view(self.machine)
        self.region_file = open_mapped(Path(reg.control_region_path))
        self.region = ControlRegion(self.region_file.mm)
        if self.region.vm_id != reg.vm_id or self.region.generation != reg.generation:
            raise VMMemError("control region does not belong to this VM", ErrorCode.PROTOCOL)
        self.touches = TouchLog(cfg.guest_pages)
        self.sampler = Sampler(self.exposure, self.region, self.touches)
        outstanding = min(MAX_OUTSTANDING_FAULTS, reg.max_outstanding_faults)
        self.faults = FaultPath(self.link, self.exposure, outstanding, around=16)
        self.guest_progress = GuestProgress(time.monotonic)
        self.balloon = BalloonDriver(
            self.guest_os,
            self.exposure,
            self.guest,
            self.faults.may_map,  # not only the pages faulted on: their fault-around too
            self.region,
            self.guest_progress,
            cfg.balloon_rate,
            cfg.balloon_deflate_rate,
            cfg.balloon_max_fraction,
        )
        self.batches = BatchProcessor(
            self.link, self.region, self.exposure, self.sampler, self.balloon
        )
        self.batches.on_batch.append(self._observe_batch)
        self.rounds = HighPriorityLoop(self.link, self.region, self.batches, cfg.poll_interval)
        self.faults.on_fault_done.append(self.metrics.observe_fault)
        self.faults.on_fault_done.append(lambda _reason, _seconds: self.rounds.poll())
        self.faults.on_watched_touch = self.sampler.touch
        self.gate = GuestGate()
        # After sampling's arming, in the talk's order: page checking is the least urgent.
        self.page_check = PageChecker(
            self.frames,
            self.exposure,
            self.guest,
            self.guest_os,
            self.faults.pending,
            cfg.page_check_rate,
            bound=lambda: self.lowprio.bound,  # at most a share of it per tick
        )
        self.monitor = MonitorQueue([self.sampler, self.page_check], time.monotonic)
        self.lowprio = LowPriorityLoop(
            self.link,
            self.region,
            self.batches,
            self.monitor,
            self.rounds,
            self.gate,
            self.guest_progress,
            cfg.latency_sensitivity,
        )
        self.lowprio.on_round.append(self._observe_low_round)
        self.lowprio.on_tick.append(self.balloon.tick)
        self.runner = WorkloadRunner(
            cfg.vcpus,
            cfg.seed,
            self.frames,
            self.exposure,
            self.faults,
            self.guest,
            self.gate,
            self.guest_progress,
            self.touches,
            self.guest_os,
        )
        self.balloon.frozen = lambda: self.runner.verifying
        ctl_path = cfg.control_socket_path
        check_socket_path(ctl_path)  # another user's path is refused, never removed
        ctl_path.unlink(missing_ok=True)
        self._control = await loop.create_unix_server(
            allowed_peers_only(
                lambda: ControlConnection(self.handle_ctl, self.tasks), log, socket=str(ctl_path)
            ),
            sock=listen_private(ctl_path),  # 0600 from the moment it exists
        )
        self.watch = PlatformWatch(self)
        self._spawn(self.watch.run())
        self._spawn(self._rounds_forever(self.rounds.run))
        self._spawn(self._rounds_forever(self.lowprio.run))
        log.info(
            "vmm_started",
            vm=cfg.name,
            vm_id=reg.vm_id,
            guest_pages=cfg.guest_pages,
            home_node=reg.home_node,
            control_socket=str(ctl_path),
            metrics_port=self.metrics_port,
        )
        # systemd (vmmem-vmm@.service, Type=notify): ready once registered and serving.
        Notifier.from_env().notify("READY=1", f"STATUS=VM {cfg.name} registered")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def register_message(self, resume: bool = False) -> Register:
        """Who this VM is; when ``resume``, also the VM the daemon that took over knows."""
        cfg = self.config
        return Register(
            name=cfg.name,
            guest_pages=cfg.guest_pages,
            vcpus=cfg.vcpus,
            latency_sensitivity=cfg.latency_sensitivity,
            home_node=cfg.home_node,
            shares=cfg.shares,
            control_socket=str(cfg.control_socket_path),
            metrics_port=self.metrics_port or 0,
            pid=os.getpid(),
            balloon_driver=cfg.balloon_max_fraction > 0,
            resume_vm_id=self.registered.vm_id if resume else 0,
            resume_generation=self.registered.generation if resume else 0,
        )

    async def _rounds_forever(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a round loop; when the daemon goes away, start it again once one is back."""
        while True:
            try:
                await run()
            except ConnectionClosed:
                await self.link.wait_up()  # PlatformWatch resumes the link, or stops the agent
            except VMMemError as exc:
                log.error("rounds_failed", error=str(exc))
                self.exit_code = 1
                self.request_stop()
                return

    def _observe_batch(self, service: str, seconds: float, counts: np.ndarray) -> None:
        from shared.constants import PageStatus

        self.metrics.batch_seconds.labels(self.config.name, service).observe(seconds)
        for st in PageStatus:
            if counts[st]:
                self.metrics.batch_pages.labels(self.config.name, service, st.name.lower()).inc(
                    int(counts[st])
                )

    def _observe_low_round(self, record: RoundRecord) -> None:
        self.metrics.observe_low_round(record)

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Kick):
            if msg.pending & HIGH_PRIORITY_MASK:
                self.rounds.kick()
        else:
            log.warning("unexpected_message", type=type(msg).__name__)

    def request_stop(self) -> None:
        self.should_exit = True
        self._stop.set()

    async def main_loop(self) -> None:
        """Until asked to stop, or PlatformWatch gives up on the daemon."""
        await self._stop.wait()

    async def shutdown(self) -> None:
        log.info("vmm_stopping", vm=self.config.name)
        Notifier.from_env().notify("STOPPING=1")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.runner.halt(), 5.0)
        self._control.close()
        for task in list(self.tasks):
            task.cancel()
        # A goodbye first, so the daemon logs this VM as closed, not killed.
        with contextlib.suppress(VMMemError, OSError, TimeoutError):
            await self.link.ctl("goodbye", timeout=1.0)
        self.link.close()
        self.config.control_socket_path.unlink(missing_ok=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        log.info(
            "vmm_stopped",
            vm=self.config.name,
            pages_verified=self.guest.verified,
            mismatches=self.guest.mismatches,
        )

    # ---- control operations -----------------------------------------------------------------

    async def handle_ctl(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "run_phase":
            try:
                phase = Phase.model_validate(args.get("phase", {}))
            except ValidationError as exc:
                raise VMMemError(f"invalid phase: {exc.errors()[0]['msg']}") from None
            await self.runner.start(phase)
            return {"started": phase.name}
        if op == "halt":
            await self.runner.halt()
            return {"halted": True}
        if op == "progress":
            return self.progress()
        if op == "verify":
            return await self.runner.verify()
        if op == "results":
            return self.results()
        if op == "lowprio":  # the summary, and a page of the recent rounds
            after = args.get("after")
            since = float("-inf") if after is None else _seconds_arg("after", after)
            rounds, more = self.lowprio.rounds(since)
            return {**self.lowprio.summary(), "rounds": rounds, "more": more}
        if op == "footprint":  # metadata bytes per guest page (benchmarks/scale.py)
            return footprint(self)
        if op == "exposures":  # for the daemon's invariant check (vmmem-ctl check)
            return exposures_chunk(self.exposure, self.faults.pending, args)
        if op == "set_latency_sensitivity":
            value = args.get("value")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise VMMemError("value must be an integer >= 0", ErrorCode.BAD_REQUEST)
            self.lowprio.latency_sensitivity = value
            log.info("latency_sensitivity_set", vm=self.config.name, value=value)
            return {"latency_sensitivity": value, "bound_seconds": self.lowprio.bound}
        if op == "set_page_check_rate":
            rate = args.get("rate")
            if not isinstance(rate, (int, float)) or isinstance(rate, bool):
                raise VMMemError("rate must be a number >= 0", ErrorCode.BAD_REQUEST)
            try:
                self.page_check.set_rate(float(rate))
            except ValueError as exc:
                raise VMMemError(str(exc), ErrorCode.BAD_REQUEST) from None
            log.info("page_check_rate_set", vm=self.config.name, rate=self.page_check.rate)
            return {"page_check_rate": self.page_check.rate}
        raise VMMemError(f"unknown op {op!r}", ErrorCode.BAD_REQUEST)

    def progress(self) -> dict[str, Any]:
        r = self.runner
        return {
            "vm": self.config.name,
            "running": r.running,
            "phase": r.phase.name if r.phase else None,
            "reads": r.reads(),
            "writes": r.writes(),
            "faults": self.faults.faults,
            "touched": r.touched_count(),
            "exposed": self.exposure.exposed_count(),
            "mismatches": self.guest.mismatches,
            "throughput": r.phase_throughput(),
            "balloon_pages": self.guest_os.balloon_size,
            "refaults": self.guest_os.refaults,
            "pages_checked": self.page_check.checked,
            "page_check_mismatches": self.page_check.mismatches,
        }

    def results(self) -> dict[str, Any]:
        r = self.runner
        return {
            **self.progress(),
            "guest_pages": self.config.guest_pages,
            "vcpus": self.config.vcpus,
            "pages_written": int(np.count_nonzero(self.guest.version)),
            "fault_errors": sum(c.fault_errors for c in r.cpus),
            "faults_by_reason": dict(self.faults.by_reason),
            "pages_mapped_by_faults": self.faults.pages_mapped,
            "fault_latency_seconds": self.faults.latency_quantiles(),
            "verification": self.guest.summary(),
            "rounds": self.rounds.rounds,
            "batches": dict(self.batches.batches),
            "batch_pages": {f"{s}/{st}": n for (s, st), n in self.batches.pages.items()},
            "released_while_pinned": dict(self.batches.released_while_pinned),
            "soft_faults": self.faults.soft_faults,
            "content": self.guest.content_profile(),
            "sampling": {
                **self.sampler.status(),
                "truth": {str(k): v for k, v in self.sampler.truth.items()},
                "truth_windows": {str(k): list(w) for k, w in self.sampler.truth_windows.items()},
            },
            "lowprio": self.lowprio.summary(),
            "pin_cycles": r.pin_cycles,
            "pin_violations": r.pin_violations,
            "guest_os": self.guest_os.summary(),
            "balloon": self.balloon.summary(),
            "phase_throughput": [*r.phase_history, *([r.phase_throughput()] if r.running else [])],
            "mismatch_log": self.guest.mismatch_log[:10],
            "page_check": self.page_check.summary(),
        }
