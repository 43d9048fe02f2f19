"""The load generator's connections: one per agent, one to the platform daemon.

Neither kind ever raises into the run. An agent that goes away, stops answering or fails a
request is dropped from the run with the reason, once; the run carries on with the others.
The daemon may go away and come back (a crash, a restart on the same socket): each request
reconnects when it must, waits a bounded time for the daemon to come back, and the time it
was unreachable is recorded as a gap for the report.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..rpc import ConnectionClosed, PeerError, RpcClient

#: Backoff between two attempts to reach the daemon again: from the first to the last.
RECONNECT_BACKOFF = (0.1, 1.0)
#: How often a long request (verify) checks that its agent still answers.
LIVENESS_PERIOD = 1.0
#: How long a just registered agent may take to open its control socket: it registers with
#: the daemon first, then maps its memory and opens the socket (``vmm_agent/agent.py``).
CONTROL_SOCKET_WAIT = 10.0


class VmState(StrEnum):
    """Where a VM stands in the run."""

    ACTIVE = "active"
    #: Its control connection is gone (the agent exited or was killed).
    LOST = "lost"
    #: It did not answer a request within the bound (frozen, or far too slow).
    NOT_ANSWERING = "not_answering"
    #: It answered a request with an error.
    FAILED = "failed"
    #: Still there, but the daemon was unreachable when its pages were to be verified.
    UNVERIFIED = "unverified"
    #: Registered without a control socket: nothing to drive (not a vmmem-vmm agent).
    SKIPPED = "skipped"


class Clock:
    """Seconds since the run started, for the report."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def restart(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)


@dataclass
class AgentLink:
    """One VM's agent, reached on its control socket."""

    name: str
    path: str
    pid: int
    timeout: float
    clock: Clock
    client: RpcClient | None = None
    state: VmState = VmState.ACTIVE
    reason: str = ""
    #: The phase that was running, and when, as the VM left the run.
    phase: str = ""
    at_seconds: float = 0.0
    #: The last progress or results the VM answered with (kept for a VM that is lost).
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state == VmState.ACTIVE

    async def connect(self) -> None:
        if not self.path:
            self.state, self.reason = VmState.SKIPPED, "registered without a control socket"
            return
        # The socket's file exists once it accepts connections (``listen_private``): until
        # then an agent that is still alive is starting, not gone.
        deadline = time.monotonic() + CONTROL_SOCKET_WAIT
        while True:
            try:
                self.client = await RpcClient.connect(self.path)
                return
            except OSError as exc:
                starting = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                if not (starting and time.monotonic() < deadline and _alive(self.pid)):
                    self.drop(
                        VmState.LOST, f"cannot connect to its control socket {self.path}: {exc}"
                    )
                    return
            await asyncio.sleep(0.05)

    def drop(self, state: VmState, reason: str, during: str = "") -> None:
        """Take the VM out of the run, once, with the reason (and the phase it was in)."""
        if not self.active:
            return
        if state == VmState.LOST and not _alive(self.pid):
            reason += f" (agent process {self.pid} has exited)"
        self.state, self.reason, self.phase = state, reason, during
        self.at_seconds = self.clock.now()
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def call(
        self,
        op: str,
        during: str = "",
        *,
        timeout: float | None = None,
        drop_slow: bool = True,
        **args: Any,
    ) -> dict[str, Any] | None:
        """One control request (``during``: the phase, for the report); None if the VM is
        out of the run or leaves it now.

        ``timeout`` defaults to the link's bound; ``drop_slow=False`` is for requests whose
        answer is only nice to have (live progress): no answer in time is not held against
        the VM, a closed connection is.
        """
        bound = self.timeout if timeout is None else timeout
        return await self._request(op, during, bound, drop_slow, args)

    async def _request(
        self, op: str, during: str, bound: float | None, drop_slow: bool, args: dict[str, Any]
    ) -> dict[str, Any] | None:
        if not self.active or self.client is None:
            return None
        try:
            result = await self.client.ctl(op, timeout=bound, **args)
        except TimeoutError:
            if drop_slow:
                self.drop(VmState.NOT_ANSWERING, f"no answer to {op} within {bound:g} s", during)
            return None
        except (ConnectionClosed, OSError):
            self.drop(VmState.LOST, f"connection lost during {op}", during)
            return None
        except PeerError as exc:
            self.drop(VmState.FAILED, f"{op} failed: {exc}", during)
            return None
        if op in ("progress", "results"):
            self.last = result
        return result

    async def call_long(self, op: str, during: str = "", **args: Any) -> dict[str, Any] | None:
        """A request that may rightly take long (verify): no bound on the request itself,
        but the agent must keep answering ``progress`` within the bound meanwhile."""
        task = asyncio.ensure_future(self._request(op, during, None, True, args))
        while True:
            done, _ = await asyncio.wait({task}, timeout=LIVENESS_PERIOD)
            if done:
                return task.result()
            if await self.call("progress", during) is None:
                task.cancel()
                await asyncio.wait({task})
                return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: say nothing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Gap:
    """A time the daemon could not be reached, and the requests that went unanswered."""

    start: float
    error: str
    end: float | None = None
    missed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_seconds": self.start,
            "to_seconds": self.end,
            "error": self.error,
            "missed": self.missed,
        }


class DaemonLink:
    """Requests to the platform daemon that survive its going away and coming back.

    A request that cannot reach the daemon opens a gap and retries, with backoff, until the
    daemon answers or ``wait`` seconds have passed since the gap opened; after that, each
    request makes one attempt, so a daemon that is gone for good costs ``wait`` once in the
    whole run, not once per request. The first answer closes the gap.
    """

    def __init__(self, path: str, wait: float, timeout: float, clock: Clock) -> None:
        self.path = path
        self.wait = wait
        self.timeout = timeout
        self.clock = clock
        self.client: RpcClient | None = None
        self.gaps: list[Gap] = []
        self.pids: list[int] = []
        #: Requests the daemon refused (it answered with an error).
        self.refused: list[dict[str, str]] = []

    @property
    def gap(self) -> Gap | None:
        return self.gaps[-1] if self.gaps and self.gaps[-1].end is None else None

    async def connect(self) -> None:
        """The first connection: raises if the daemon cannot be reached at all."""
        self._attach(await RpcClient.connect(self.path))

    def _attach(self, client: RpcClient) -> None:
        # A daemon that dies between two requests opens the gap when it dies, not at the
        # next request (which may reach its successor and never notice).
        self.client = client
        client.closed.add_done_callback(lambda _: self._closed(client))

    def _closed(self, client: RpcClient) -> None:
        if client is self.client:  # not a connection we closed ourselves
            self._lost(ConnectionClosed("the daemon closed the connection"))

    async def call(self, op: str, *, idempotent: bool = True, **args: Any) -> dict[str, Any] | None:
        """The daemon's answer to ``op``, or None if it cannot be reached in time or refuses.

        A request that is not idempotent (retire a random frame) is not sent again once it
        may have reached the daemon: only a failure to connect is retried.
        """
        delay = RECONNECT_BACKOFF[0]
        while True:
            sent = False
            try:
                if self.client is None or self.client.closed.done():
                    self._attach(await RpcClient.connect(self.path))
                assert self.client is not None
                sent = True
                result = await self.client.ctl(op, timeout=self.timeout, **args)
            except PeerError as exc:
                self.refused.append({"op": op, "error": str(exc)})
                return None
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                self._lost(exc)
                gap = self.gap
                assert gap is not None
                late = self.clock.now() >= gap.start + self.wait
                if late or (sent and not idempotent):
                    gap.missed.append(op)
                    return None
                await asyncio.sleep(delay)
                delay = min(RECONNECT_BACKOFF[1], 2 * delay)
                continue
            self._answered(op, result)
            return result

    async def peek(self, op: str) -> dict[str, Any] | None:
        """One attempt at ``op`` on the current connection, for figures only nice to have
        (live samples): None at once if the daemon is not connected or does not answer in
        time. It opens no gap and waits for no reconnection (a closed connection opens the
        gap by itself, for the next ``call`` to wait on)."""
        client = self.client
        if client is None or client.closed.done():
            return None
        try:
            result = await client.ctl(op, timeout=self.timeout)
        except (PeerError, ConnectionClosed, OSError, TimeoutError):
            return None
        self._answered(op, result)
        return result

    def _lost(self, exc: BaseException) -> None:
        self.close()
        if self.gap is None:
            error = str(exc) or type(exc).__name__
            self.gaps.append(Gap(self.clock.now(), f"{type(exc).__name__}: {error}"))

    def _answered(self, op: str, result: dict[str, Any]) -> None:
        if (gap := self.gap) is not None:
            gap.end = self.clock.now()
        pid = result.get("pid") if op == "status" else None
        if isinstance(pid, int) and (not self.pids or self.pids[-1] != pid):
            self.pids.append(pid)

    def summary(self) -> dict[str, Any]:
        """For the report: the gaps, the daemon's pids seen (a restart), refused requests."""
        return {
            "reachable_at_end": self.gap is None,
            "gaps": [g.as_dict() for g in self.gaps],
            "pids": self.pids,
            "refused": self.refused,
        }

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
