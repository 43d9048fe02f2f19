"""``vmmem-ctl check`` against a real in-process daemon (issue 7, section 4).

The daemon asks each agent what it maps through the agent's control socket. The scripted
fake agent of ``test_services_swap.py`` gets a control socket here that answers
``exposures`` from its own exposure table, exactly as ``vmm_agent/agent.py`` does; breaking
that table, or the daemon's state, makes ``check`` name the violation and the command exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from platform_daemon import ctl as ctl_cli
from platform_daemon.allocator import FrameState
from shared.errors import VMMemError
from shared.exposures import exposures_chunk
from tests.test_services_swap import FakeAgent, reclaim, running_platform
from vmm_agent.control import ControlConnection

pytestmark = pytest.mark.timeout(60)


class _FakeTable:
    """The fake agent's exposure table, as ``exposures_chunk`` reads it."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.guest_pages = agent.guest_pages

    def mapped_frame(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        frames: npt.NDArray[np.int64] = self.agent.frame[idx]
        return frames

    def mapped_writable(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        writable: npt.NDArray[np.bool_] = self.agent.writable[idx]
        return writable


@contextlib.asynccontextmanager
async def control_socket(
    path: Path, agent_ref: list[FakeAgent], answers: list[int] | None = None
) -> AsyncIterator[None]:
    """Serve ``exposures`` for the fake agent at ``path`` (registered before the agent);
    each answer is counted in ``answers``."""
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op != "exposures":
            raise VMMemError(f"unknown op {op!r}")
        if answers is not None:
            answers.append(len(answers))
        return exposures_chunk(_FakeTable(agent_ref[0]), set(), args)

    server = await asyncio.get_running_loop().create_unix_server(
        lambda: ControlConnection(handle, tasks), str(path)
    )
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()


async def test_check_compares_each_agents_mappings_with_the_p2m(
    short_tmp: Path, mem_dir: Path
) -> None:
    """With pages written, read (zero frame) and swapped, the check passes and names the
    agent it asked; an agent that maps another VM's frame is named, with the page; a VM
    registered without a control socket is reported as not checked."""
    path = short_tmp / "a.ctl"
    ref: list[FakeAgent] = []
    async with (
        running_platform(short_tmp, mem_dir, host_mib=16) as server,
        control_socket(path, ref),
    ):
        agent = await FakeAgent.connect(server, "a", guest_pages=512, control_socket=str(path))
        ref.append(agent)
        other = await FakeAgent.connect(server, "b", guest_pages=64)
        await agent.write_pages(np.arange(300))
        await agent.fault(400, write=False, around=8)
        await other.write_pages(np.arange(8))
        server.memsched.set_host_limit(server.machine.allocator.used - 50)
        await reclaim(server, [agent], max_ticks=3)
        server.memsched.set_host_limit(server.machine.host_pages)

        result = await server.ctl.handle("check", {})
        assert result["ok"] and result["violations"] == []
        assert result["agents_checked"] == ["a"]
        assert "control socket" in result["agents_skipped"]["b"]

        agent.frame[450], agent.writable[450] = other.frame[3], True
        result = await server.ctl.handle("check", {})
        assert not result["ok"]
        (v,) = result["violations"]
        assert v["name"] == "vm_exposes_foreign_frame" and v["count"] == 1
        assert f"bpn 450 frame {other.frame[3]} rw" in v["detail"]
        assert (await server.ctl.handle("check", {"exposures": False}))["ok"]
        await agent.close()
        await other.close()


async def test_vmmem_ctl_check_exits_1_and_names_the_violation(
    short_tmp: Path, mem_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmmem-ctl check``: exit 0 and OK on a sound daemon; a free frame that still has an
    owner makes it print ``VIOLATION free_frame_owned`` and exit 1."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "a", guest_pages=64)
        await agent.write_pages(np.arange(16))
        argv = ["--socket", str(server.config.socket), "check"]
        assert await asyncio.to_thread(ctl_cli.main, argv) == 0
        assert "OK" in capsys.readouterr().out

        alloc, owner = server.machine.allocator, server.machine.owner_vm
        free = int(np.flatnonzero(alloc.frame_state == FrameState.FREE)[0])
        owner[free] = agent.vm_id
        assert await asyncio.to_thread(ctl_cli.main, argv) == 1
        lines = capsys.readouterr().out.splitlines()  # the daemon's own log lines too
        assert any(line.startswith("VIOLATION free_frame_owned (1): frames ") for line in lines)
        assert any(line.startswith("FAILED: 1 invariant(s) violated") for line in lines)
        owner[free] = -1
        await agent.close()


async def test_a_mismatch_that_does_not_last_is_not_a_violation(
    short_tmp: Path, mem_dir: Path
) -> None:
    """The first answer maps a page the p2m does not give it (as a reply crossing the
    question could make it); the next answers do not: no violation, and the agent was asked
    again. One that lasts is reported after the same number of looks."""
    path = short_tmp / "a.ctl"
    ref: list[FakeAgent] = []
    answers: list[int] = []
    async with (
        running_platform(short_tmp, mem_dir, host_mib=16) as server,
        control_socket(path, ref, answers),
    ):
        agent = await FakeAgent.connect(server, "a", guest_pages=64, control_socket=str(path))
        ref.append(agent)
        await agent.write_pages(np.arange(8))
        stray = int(np.flatnonzero(server.machine.allocator.frame_state == FrameState.FREE)[0])
        agent.frame[40] = stray
        real = agent.frame.copy()
        real[40] = -1
        # After the first answer the table is right again.
        original = _FakeTable.mapped_frame

        def once(self: _FakeTable, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            frames = original(self, idx)
            agent.frame[:] = real
            return frames

        _FakeTable.mapped_frame = once  # type: ignore[method-assign]
        try:
            result = await server.ctl.handle("check", {})
        finally:
            _FakeTable.mapped_frame = original  # type: ignore[method-assign]
        assert result["ok"], result["violations"]
        assert len(answers) == 2, "the mismatch was not looked at again"
        answers.clear()
        agent.frame[40] = stray
        result = await server.ctl.handle("check", {})
        assert [v["name"] for v in result["violations"]] == ["vm_exposes_foreign_frame"]
        assert len(answers) == 3
        agent.frame[40] = -1
        await agent.close()
