"""Operator commands served on the daemon socket (``vmmem-ctl``, ``vmmem-load``)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.constants import PAGE_SIZE, FaultReason, ServiceType
from shared.errors import ErrorCode, VMMemError
from shared.sizes import parse_size

from . import invariants
from .agent_probe import read_exposures
from .footprint import footprint
from .hugepages_status import hugepages_host, hugepages_status
from .services.numa_migration import NumaMigrationService, locality
from .services.page_sharing import PageSharingService
from .services.sampling import SamplingService
from .services.validation import ValidationService
from .shared_frames import frames_saved_by, merged_pages

if TYPE_CHECKING:
    from .connection import PlatformConnection
    from .server import PlatformServer
    from .vm import VM

log = structlog.get_logger("vmmem.platform.ctl")
#: Looks at an agent's exposures before a mismatch counts: the first may have caught a fault
#: reply or a batch on the wire; a VMM that really maps a frame it does not own still does.
EXPOSURE_ATTEMPTS = 3
EXPOSURE_RETRY_SECONDS = 0.05


class _Args(BaseModel):
    """Arguments of one op, validated strictly: an integer argument takes an integer, never
    ``"5"``, ``5.0`` or ``true`` (``retire {"mpn": true}`` once retired frame 1); a number of
    seconds takes an integer or a float, never a string or a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NoArgs(_Args):
    """Ops that take no argument refuse any, rather than ignore a misspelled one."""


class StatusArgs(_Args):
    #: Counters only: no figure that scans a VM's p2m or the allocator beyond the page
    #: states (sharing, NUMA locality, 2 MB coverage, per-node counts). A full status of a
    #: 256 MiB guest costs the daemon ~1.4 ms; pollers (benchmarks at 100 Hz) take this one.
    brief: bool = False


class RetireArgs(_Args):
    mpn: int | None = Field(default=None, ge=0)
    #: Pick a random frame that backs a guest page (failure injection by the load generator).
    random_used: bool = False
    seed: int | None = None


class HostLimitArgs(_Args):
    size: str | int


class LowPrioArgs(_Args):
    """Run-time settings of the low-priority services (each optional)."""

    sample_period: float | None = Field(default=None, gt=0, le=86400)
    sample_pages: int | None = Field(default=None, ge=1, le=1 << 20)
    share_scan_period: float | None = Field(default=None, gt=0, le=86400)
    numa_migrate_rate: float | None = Field(default=None, ge=0, le=1 << 24)
    numa_host_migrate_rate: float | None = Field(default=None, ge=0, le=1 << 24)


class MemschedArgs(_Args):
    """Run-time settings of memsched's balance (each optional)."""

    balloon: bool | None = None
    idle_tax: float | None = Field(default=None, ge=0, lt=1)
    balloon_max_fraction: float | None = Field(default=None, ge=0, le=1)
    balance_period: float | None = Field(default=None, gt=0, le=3600)


class FailpointArgs(_Args):
    """Failure injection for tests and experiments (not part of normal operation)."""

    #: ``swap_write_error``: the next swap write fails with errno ``value`` (default EIO).
    #: ``swap_write_delay``: every swap write first sleeps ``value`` seconds (0 turns it off).
    name: Literal["swap_write_error", "swap_write_delay"]
    value: float = 0


class CheckArgs(_Args):
    #: Also ask every agent what it maps and compare with the p2m (off: the daemon's state only).
    exposures: bool = True


def _first_error(exc: ValidationError) -> str:
    """``mpn: Input should be a valid integer``: the first bad argument and what is wrong.

    A union argument (``size``: a string or an integer) fails once per member, each error
    located at (argument, member): they are joined under the argument's name.
    """
    errors = exc.errors()
    loc = errors[0].get("loc", ())
    if not loc:
        return str(errors[0]["msg"])
    name = loc[0]
    msgs = dict.fromkeys(str(e["msg"]) for e in errors if e.get("loc", ())[:1] == (name,))
    return f"{name}: {'; '.join(msgs)}"


class CtlOps:
    """Each ``op_*`` method answers one CtlRequest op with a JSON-able dict."""

    def __init__(self, server: PlatformServer) -> None:
        self.server = server

    async def handle(
        self, op: str, args: dict[str, Any], conn: PlatformConnection | None = None
    ) -> dict[str, Any]:
        """Answer ``op``; ``conn`` is the connection it came on (for ``goodbye``)."""
        if op == "goodbye":
            return self.goodbye(conn)
        fn = getattr(self, f"op_{op.replace('-', '_')}", None)
        if fn is None:
            raise VMMemError(f"unknown op {op!r}", ErrorCode.BAD_REQUEST)
        try:
            result = fn(args)
            if inspect.isawaitable(result):
                result = await result
        except ValidationError as exc:
            raise VMMemError(f"{op}: {_first_error(exc)}", ErrorCode.BAD_REQUEST) from None
        return dict(result)

    def goodbye(self, conn: PlatformConnection | None) -> dict[str, Any]:
        """A VM's agent is about to close its connection on purpose: its release is logged
        as ``closed``, where a connection that just ends means the agent died."""
        if conn is None or conn.vm is None:
            raise VMMemError(
                "goodbye is for a registered VM's own connection", ErrorCode.BAD_REQUEST
            )
        conn.goodbye = True
        return {"vm": conn.vm.name}

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """VMs with their pages by state; host frames free/used/retired (``brief``: the
        counters only, ``_brief``)."""
        if StatusArgs.model_validate(args).brief:
            return self._brief()
        s = self.server
        alloc = s.machine.allocator
        swap = s.swap
        return {
            "pid": __import__("os").getpid(),
            "uptime_seconds": round(time.time() - s.started, 3),
            "host": {
                **self._host_counters(),
                "page_size": PAGE_SIZE,
                "retired": alloc.retired,
                "min_limit_pages": s.memsched.minimum_limit(),
                "nodes": [
                    {"node": i, "first_mpn": a, "last_mpn": b - 1, **counts}
                    for i, ((a, b), counts) in enumerate(
                        zip(alloc.node_bounds, alloc.counts_by_node(), strict=True)
                    )
                ],
            },
            "swap": None
            if swap is None
            else {
                "path": str(swap.path),
                "slots": swap.slots,
                "used": swap.used,
                "free": swap.free,
                "full": s.memsched.swap_full(),
            },
            "sharing": self._host_sharing(),
            "hugepages": hugepages_host(self.server),
            "memsched": {
                **s.memsched.settings(),
                "reclaiming": s.memsched.reclaiming,
                "blocking": s.memsched.blocking,
                "thresholds": dict(
                    zip(("high", "soft", "hard", "low"), s.memsched.thresholds(), strict=True)
                ),
            },
            "lowprio": {
                "sample_period_seconds": self._sampling.period,
                "sample_pages": self._sampling.sample_pages,
                "share_scan_period_seconds": self._sharing.scan_period,
                "numa_migrate_rate": self._numa.vm_rate,
                "numa_host_migrate_rate": self._numa.host_rate,
            },
            "vms": [self._vm(vm) for vm in s.vms.values()],
        }

    def _brief(self) -> dict[str, Any]:
        """What a poller follows: host frames and free state, swap use, and per VM its page
        states, stats, memsched figures and sampling estimate; nothing else is computed."""
        swap = self.server.swap
        return {
            "brief": True,
            "host": self._host_counters(),
            "swap": None if swap is None else {"slots": swap.slots, "used": swap.used},
            "vms": [self._vm_counters(vm) for vm in self.server.vms.values()],
        }

    def _host_counters(self) -> dict[str, Any]:
        """The host figures both statuses carry (no scan)."""
        s = self.server
        return {
            "pages": s.machine.host_pages,
            "free": s.machine.allocator.free,
            "used": s.machine.allocator.used,
            "limit_pages": s.machine.limit_pages,
            "available": s.machine.available(),
            "free_state": s.free_state().name.lower(),
        }

    def _vm_counters(self, vm: Any) -> dict[str, Any]:
        """The VM figures both statuses carry: page states (one pass), the rest counters."""
        return {
            "vm_id": vm.vm_id,
            "name": vm.name,
            "guest_pages": vm.guest_pages,
            "pages": vm.p2m.counts(),
            "pending": vm.region.pending,
            "memsched": self.server.memsched.status(vm),
            "stats": vars(vm.stats).copy(),
            "sampling": self._sampling.status(vm),
        }

    def _vm(self, vm: Any) -> dict[str, Any]:
        return {
            **self._vm_counters(vm),
            "vcpus": vm.info.vcpus,
            "home_node": vm.home_node,
            "pid": vm.info.pid,
            "control_socket": vm.info.control_socket,
            "metrics_port": vm.info.metrics_port,
            "swap_target_pages": self.server.memsched.swap_targets.get(vm.vm_id, 0),
            "faults_by_reason": {r.name.lower(): vm.fault_reasons[r] for r in FaultReason},
            "sharing": {
                "shared_pages": merged_pages(vm.p2m),
                "frames_saved": frames_saved_by(vm.p2m, vm.vm_id, self.server.shared),
                "cow_breaks": vm.stats.cow_breaks,
                "scanned_pages": vm.stats.sharing_scanned,
                "scan_rate_pages_per_second": round(self._sharing.scan_rate(vm), 1),
                "merges": vm.stats.pages_merged,
                "aborted": vm.stats.sharing_aborted,
            },
            "lowprio": self._lowprio(vm),
            "numa": self._vm_numa(vm),
            "readahead": self._validation.readahead.status(vm),
            "hugepages": hugepages_status(self.server, vm),
        }

    def _vm_numa(self, vm: Any) -> dict[str, Any]:
        """Pages on and off the home node, and what NUMA migration did for the VM."""
        local, remote = locality(vm, self.server.machine.allocator)
        st = self._numa.stats(vm)
        validation = self.server.services.get(ServiceType.VALIDATION)
        return {
            "home_node": vm.home_node,
            "local_pages": local,
            "remote_pages": remote,
            "local_fraction": round(local / (local + remote), 4) if local + remote else None,
            "migrated_pages": st.migrated,
            "queued_pages": self._numa.queued(vm),
            "fault_completions": st.fault_completions,
            "aborted": st.aborted,
            "refused": st.refused,
            "validated_pages": getattr(validation, "validated", {}).get(vm.vm_id, 0),
        }

    def _host_sharing(self) -> dict[str, Any]:
        vms = list(self.server.vms.values())
        shared = [merged_pages(vm.p2m) for vm in vms]
        return {
            "merged_frames": self.server.shared.frames,
            "shared_pages": sum(shared),
            "frames_saved": sum(shared) - self.server.shared.frames,
            "cow_breaks": sum(vm.stats.cow_breaks for vm in vms),
            "scan_rate_pages_per_second": round(sum(self._sharing.scan_rate(vm) for vm in vms), 1),
        }

    def _lowprio(self, vm: Any) -> dict[str, Any]:
        state = self.server.rounds.get(vm.vm_id)
        if state is None:
            return {}
        low = state.low
        return {
            "rounds": {end.value: n for end, n in low.rounds.items()},
            "types": {
                service.name.lower(): {
                    "served_pages": st.served_pages,
                    "deferred_pages": st.deferred,
                    "cost_per_page_seconds": low.cost(service).per_unit,
                    "cost_fixed_seconds": low.cost(service).fixed,
                }
                for service, st in low.types.items()
            },
            "exchange_seconds": low.exchange,
        }

    @property
    def _sampling(self) -> SamplingService:
        svc = self.server.services[ServiceType.SAMPLING]
        assert isinstance(svc, SamplingService)
        return svc

    @property
    def _numa(self) -> NumaMigrationService:
        svc = self.server.services[ServiceType.NUMA_MIGRATION]
        assert isinstance(svc, NumaMigrationService)
        return svc

    @property
    def _validation(self) -> ValidationService:
        svc = self.server.services[ServiceType.VALIDATION]
        assert isinstance(svc, ValidationService)
        return svc

    @property
    def _sharing(self) -> PageSharingService:
        svc = self.server.services[ServiceType.PAGE_SHARING]
        assert isinstance(svc, PageSharingService)
        return svc

    def op_footprint(self, args: dict[str, Any]) -> dict[str, Any]:
        """Metadata bytes per VM and per guest page, and for the host (``footprint.py``)."""
        NoArgs.model_validate(args)
        return footprint(self.server)

    def op_set_lowprio(self, args: dict[str, Any]) -> dict[str, Any]:
        """Change the sampling period and size, the sharing scan period or NUMA migration's
        rates, at run time."""
        parsed = LowPrioArgs.model_validate(args)
        self._sampling.configure(parsed.sample_period, parsed.sample_pages)
        self._sharing.configure(parsed.share_scan_period)
        self._numa.configure(parsed.numa_migrate_rate, parsed.numa_host_migrate_rate)
        log.info("lowprio_configured", **parsed.model_dump(exclude_none=True))
        return {
            "sample_period": self._sampling.period,
            "sample_pages": self._sampling.sample_pages,
            "share_scan_period": self._sharing.scan_period,
            "numa_migrate_rate": self._numa.vm_rate,
            "numa_host_migrate_rate": self._numa.host_rate,
        }

    def op_set_memsched(self, args: dict[str, Any]) -> dict[str, Any]:
        """Turn ballooning on or off, change the idle tax, the balloon cap or the period."""
        parsed = MemschedArgs.model_validate(args)
        changes = parsed.model_dump(exclude_none=True)
        memsched = self.server.memsched
        memsched.configure(**changes)
        log.info("memsched_configured", **changes)
        return memsched.settings()

    def op_sampling(self, args: dict[str, Any]) -> dict[str, Any]:
        """Each VM's finished sampling periods: sample id, times, counts and the estimate."""
        NoArgs.model_validate(args)
        return {vm.name: self._sampling.history(vm) for vm in self.server.vms.values()}

    def op_lowprio_trace(self, args: dict[str, Any]) -> dict[str, Any]:
        """Each VM's last low-priority batches, predicted and measured (``rounds.py``)."""
        NoArgs.model_validate(args)
        return {
            vm.name: list(state.low_trace)
            for vm in self.server.vms.values()
            if (state := self.server.rounds.get(vm.vm_id)) is not None
        }

    def op_list_vms(self, args: dict[str, Any]) -> dict[str, Any]:
        NoArgs.model_validate(args)
        return {
            "vms": [
                {
                    "name": vm.name,
                    "control_socket": vm.info.control_socket,
                    "pid": vm.info.pid,
                    "metrics_port": vm.info.metrics_port,
                }
                for vm in self.server.vms.values()
            ]
        }

    def op_retire(self, args: dict[str, Any]) -> dict[str, Any]:
        """Mark a frame failing; its page (if any) moves to a healthy frame."""
        parsed = RetireArgs.model_validate(args)
        if parsed.random_used:
            owned = np.flatnonzero(self.server.machine.owner_vm >= 0)
            if len(owned) == 0:
                raise VMMemError("no frame backs a guest page", ErrorCode.BAD_REQUEST)
            rng = np.random.default_rng(parsed.seed)
            return self.server.retire_frame(int(rng.choice(owned)))
        if parsed.mpn is None:
            raise VMMemError("retire needs mpn or random_used", ErrorCode.BAD_REQUEST)
        return self.server.retire_frame(parsed.mpn)

    def op_set_host_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Change the memory VMs may use at run time."""
        parsed = HostLimitArgs.model_validate(args)
        try:
            pages = parse_size(parsed.size) // PAGE_SIZE
        except ValueError as exc:
            raise VMMemError(str(exc), ErrorCode.BAD_REQUEST) from None
        s = self.server
        previous = s.machine.limit_pages
        try:
            s.memsched.set_host_limit(pages)
        except VMMemError as exc:
            log.warning("host_limit_rejected", requested_pages=pages, error=str(exc))
            raise
        s.memsched.tick(time.monotonic())
        state = s.free_state().name.lower()
        log.info("host_limit_set", limit_pages=pages, previous_pages=previous, free_state=state)
        return {"limit_pages": s.machine.limit_pages, "free_state": state}

    async def op_check(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check the invariants (``invariants.py``), each agent's exposures included; the
        result lists every violation by name (``ok`` is false when there is any)."""
        parsed = CheckArgs.model_validate(args)
        s = self.server
        t0 = time.perf_counter()
        violations = invariants.check(invariants.HostState.of(s))
        checked: list[str] = []
        skipped: dict[str, str] = {}
        if parsed.exposures:
            # Recovered VMs whose agents are not back yet have nobody to ask.
            vms = [vm for vm in s.vms.values() if not getattr(vm, "detached", False)]
            found = await asyncio.gather(*(self._check_agent(vm) for vm in vms))
            for vm, (agent_violations, why) in zip(vms, found, strict=True):
                if why is None:
                    checked.append(vm.name)
                    violations += agent_violations
                else:
                    skipped[vm.name] = why
        seconds = time.perf_counter() - t0
        for v in violations:
            log.error("invariant_violated", name=v.name, count=v.count, detail=v.detail)
        log.info(
            "invariants_checked",
            violations=len(violations),
            agents=len(checked),
            skipped=len(skipped),
            seconds=round(seconds, 4),
        )
        return {
            "ok": not violations,
            "violations": [v.to_dict() for v in violations],
            "agents_checked": checked,
            "agents_skipped": skipped,
            "seconds": round(seconds, 4),
        }

    async def _check_agent(self, vm: VM) -> tuple[list[invariants.Violation], str | None]:
        """One agent's exposures against its p2m: the violations, or why it was skipped.

        A mapping counts only if it breaks the rules at every one of EXPOSURE_ATTEMPTS looks
        (same page, same frame), each against the p2m both before and after the question: a
        fault reply or a batch crossing one question does not cross all of them, while a VMM
        that really maps a frame it does not own still does.
        """
        path = vm.info.control_socket
        if not path:
            return [], "registered without a control socket"
        persistent: set[tuple[int, int]] | None = None
        for attempt in range(EXPOSURE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(EXPOSURE_RETRY_SECONDS)
            earlier = invariants.P2MView.of(vm.p2m)
            try:
                exposures = await read_exposures(path, vm.guest_pages)
            except (VMMemError, OSError) as exc:
                return [], f"agent unreachable: {exc}"
            if not vm.alive:
                return [], "left during the check"
            state = invariants.HostState.of(self.server)
            bad = invariants.foreign_mappings(state, vm.vm_id, exposures, earlier)
            found = set(zip(bad.tolist(), exposures.frame[bad].tolist(), strict=True))
            persistent = found if persistent is None else persistent & found
            if not persistent:
                return [], None
        assert persistent is not None
        bpns = np.array(sorted(b for b, _ in persistent), dtype=np.int64)
        return [invariants.exposure_violation(state, vm.vm_id, exposures, bpns, vm.name)], None

    def op_failpoint(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arm a failure-injection point (see FailpointArgs)."""
        parsed = FailpointArgs.model_validate(args)
        swap = self.server.swap
        if swap is None:
            raise VMMemError("no swap file configured", ErrorCode.BAD_REQUEST)
        if parsed.name == "swap_write_error":
            swap.fail_next_write = int(parsed.value) or 5
        else:
            swap.write_delay = max(0.0, parsed.value)
        # Failure injection changes what the daemon does: an operator reading the log sees it.
        log.warning("failpoint_armed", name=parsed.name, value=parsed.value)
        return {"armed": parsed.name, "value": parsed.value}
