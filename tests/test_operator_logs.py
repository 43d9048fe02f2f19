"""Logs an operator can use (issue 7, section 7).

- ``vm_released`` says why: closed (the agent said goodbye), killed (the connection just
  ended), protocol_error, shutdown.
- A VM that leaves with many faults waiting logs one line with their count, not one per fault.
- ``set_host_limit`` and failpoint changes are logged.

A real in-process daemon and the scripted fake agent of ``test_services_swap.py``; the log
events are captured with structlog's ``capture_logs``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from shared.constants import FreeState
from shared.messages import Fault
from tests.test_disconnect import garbage_header
from tests.test_services_swap import FakeAgent, running_platform, wait_until

pytestmark = pytest.mark.timeout(60)
Logs = list[MutableMapping[str, Any]]


def events(logs: Logs, name: str) -> Logs:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


async def test_vm_released_says_why(short_tmp: Path, mem_dir: Path, logs: Logs) -> None:
    """Four VMs leave four ways; each ``vm_released`` names its reason."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agents = {
            name: await FakeAgent.connect(server, name, guest_pages=64)
            for name in ("polite", "crashed", "rude", "last")
        }
        for agent in agents.values():
            await agent.write_pages(np.arange(4))
        assert await agents["polite"].link.ctl("goodbye") == {"vm": "polite"}
        await agents["polite"].close()
        await agents["crashed"].close()  # no goodbye: as if the process died
        agents["rude"].link.transport.write(garbage_header())  # type: ignore[union-attr]
        gone = {agents[n].vm_id for n in ("polite", "crashed", "rude")}
        await wait_until(lambda: not gone & set(server.vms), "three VMs to be released")
    # "last" is released by the daemon's shutdown.
    reasons = {e["vm"]: e["reason"] for e in events(logs, "vm_released")}
    assert reasons == {
        "polite": "closed",
        "crashed": "killed",
        "rude": "protocol_error",
        "last": "shutdown",
    }
    agents["rude"].unmap()
    agents["last"].unmap()


async def test_goodbye_from_a_connection_without_a_vm_is_refused(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Only a VM's own connection can announce its clean exit."""
    from vmm_agent.rpc import PeerError, RpcClient

    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        client = await RpcClient.connect(str(server.config.socket))
        with pytest.raises(PeerError, match="registered VM"):
            await client.ctl("goodbye")
        client.close()


async def test_disconnect_with_many_waiting_faults_logs_one_line_with_the_count(
    short_tmp: Path, mem_dir: Path, logs: Logs
) -> None:
    """Twenty write faults wait for memory in LOW when the VM goes: one ``vm_released`` with
    ``waiting_faults=20``, and no ``fault_failed`` line for any of them."""
    async with running_platform(short_tmp, mem_dir, host_mib=8, low_wait_seconds=30.0) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(1000))
        server.memsched.set_host_limit(server.machine.allocator.used)
        server.memsched.tick(time.monotonic())
        assert server.memsched.state == FreeState.LOW
        vm = server.vms[agent.vm_id]
        waiting = [agent.link.request_nowait(Fault(bpn, True, 0)) for bpn in range(1500, 1520)]
        await wait_until(lambda: vm.outstanding_faults == 20, "twenty faults to wait")
        await agent.close()
        await asyncio.gather(*waiting, return_exceptions=True)
        await wait_until(lambda: vm.outstanding_faults == 0, "the waiting faults to end")
    released = events(logs, "vm_released")
    assert [(e["vm"], e["reason"], e["waiting_faults"]) for e in released] == [
        ("vm1", "killed", 20)
    ]
    assert events(logs, "fault_failed") == []


async def test_host_limit_and_failpoint_changes_are_logged(
    short_tmp: Path, mem_dir: Path, logs: Logs
) -> None:
    """Each accepted limit is logged with the one before it; a refused one is logged as
    refused; arming a failpoint is logged with its value."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        host = server.machine.host_pages
        await server.ctl.handle("set_host_limit", {"size": "8MiB"})
        with pytest.raises(Exception, match="below"):
            await server.ctl.handle("set_host_limit", {"size": 0})
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 0.5})
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 0})
    (accepted,) = events(logs, "host_limit_set")
    assert (accepted["limit_pages"], accepted["previous_pages"]) == (2048, host)
    assert accepted["free_state"] == "high"
    (refused,) = events(logs, "host_limit_rejected")
    assert refused["requested_pages"] == 0 and "below" in refused["error"]
    armed = [(e["name"], e["value"]) for e in events(logs, "failpoint_armed")]
    assert armed == [("swap_write_delay", 0.5), ("swap_write_delay", 0)]
