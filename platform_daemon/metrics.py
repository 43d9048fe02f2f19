"""Prometheus metrics of the platform daemon, on their own registry (tests use a fresh one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.constants import FaultReason, ServiceType

from .fault_metrics import FaultMetrics

if TYPE_CHECKING:
    from .server import PlatformServer

#: Buckets from 10 µs to 1 s: a fault is ~100 µs across CPUs, a swap-in a few ms.
LATENCY_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
)


class PlatformMetrics:
    """Counters and histograms updated on the daemon's paths."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Plain numbers on the fault path, exported at scrape time (see fault_metrics.py).
        self.faults = FaultMetrics([r.name.lower() for r in FaultReason], LATENCY_BUCKETS)
        registry.register(self.faults)
        self.fault_around_pages = Counter(
            "vmmem_platform_fault_around_pages",
            "Neighbour pages mapped by fault-around",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "vmmem_platform_protocol_errors",
            "Peers disconnected for protocol errors",
            ["code"],
            registry=registry,
        )
        self.registrations = Counter(
            "vmmem_platform_registrations", "VM registrations accepted", registry=registry
        )
        self.disconnects = Counter(
            "vmmem_platform_vm_disconnects",
            "VMs gone, with all their memory released",
            registry=registry,
        )
        self.balloon_reclaimed = Counter(
            "vmmem_balloon_reclaimed_pages",
            "Pages the guests' balloons gave back to the host (their frames and slots freed)",
            registry=registry,
        )
        self.recovered_vms = Counter(
            "vmmem_platform_recovered_vms",
            "VMs taken over from a crashed daemon's state files at startup",
            registry=registry,
        )
        self.resumed_vms = Counter(
            "vmmem_platform_resumed_vms",
            "VMs taken over after a crash whose agents came back and carried on",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "vmmem_platform_batch_seconds",
            "Platform time per batch: selection at GetRequest plus completion",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_pages = Counter(
            "vmmem_platform_batch_pages",
            "Pages offered in batches, by service and outcome",
            ["service", "outcome"],
            registry=registry,
        )
        self.rounds = Counter(
            "vmmem_platform_rounds", "Rounds of request handling", ["priority"], registry=registry
        )
        self.swap_pages = Counter(
            "vmmem_swap_pages",
            "Pages moved through the swap file",
            ["direction"],
            registry=registry,
        )
        self.swap_cancelled = Counter(
            "vmmem_swap_cancelled_pages",
            "Swap-outs cancelled by a fault on the page",
            registry=registry,
        )
        self.swap_errors = Counter(
            "vmmem_swap_errors",
            "Swap-out pages left resident by an error",
            ["reason"],
            registry=registry,
        )
        self.swap_io_seconds = Histogram(
            "vmmem_swap_io_seconds",
            "Duration of one batched swap-file write or read",
            ["direction"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retired = Counter(
            "vmmem_retired_frames", "Frames retired as failing", ["was"], registry=registry
        )
        self.p2m_stale_seconds = Histogram(
            "vmmem_p2m_stale_mapping_seconds",
            "How long a stale mapping kept an old frame alive before the VMM dropped it",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.low_waits = Counter(
            "vmmem_low_memory_waits",
            "First-touch faults that waited for reclaim",
            ["outcome"],
            registry=registry,
        )
        self.lowprio_rounds = Counter(
            "vmmem_platform_lowprio_rounds",
            "Low-priority rounds, by how they ended (done, bound, preempted, no_slot, left)",
            ["end"],
            registry=registry,
        )
        self.lowprio_pages = Counter(
            "vmmem_lowprio_work_pages",
            "Pages handed out in low-priority batches, by service",
            ["service"],
            registry=registry,
        )
        self.lowprio_work_seconds = Counter(
            "vmmem_lowprio_work_seconds",
            "Time spent on low-priority work (daemon and VMM), by service",
            ["service"],
            registry=registry,
        )
        self.lowprio_deferred = Counter(
            "vmmem_lowprio_deferred_pages",
            "Units of low-priority work a round's time bound left for a later round",
            ["service"],
            registry=registry,
        )
        self.sampled_pages = Counter(
            "vmmem_sampling_pages",
            "Pages handed to monitors as working-set samples",
            registry=registry,
        )
        self.sampling_periods = Counter(
            "vmmem_sampling_periods",
            "Working-set sampling periods ended, measured or missed (monitor never armed them)",
            ["outcome"],
            registry=registry,
        )
        self.sharing_scanned = Counter(
            "vmmem_sharing_scanned_pages",
            "Pages hashed by the page-sharing scan",
            registry=registry,
        )
        self.sharing_scan_seconds = Counter(
            "vmmem_sharing_scan_seconds",
            "Time the page-sharing scanner spent hashing and classifying pages",
            registry=registry,
        )
        self.sharing_merges = Counter(
            "vmmem_sharing_merged_pages",
            "Pages the sharing merge looked at, by outcome (zero, shared, new, unchanged)",
            ["outcome"],
            registry=registry,
        )
        self.sharing_aborted = Counter(
            "vmmem_sharing_aborted_pages",
            "Merges cancelled by a guest write to the page while it was in flight",
            registry=registry,
        )
        self.numa_migrated = Counter(
            "vmmem_numa_migrated_pages",
            "Pages NUMA migration moved to their VM's home node",
            registry=registry,
        )
        self.hugepage_splits = Counter(
            "vmmem_hugepage_splits",
            "Large (2 MB) regions split because a release service took one of their pages",
            ["service"],
            registry=registry,
        )
        self.hugepage_promoted = Counter(
            "vmmem_hugepage_promoted_pages",
            "Pages 2M promotion copied into a whole 2 MiB run (512 per region)",
            registry=registry,
        )
        self.defrag_moved = Counter(
            "vmmem_defrag_moved_pages",
            "Pages 2M defrag moved out of a run it was emptying",
            registry=registry,
        )
        self.defrag_runs = Counter(
            "vmmem_defrag_runs",
            "Runs 2M defrag isolated, by outcome (freed: the whole run is free; aborted)",
            ["outcome"],
            registry=registry,
        )
        self.validated = Counter(
            "vmmem_validated_pages",
            "Pages of remap validation batches, by outcome (mapped by the VMM, or not)",
            ["outcome"],
            registry=registry,
        )
        self.readahead_pages = Counter(
            "vmmem_readahead_pages",
            "Swap read-ahead pages: held (read ahead, slot kept), then fault_avoided (touched "
            "with no fault), frame_recovered (dropped untouched, back in their slot), kept "
            "(pinned), or faulted (given back by a fault while held)",
            ["outcome"],
            registry=registry,
        )


class StateCollector(Collector):
    """Gauges read from the daemon's arrays at scrape time (a scan per scrape, not per round)."""

    def __init__(self, server_ref: Callable[[], PlatformServer | None]) -> None:
        self._server_ref = server_ref

    def collect(self) -> Iterator[Metric]:
        server = self._server_ref()
        if server is None:
            return
        host = GaugeMetricFamily(
            "vmmem_host_memory_pages",
            "Host frames by NUMA node and state",
            labels=["node", "state"],
        )
        for node, counts in enumerate(server.machine.allocator.counts_by_node()):
            for state, n in counts.items():
                host.add_metric([str(node), state], n)
        yield host
        vms = GaugeMetricFamily(
            "vmmem_vm_memory_pages",
            "Guest pages of each VM by platform state",
            labels=["vm", "state"],
        )
        for vm in list(server.vms.values()):
            for state, n in vm.p2m.counts().items():
                vms.add_metric([vm.name, state], n)
        yield vms
        yield from _memsched_metrics(server)
        yield GaugeMetricFamily(
            "vmmem_registered_vms", "VMs registered with the daemon", value=len(server.vms)
        )
        yield GaugeMetricFamily(
            "vmmem_host_free_state",
            "Host free-memory state: 0 high, 1 soft, 2 hard, 3 low",
            value=int(server.free_state()),
        )
        p2m_update = server.services.get(ServiceType.P2M_UPDATE)
        if p2m_update is not None:
            yield GaugeMetricFamily(
                "vmmem_p2m_stale_frames",
                "Old frames still kept alive by stale VMM mappings",
                value=p2m_update.stale_frames(),  # type: ignore[attr-defined]
            )
            now = time.monotonic()
            yield GaugeMetricFamily(
                "vmmem_p2m_oldest_stale_seconds",
                "Age of the oldest stale mapping still waiting for its VMM",
                value=max(
                    (p2m_update.oldest_age(vm, now) for vm in list(server.vms.values())),  # type: ignore[attr-defined]
                    default=0.0,
                ),
            )
        yield from _lowprio_families(server)
        yield from _numa_families(server)
        from .hugepages_status import hugepage_families  # (it imports the services)

        yield from hugepage_families(server)
        swap = server.swap
        if swap is not None:
            yield GaugeMetricFamily(
                "vmmem_swap_slots_used_pages", "Swap slots holding a page", value=swap.used
            )
            yield GaugeMetricFamily(
                "vmmem_swap_size_pages", "Swap slots in the swap file", value=swap.slots
            )
            yield GaugeMetricFamily(
                "vmmem_swap_full",
                "1 while the swap device is full (no free slot, or no space left on the "
                "device after the last write): memsched does not count on swap meanwhile",
                value=int(server.memsched.swap_full() is not None),
            )


def _lowprio_families(server: PlatformServer) -> Iterator[Metric]:
    """Per-VM working-set estimates, page sharing and low-priority cost models; host sharing.

    A scan of each VM's p2m flags per scrape, like the page-state gauges above: scrape time,
    never a round's.
    """
    from .services.page_sharing import PageSharingService
    from .services.sampling import SamplingService
    from .shared_frames import frames_saved_by, merged_pages

    vms = list(server.vms.values())
    sampling = server.services.get(ServiceType.SAMPLING)
    sharing = server.services.get(ServiceType.PAGE_SHARING)
    wss = GaugeMetricFamily(
        "vmmem_wss_estimate_pages",
        "Working-set estimate from sampling (max of slow, fast and current), in pages",
        labels=["vm"],
    )
    shared = GaugeMetricFamily(
        "vmmem_vm_shared_pages", "Pages of the VM that page sharing merged", labels=["vm"]
    )
    saved = GaugeMetricFamily(
        "vmmem_vm_sharing_saved_pages",
        "Frames the VM saves by sharing: its merged pages less the merged frames that were its",
        labels=["vm"],
    )
    rate = GaugeMetricFamily(
        "vmmem_vm_sharing_scan_rate_pages",
        "Pages of the VM the sharing scan hashed per second lately",
        labels=["vm"],
    )
    cow = CounterMetricFamily(
        "vmmem_vm_cow_breaks", "Writes that broke a merge (copy-on-write)", labels=["vm"]
    )
    scanned = CounterMetricFamily(
        "vmmem_vm_sharing_scanned_pages",
        "Pages of the VM hashed by the sharing scan",
        labels=["vm"],
    )
    cost = GaugeMetricFamily(
        "vmmem_lowprio_cost_per_page_seconds",
        "Fitted work per page handed out, per VM and low-priority type",
        labels=["vm", "service"],
    )
    total_merged = 0
    for vm in vms:
        if isinstance(sampling, SamplingService):
            fraction = sampling.estimate_fraction(vm)
            if fraction is not None:
                wss.add_metric([vm.name], fraction * vm.guest_pages)
        merged = merged_pages(vm.p2m)
        total_merged += merged
        shared.add_metric([vm.name], merged)
        saved.add_metric([vm.name], frames_saved_by(vm.p2m, vm.vm_id, server.shared))
        if isinstance(sharing, PageSharingService):
            rate.add_metric([vm.name], sharing.scan_rate(vm))
        cow.add_metric([vm.name], vm.stats.cow_breaks)
        scanned.add_metric([vm.name], vm.stats.sharing_scanned)
        state = server.rounds.get(vm.vm_id)
        if state is not None:
            for service, model in list(state.low.costs.items()):
                cost.add_metric([vm.name, service.name.lower()], model.per_unit)
    yield from (wss, shared, saved, rate, cow, scanned, cost)
    yield GaugeMetricFamily(
        "vmmem_sharing_stable_pages",
        "Frames page sharing merged pages into (KSM's pages_shared)",
        value=server.shared.frames,
    )
    yield GaugeMetricFamily(
        "vmmem_sharing_saved_pages",
        "Frames page sharing saves host-wide (merged pages less the frames they share)",
        value=total_merged - server.shared.frames,
    )


def _memsched_metrics(server: PlatformServer) -> Iterator[Metric]:
    """memsched's figures per VM, as ``vmmem-ctl status`` shows them."""
    gauges = {
        "rho": GaugeMetricFamily(
            "vmmem_vm_memsched_rho",
            "Shares per page, idle pages taxed (ESX'02's rho)",
            labels=["vm"],
        ),
        "target_pages": GaugeMetricFamily(
            "vmmem_vm_memsched_target_pages",
            "Memory memsched aims for the VM to hold",
            labels=["vm"],
        ),
        "balloon_pages": GaugeMetricFamily(
            "vmmem_vm_balloon_pages", "Pages the VM's balloon holds", labels=["vm"]
        ),
        "balloon_target": GaugeMetricFamily(
            "vmmem_vm_balloon_target_pages", "The VM's balloon target", labels=["vm"]
        ),
        "swapped_pages": GaugeMetricFamily(
            "vmmem_vm_swapped_pages", "Pages of the VM in swap", labels=["vm"]
        ),
        "backed_off": GaugeMetricFamily(
            "vmmem_vm_balloon_backed_off",
            "1 while the VM's balloon backs off because of guest impact",
            labels=["vm"],
        ),
        "balloon_stalled": GaugeMetricFamily(
            "vmmem_vm_balloon_stalled",
            "1 while swap takes the share of a balloon that did not inflate",
            labels=["vm"],
        ),
    }
    refaults = CounterMetricFamily(
        "vmmem_vm_guest_refaults", "Page-cache refaults of the guest", labels=["vm"]
    )
    stall = CounterMetricFamily(
        "vmmem_vm_guest_stall_seconds", "Time the guest was stalled", labels=["vm"]
    )
    for vm in list(server.vms.values()):
        st = server.memsched.status(vm)
        for key, gauge in gauges.items():
            value = st[key]
            if value is not None:
                gauge.add_metric([vm.name], float(value))  # type: ignore[arg-type]
        refaults.add_metric([vm.name], float(st["refaults"]))  # type: ignore[arg-type]
        stall.add_metric([vm.name], float(st["stall_seconds"]))  # type: ignore[arg-type]
    yield from gauges.values()
    yield refaults
    yield stall


def _numa_families(server: PlatformServer) -> Iterator[Metric]:
    """Per VM: pages on and off the home node (a scan of the p2m per scrape), pages moved."""
    from .services.numa_migration import NumaMigrationService, locality

    numa = server.services.get(ServiceType.NUMA_MIGRATION)
    local = GaugeMetricFamily(
        "vmmem_vm_local_pages", "Pages of the VM on a private frame of its home node", labels=["vm"]
    )
    remote = GaugeMetricFamily(
        "vmmem_vm_remote_pages", "Pages of the VM on a private frame of another node", labels=["vm"]
    )
    migrated = CounterMetricFamily(
        "vmmem_vm_numa_migrated_pages", "Pages of the VM NUMA migration moved home", labels=["vm"]
    )
    for vm in list(server.vms.values()):
        on, off = locality(vm, server.machine.allocator)
        local.add_metric([vm.name], on)
        remote.add_metric([vm.name], off)
        if isinstance(numa, NumaMigrationService):
            migrated.add_metric([vm.name], numa.stats(vm).migrated)
    yield from (local, remote, migrated)
