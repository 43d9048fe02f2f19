"""Surviving the platform daemon's death: stall the guest, reconnect, resume, carry on.

When the connection to the daemon drops without the agent asking for it, the agent:

1. stalls its vCPUs (the guest gate, held by "platform"): every vCPU stops at its next
   yield point, so the guest reads no page while no daemon vouches for its mapping;
2. reconnects to the same socket with bounded exponential backoff (50 ms doubling to 250 ms)
   for ``--reconnect-seconds``, and registers as the VM the daemon that took over knows:
   same id, name, size and pid, and the generation it was last given;
3. checks that the new daemon serves the same machine memory and control region files (it
   maps them already: a daemon with other files cannot carry this guest on);
4. attaches the new connection and lets the guest run. Faults that were on the wire are
   asked again (their pages are unmapped: a write fault drops a read-only mapping before it
   goes out, so a lost copy-on-write reply leaves nothing stale); the round loops start
   again.

When no daemon takes the VM back in time, or the one that answers does not know it (it
started fresh), the agent exits with a clear message and a non-zero status.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from shared.messages import Registered

from .rpc import ConnectionClosed, PeerError, RpcClient

if TYPE_CHECKING:
    from .agent import Agent

log = structlog.get_logger("vmmem.vmm.resume")
#: Reconnect attempts back off from 50 ms to 250 ms: a refused connect costs microseconds,
#: and a longer step would add up to its length to the guest's stall after a takeover.
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 0.25
#: A daemon must answer a resuming Register within this long.
REGISTER_TIMEOUT = 10.0
GATE_HOLDER = "platform"


class ResumeRefused(Exception):
    """A daemon answered, but cannot carry this VM on; the message says why."""


class PlatformWatch:
    """Watches the agent's link to the daemon and resumes it after a daemon crash."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.resumes = 0
        self.downtime_total = 0.0

    async def run(self) -> None:
        agent = self.agent
        client = agent.link.client
        while True:
            assert client is not None
            await asyncio.shield(agent.link.lost(client))
            if agent.should_exit:
                return
            if not await self.resume():
                return
            client = agent.link.client

    async def resume(self) -> bool:
        """Stall, reconnect, re-register; False when the agent must stop instead."""
        agent, cfg = self.agent, self.agent.config
        t0 = time.monotonic()
        agent.gate.close(GATE_HOLDER)
        agent.link.detach()
        log.warning(
            "platform_lost",
            vm=cfg.name,
            socket=str(cfg.socket),
            waiting_faults=len(agent.faults.pending),
            window_seconds=cfg.reconnect_seconds,
        )
        try:
            client, reg, attempts = await self._reconnect(t0 + cfg.reconnect_seconds)
        except TimeoutError:
            return self._give_up(
                f"the platform daemon at {cfg.socket} is gone and no daemon took this VM back "
                f"within {cfg.reconnect_seconds:g} s (--reconnect-seconds)"
            )
        except ResumeRefused as exc:
            return self._give_up(str(exc))
        agent.region.generation = reg.generation
        agent.registered = reg
        # Faults on the wire when the daemon died are asked again once attached. None of
        # their pages is mapped: a write fault drops a read-only mapping before it goes out
        # (FaultPath.ensure), so a lost copy-on-write reply leaves no stale mapping behind.
        refaults = len(agent.faults.pending)
        agent.link.attach(client)
        downtime = time.monotonic() - t0
        if agent.guest_progress.running:
            agent.guest_progress.exited(downtime)  # the guest made no progress meanwhile
        agent.gate.open(GATE_HOLDER)
        self.resumes += 1
        self.downtime_total += downtime
        agent.metrics.platform_resumes.inc()
        agent.metrics.platform_downtime.inc(downtime)
        log.info(
            "platform_resumed",
            vm=cfg.name,
            downtime_seconds=round(downtime, 3),
            attempts=attempts,
            generation=reg.generation,
            faults_asked_again=refaults,
        )
        return True

    async def _reconnect(self, deadline: float) -> tuple[RpcClient, Registered, int]:
        agent, cfg = self.agent, self.agent.config
        delay, attempts = FIRST_BACKOFF, 0
        while True:
            attempts += 1
            client: RpcClient | None = None
            try:
                client = await RpcClient.connect(str(cfg.socket), on_message=agent._on_message)
                reg = await client.request(
                    agent.register_message(resume=True), timeout=REGISTER_TIMEOUT
                )
            except PeerError as exc:
                if client is not None:
                    client.close()
                raise ResumeRefused(
                    f"the platform daemon at {cfg.socket} does not carry this VM on: {exc}"
                ) from None
            except (OSError, ConnectionClosed, TimeoutError):
                if client is not None:
                    client.close()
                if time.monotonic() + delay > deadline:
                    raise TimeoutError from None
                await asyncio.sleep(delay)
                delay = min(MAX_BACKOFF, 2 * delay)
                continue
            self._check_same_files(reg, client)
            return client, reg, attempts

    def _check_same_files(self, reg: Registered, client: RpcClient) -> None:
        old = self.agent.registered
        same = (
            reg.vm_id == old.vm_id
            and reg.machine_memory_path == old.machine_memory_path
            and reg.host_pages == old.host_pages
            and reg.control_region_path == old.control_region_path
            and reg.slot_count == old.slot_count
            and reg.slot_capacity == old.slot_capacity
        )
        if not same:
            client.close()
            raise ResumeRefused(
                "the platform daemon that came back serves other memory files; "
                "this guest cannot carry on with it"
            )
        region = self.agent.region
        if region.read_generation() != reg.generation:
            client.close()
            raise ResumeRefused("the control region does not belong to this VM any more")

    def _give_up(self, message: str) -> bool:
        agent = self.agent
        log.error("platform_gone", vm=agent.config.name, error=message)
        agent.exit_code = 1
        agent.exit_message = message
        agent.request_stop()
        return False
