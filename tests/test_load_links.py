"""The load generator's link to an agent: a just registered agent opens its control socket
after it registered with the daemon, and the link waits for it rather than losing the VM."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from shared.sockets import listen_private
from vmm_agent.load import links
from vmm_agent.load.links import AgentLink, Clock, VmState


async def _serve_later(path: Path, delay: float, served: asyncio.Event) -> asyncio.AbstractServer:
    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # the connection is all this test looks at
        await writer.wait_closed()
        served.set()

    await asyncio.sleep(delay)
    return await asyncio.start_unix_server(hang_up, sock=listen_private(path))


@pytest.mark.timeout(20)
def test_link_waits_for_a_control_socket_that_opens_after_registration(tmp_path: Path) -> None:
    """The agent (this process, alive) opens its control socket 0.3 s after the link starts
    to connect: the link connects then and the VM stays in the run."""
    path = tmp_path / "a.ctl"

    async def main() -> AgentLink:
        link = AgentLink("a", str(path), os.getpid(), 5.0, Clock())
        served = asyncio.Event()
        server_task = asyncio.create_task(_serve_later(path, 0.3, served))
        await link.connect()
        server = await server_task
        link.close()
        await asyncio.wait_for(served.wait(), 5)
        server.close()
        await server.wait_closed()
        return link

    link = asyncio.run(main())
    assert link.active and link.reason == "", link.reason


@pytest.mark.timeout(20)
def test_link_gives_up_on_a_socket_that_never_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No socket within the bound: the VM is lost, with the reason; an agent process that has
    exited is given up on at once, not after the bound."""
    monkeypatch.setattr(links, "CONTROL_SOCKET_WAIT", 0.3)
    alive = AgentLink("a", str(tmp_path / "a.ctl"), os.getpid(), 5.0, Clock())
    t0 = time.monotonic()
    asyncio.run(alive.connect())
    assert 0.3 <= time.monotonic() - t0 < 5.0
    assert alive.state == VmState.LOST and "cannot connect to its control socket" in alive.reason

    monkeypatch.setattr(links, "CONTROL_SOCKET_WAIT", 30.0)
    exited = subprocess.Popen(["true"])
    exited.wait()
    gone = AgentLink("b", str(tmp_path / "b.ctl"), exited.pid, 5.0, Clock())
    t0 = time.monotonic()
    asyncio.run(gone.connect())
    assert time.monotonic() - t0 < 5.0
    assert gone.state == VmState.LOST and "has exited" in gone.reason, gone.reason
