"""2 MB pages in ``vmmem-ctl status`` and in metrics: coverage per VM, free runs per node,
what 2M promotion and 2M defrag did. Reads one flag per region and one count per run: for
status and scrapes, never a round's work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.constants import ServiceType

from .hugepages import coverage

if TYPE_CHECKING:
    from .server import PlatformServer
    from .vm import VM


def hugepages_status(server: PlatformServer, vm: VM) -> dict[str, Any]:
    """One VM: its large regions, coverage, splits and what promotion did for it."""
    from .services.promotion import PromotionService

    large, regions = coverage(vm.p2m)
    promo = server.services.get(ServiceType.PROMOTION_2M)
    st = promo.stats(vm) if isinstance(promo, PromotionService) else None
    return {
        "large_regions": large,
        "regions": regions,
        "coverage": round(large * 512 / vm.guest_pages, 4) if vm.guest_pages else 0.0,
        "splits": vm.stats.hugepage_splits,
        "promoted_regions": 0 if st is None else st.promoted,
        "promoted_in_place": 0 if st is None else st.in_place,
        "queued_regions": promo.queued(vm) if isinstance(promo, PromotionService) else 0,
        "aborted_regions": 0 if st is None else st.aborted,
        "refused_regions": 0 if st is None else st.refused,
        "fault_completions": 0 if st is None else st.fault_completions,
        "no_run": 0 if st is None else st.no_run,
        "copies_discarded": 0 if st is None else st.copies_discarded,
    }


def hugepages_host(server: PlatformServer) -> dict[str, Any]:
    """The host: free 2 MiB runs and fragmentation per node, and 2M defrag's work."""
    from .services.defrag import DefragService

    alloc = server.machine.allocator
    defrag = server.services.get(ServiceType.DEFRAG_2M)
    nodes = []
    for node in range(alloc.nodes):
        first, last = alloc.node_runs(node)
        entry: dict[str, Any] = {
            "node": node,
            "runs": max(0, last - first),
            "free_runs": alloc.free_runs(node),
        }
        if isinstance(defrag, DefragService):
            entry["fragmentation_score"] = defrag.fragmentation_score(node)
            iso = defrag.nodes[node].isolated
            entry["isolated_run"] = None if iso is None else iso.run
        nodes.append(entry)
    out: dict[str, Any] = {"enabled": getattr(defrag, "enabled", False), "nodes": nodes}
    if isinstance(defrag, DefragService):
        out["defrag"] = vars(defrag.stats).copy()
    return out


def host_hugepages_line(h: dict[str, Any]) -> str:
    nodes = ", ".join(
        f"node {n['node']} {n['free_runs']}/{n['runs']} free runs"
        + (f" (fragmentation {n['fragmentation_score']} %)" if "fragmentation_score" in n else "")
        for n in h["nodes"]
    )
    d = h.get("defrag", {})
    state = "on" if h.get("enabled") else "off"
    return (
        f"2 MB pages ({state}): {nodes}; defrag moved {d.get('moved', 0):,} pages, "
        f"freed {d.get('runs_freed', 0):,} runs, gave up {d.get('runs_aborted', 0):,}"
    )


def vm_hugepages_line(v: dict[str, Any]) -> str:
    return (
        f"2 MB pages: {v['large_regions']:,}/{v['regions']:,} regions large "
        f"(coverage {v['coverage']:.0%}), promoted {v['promoted_regions']:,}, "
        f"splits {v['splits']:,}, aborted {v['aborted_regions']:,}, "
        f"refused {v['refused_regions']:,}"
    )


def hugepage_families(server: PlatformServer) -> Iterator[Metric]:
    """Gauges: coverage per VM, free runs per node; counter: splits per VM."""
    cov = GaugeMetricFamily(
        "vmmem_vm_hugepage_coverage_ratio",
        "Fraction of the VM's guest memory in large (2 MB) regions",
        labels=["vm"],
    )
    splits = CounterMetricFamily(
        "vmmem_vm_hugepage_splits", "Large regions of the VM split by a release", labels=["vm"]
    )
    for vm in list(server.vms.values()):
        large, _ = coverage(vm.p2m)
        cov.add_metric([vm.name], large * 512 / vm.guest_pages if vm.guest_pages else 0.0)
        splits.add_metric([vm.name], vm.stats.hugepage_splits)
    runs = GaugeMetricFamily(
        "vmmem_host_free_2m_runs", "Whole free 2 MiB runs of frames per node", labels=["node"]
    )
    alloc = server.machine.allocator
    for node in range(alloc.nodes):
        runs.add_metric([str(node)], alloc.free_runs(node))
    yield from (cov, splits, runs)
