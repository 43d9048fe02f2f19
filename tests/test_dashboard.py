"""The Grafana dashboard ``deploy/grafana/vmmem.json`` graphs metrics that exist.

A real platform daemon (with a swap file) and a real agent run with their exporters on; the
test scrapes both ``/metrics`` endpoints and checks that every ``vmmem_*`` name in every
PromQL expression of the dashboard (panels and template variables) is one they export. A
histogram family ``x`` exports ``x_bucket``, ``x_sum`` and ``x_count``; a counter ``x``
exports ``x_total``: the names PromQL sees.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import procs

DASHBOARD = procs.ROOT / "deploy" / "grafana" / "vmmem.json"
METRIC = re.compile(r"\bvmmem_[A-Za-z0-9_:]+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets' ``expr`` and variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            # A variable's "query" is PromQL too, except the data source variable's type.
            promql = key == "expr" or (key in ("query", "definition") and "(" in str(value))
            if promql and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def exported_names(port: int) -> set[str]:
    """The series names one exporter declares (``# TYPE``), as PromQL names them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def logged_port(log: Path, event: str) -> int:
    """The metrics port a daemon chose (``--metrics-port 0``), from its startup event."""
    for line in log.read_text().splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("event") == event:
            return int(record["metrics_port"])
    raise AssertionError(f"no {event} in {log}")


@pytest.mark.timeout(30)
def test_dashboard_metrics_exist(short_tmp: Path, mem_dir: Path) -> None:
    """Every metric the dashboard queries is exported by the daemon or an agent."""
    with procs.daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            *("--host-memory", "16MiB", "--numa-nodes", "1"),
            *("--swap-file", str(short_tmp / "swap"), "--swap-size", "4MiB"),
            metrics_port=0,
        )
        d.start_agent("vm1", memory="4MiB", metrics_port=0)
        exported = exported_names(logged_port(short_tmp / "platform.log", "platform_started"))
        exported |= exported_names(logged_port(short_tmp / "vm1.log", "vmm_started"))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(expressions(dashboard))
    assert len(exprs) > 20
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    # Each expression names at least one VMMem metric: no stray series slips by unchecked.
    assert all(METRIC.search(e) for e in exprs), [e for e in exprs if not METRIC.search(e)]


@pytest.mark.timeout(10)
def test_dashboard_covers_the_issue() -> None:
    """The panels issue 11 asks for are there: host state and frames, per-VM pages, fault
    latency heatmaps repeated per reason, swap throughput and errors, round timings."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    text = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for name in (
        "vmmem_host_free_state",
        "vmmem_host_memory_pages",
        'vmmem_vm_memory_pages{state="resident"',
        "vmmem_vm_swapped_pages",
        "vmmem_vm_shared_pages",
        "vmmem_vm_balloon_pages",
        "vmmem_swap_pages_total",
        "vmmem_swap_errors_total",
        "vmmem_platform_rounds_total",
        "vmmem_vmm_lowprio_round_seconds_bucket",
    ):
        assert name in text, name
    (heatmap,) = [p for p in panels if p["type"] == "heatmap"]
    assert heatmap["repeat"] == "reason"
    assert "vmmem_guest_fault_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["targets"][0]["format"] == "heatmap"
