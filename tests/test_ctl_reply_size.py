"""A control reply too large for one frame (1 MiB) gets a clear error at once, on both
daemons, and the connection goes on working; the agent's rounds come a page at a time.

Before, the encoder's error escaped the reply task: the client waited out its timeout (the
all-six benchmark's ``lowprio`` op, 4096 rounds with their steps, waited 120 s)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.codec import DEFAULT_MAX_FRAME
from shared.errors import ErrorCode, VMMemError
from tests.test_services_swap import FakeAgent, running_platform
from vmm_agent.agent import _seconds_arg
from vmm_agent.control import ControlConnection
from vmm_agent.rpc import PeerError, RpcClient

pytestmark = pytest.mark.timeout(60)

HUGE = {"blob": "x" * (DEFAULT_MAX_FRAME + 1)}


async def test_the_agent_answers_a_reply_too_large_with_an_error(short_tmp: Path) -> None:
    async def handler(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "huge":
            return HUGE
        if op == "small":
            return {"fine": True}
        if op == "odd":
            return {"what": object()}  # no JSON for it
        raise VMMemError(f"unknown op {op!r}")

    tasks: set[asyncio.Task[Any]] = set()
    path = str(short_tmp / "ctl.sock")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: ControlConnection(handler, tasks), path
    )
    try:
        client = await RpcClient.connect(path)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="huge: reply too large"):
            await client.ctl("huge", timeout=10.0)
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(PeerError, match="odd: reply not encodable"):
            await client.ctl("odd", timeout=10.0)
        assert await client.ctl("small", timeout=10.0) == {"fine": True}
        client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_platform_answers_a_reply_too_large_with_an_error(
    short_tmp: Path, mem_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        handle = server.ctl.handle

        async def with_huge(op: str, args: dict[str, Any], conn: Any) -> dict[str, Any]:
            if op == "status" and args.get("huge"):
                return HUGE
            if op == "status" and args.get("odd"):
                return {"what": object()}
            return await handle(op, args, conn)

        monkeypatch.setattr(server.ctl, "handle", with_huge)
        agent = await FakeAgent.connect(server, "vm1", guest_pages=64)
        await agent.write_pages(np.arange(8))
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="status: reply too large"):
            await agent.link.ctl("status", huge=True, timeout=10.0)
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(PeerError, match="status: reply not encodable"):
            await agent.link.ctl("status", odd=True, timeout=10.0)
        assert (await agent.barrier())["vms"][0]["name"] == "vm1"
        await agent.verify(np.arange(8))
        await agent.close()


@pytest.mark.parametrize("bad", [True, "5", 10**400, float("nan"), float("inf"), -float("inf")])
def test_a_seconds_argument_must_be_a_finite_number(bad: Any) -> None:
    """The agent's ``after``: a JSON integer too large for a float, NaN and the infinities
    pass JSON decoding; each is a BAD_REQUEST, not a silent default nor an unanswered op."""
    with pytest.raises(VMMemError) as info:
        _seconds_arg("after", bad)
    assert info.value.code == ErrorCode.BAD_REQUEST and "after" in str(info.value)
    assert _seconds_arg("after", 3) == 3.0 and _seconds_arg("after", 2.5) == 2.5
