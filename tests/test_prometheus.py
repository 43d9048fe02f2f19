"""Prometheus integration: the exporters pass ``promtool check metrics``, and a real
Prometheus server, run with ``deploy/prometheus.yml``, scrapes the demo layout.

Needs ``prometheus`` and ``promtool`` (Debian package ``prometheus``). Without them the
tests skip; with ``CI=true`` they fail instead, since CI installs them (``.ci/run``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import procs

CONFIG = procs.ROOT / "deploy" / "prometheus.yml"
#: The demo layout of deploy/prometheus.yml: one platform daemon and three agents.
PLATFORM_PORT = 9470
AGENT_PORTS = {"vm1": 9471, "vm2": 9472, "vm3": 9473}
EXPECTED_TARGETS = {("vmmem-platform", f"127.0.0.1:{PLATFORM_PORT}")} | {
    ("vmmem-vmm", f"127.0.0.1:{port}") for port in AGENT_PORTS.values()
}
HOST_PAGES = (256 << 20) // 4096
GUEST_PAGES = (16 << 20) // 4096
PHASE = {"duration": 1.5, "working_set": 0.5, "write_ratio": 0.5}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def skip_or_fail(reason: str) -> None:
    """Skip locally; in CI a missing prerequisite is an error, not a silent skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this is a failure)")
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        skip_or_fail(f"{name} is not installed (apt-get install prometheus)")
    assert path is not None
    return path


def port_is_free(port: int) -> bool:
    """Whether the metrics server could bind ``port`` (it sets SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name (with ``_total``, ``_bucket``...) -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def run_phase_and_wait(daemons: procs.Daemons, names: list[str], timeout: float = 20.0) -> None:
    for name in names:
        procs.run(procs.ctl(daemons.control_socket(name), "run_phase", phase=PHASE))
    deadline = time.monotonic() + timeout
    for name in names:
        while procs.run(procs.ctl(daemons.control_socket(name), "progress"))["running"]:
            assert time.monotonic() < deadline, f"{name}: phase still running after {timeout}s"
            time.sleep(0.1)


@contextmanager
def prometheus_server(binary: str, tmp: Path) -> Iterator[str]:
    """Run Prometheus on ``deploy/prometheus.yml``; yield its base URL; always stop it."""
    port = procs.free_port()
    log_path = tmp / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={CONFIG}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
        assert proc.poll() is None, f"prometheus exited early:\n{log_path.read_text()[-4000:]}"
    except BaseException:
        print(f"--- prometheus.log\n{log_path.read_text()[-4000:]}")
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(base: str, expr: str) -> list[dict[str, Any]] | None:
    """Instant query; the result vector, or None while the server is not answering yet."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    return list(body["data"]["result"])


def poll(base: str, expr: str, done: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Repeat ``expr`` until ``done(result)`` holds; fail with the last result after timeout."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, Any]] | None = None
    while time.monotonic() < deadline:
        result = query(base, expr)
        if result is not None and done(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{expr!r} not as expected after {timeout}s; last result: {result}")


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_prometheus_config_is_valid() -> None:
    """deploy/prometheus.yml passes ``promtool check config``."""
    promtool = require_binary("promtool")
    r = subprocess.run(
        [promtool, "check", "config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_exporters_pass_promtool_check_metrics(short_tmp: Path, mem_dir: Path) -> None:
    """After a workload phase, the platform's and an agent's /metrics pass
    ``promtool check metrics`` without lint problems and expose the key metric families
    with sane values (faults served, pages verified, no mismatches)."""
    promtool = require_binary("promtool")
    platform_port, agent_port = procs.free_port(), procs.free_port()
    with procs.daemons(short_tmp, mem_dir) as d:
        d.start_platform(metrics_port=platform_port)
        d.start_agent("vm1", metrics_port=agent_port)
        run_phase_and_wait(d, ["vm1"])
        texts = {"platform": scrape(platform_port), "agent": scrape(agent_port)}

    for who, text in texts.items():
        r = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0, f"{who}: promtool check metrics:\n{r.stdout}{r.stderr}"
        assert not (r.stdout + r.stderr).strip(), f"{who}: lint output:\n{r.stdout}{r.stderr}"

    plat = samples(texts["platform"])
    for name in (
        "vmmem_host_memory_pages",
        "vmmem_vm_memory_pages",
        "vmmem_platform_faults_total",
        "vmmem_platform_fault_service_seconds_bucket",
        "vmmem_platform_fault_service_seconds_count",
        "vmmem_registered_vms",
        "vmmem_vm_shared_pages",
        "vmmem_vm_cow_breaks_total",
        "vmmem_sharing_saved_pages",
        "vmmem_sharing_stable_pages",
        "vmmem_vm_sharing_saved_pages",
        "vmmem_vm_sharing_scan_rate_pages",
        "vmmem_wss_estimate_pages",
        "vmmem_platform_lowprio_rounds_total",
        "vmmem_lowprio_cost_per_page_seconds",
    ):
        assert name in plat, f"platform exporter lacks {name}"
    assert sum(v for _, v in plat["vmmem_host_memory_pages"]) == HOST_PAGES
    assert sum(v for _, v in plat["vmmem_vm_memory_pages"]) == GUEST_PAGES
    assert sum(v for _, v in plat["vmmem_platform_faults_total"]) > 0
    assert plat["vmmem_registered_vms"] == [({}, 1.0)]

    agent = samples(texts["agent"])
    for name in (
        "vmmem_guest_fault_latency_seconds_bucket",
        "vmmem_guest_pages_verified_total",
        "vmmem_guest_verify_mismatches_total",
        "vmmem_guest_faults_total",
        "vmmem_guest_accesses_total",
        "vmmem_vmm_lowprio_rounds_total",
        "vmmem_vmm_lowprio_round_seconds_bucket",
        "vmmem_vmm_lowprio_overrun_ratio_bucket",
        "vmmem_vmm_lowprio_progress_gap_seconds_bucket",
        "vmmem_vmm_lowprio_bound_seconds",
        "vmmem_vmm_sample_pages",
    ):
        assert name in agent, f"agent exporter lacks {name}"
    [(labels, verified)] = agent["vmmem_guest_pages_verified_total"]
    assert labels == {"vm": "vm1"} and verified > 0
    assert agent["vmmem_guest_verify_mismatches_total"] == [({"vm": "vm1"}, 0.0)]
    assert sum(v for _, v in agent["vmmem_guest_fault_latency_seconds_count"]) > 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_prometheus_scrapes_demo_layout(short_tmp: Path, mem_dir: Path) -> None:
    """A real Prometheus server on deploy/prometheus.yml finds the platform daemon and three
    agents on the demo ports (all ``up``), and during a workload stores the project metrics:
    pages verified > 0 and no mismatches for every VM, host pages adding up to host memory,
    VM pages adding up to guest memory, and a finite guest fault-latency quantile."""
    prometheus = require_binary("prometheus")
    busy = [p for p in (PLATFORM_PORT, *AGENT_PORTS.values()) if not port_is_free(p)]
    if busy:
        skip_or_fail(f"demo metrics ports {busy} are in use (is `make demo` running?)")

    with procs.daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "256MiB", metrics_port=PLATFORM_PORT)
        for name, port in AGENT_PORTS.items():
            d.start_agent(name, memory="16MiB", metrics_port=port)
        with prometheus_server(prometheus, short_tmp) as base:
            for name in AGENT_PORTS:
                procs.run(
                    procs.ctl(d.control_socket(name), "run_phase", phase={**PHASE, "duration": 4.0})
                )

            up = poll(
                base, "up", lambda res: len(res) == 4 and all(r["value"][1] == "1" for r in res)
            )
            assert {(r["metric"]["job"], r["metric"]["instance"]) for r in up} == EXPECTED_TARGETS

            verified = poll(
                base,
                "vmmem_guest_pages_verified_total > 0",
                lambda res: len(res) == len(AGENT_PORTS),
            )
            assert set(by_label(verified, "vm")) == set(AGENT_PORTS)
            for r in verified:
                assert r["metric"]["job"] == "vmmem-vmm"
                assert r["metric"]["instance"] == f"127.0.0.1:{AGENT_PORTS[r['metric']['vm']]}"

            mism = poll(
                base,
                "vmmem_guest_verify_mismatches_total",
                lambda res: len(res) == len(AGENT_PORTS),
            )
            assert by_label(mism, "vm") == dict.fromkeys(AGENT_PORTS, 0.0)

            host = poll(base, "sum(vmmem_host_memory_pages)", lambda res: len(res) == 1)
            assert float(host[0]["value"][1]) == HOST_PAGES
            used = poll(
                base, 'sum(vmmem_host_memory_pages{state="used"})', lambda res: len(res) == 1
            )
            assert 0 < float(used[0]["value"][1]) < HOST_PAGES

            vm_pages = poll(
                base,
                "sum by (vm) (vmmem_vm_memory_pages)",
                lambda res: len(res) == len(AGENT_PORTS),
            )
            assert by_label(vm_pages, "vm") == dict.fromkeys(AGENT_PORTS, float(GUEST_PAGES))

            registered = poll(base, "vmmem_registered_vms", lambda res: len(res) == 1)
            assert float(registered[0]["value"][1]) == len(AGENT_PORTS)

            faults = poll(base, "sum(vmmem_platform_faults_total)", lambda res: len(res) == 1)
            assert float(faults[0]["value"][1]) > 0

            p99 = poll(
                base,
                "histogram_quantile(0.99, sum by (le) (vmmem_guest_fault_latency_seconds_bucket))",
                lambda res: len(res) == 1,
            )
            latency = float(p99[0]["value"][1])
            assert math.isfinite(latency) and 0 < latency <= 5.0, latency
