"""The agent's link to the platform daemon, which outlives any one connection.

Every part of the agent that talks to the daemon (the fault path, both round loops, batch
completion) holds this link, never a connection: when the daemon dies and a new one takes
over, the agent attaches the new connection here and every part carries on with it. While
no connection is attached, sending raises ConnectionClosed at once and ``wait_up`` waits
for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from shared.messages import Message

from .rpc import ConnectionClosed, RpcClient


class PlatformLink:
    """The current connection to the daemon, if any, behind a stable object."""

    def __init__(self) -> None:
        self.client: RpcClient | None = None
        self._up = asyncio.Event()
        self._on_reply: Callable[[int, Message], None] | None = None

    @property
    def up(self) -> bool:
        return self.client is not None

    @property
    def on_reply(self) -> Callable[[int, Message], None] | None:
        return self._on_reply

    @on_reply.setter
    def on_reply(self, callback: Callable[[int, Message], None] | None) -> None:
        """Installed on every connection attached from now on (the fault path's fast path)."""
        self._on_reply = callback
        if self.client is not None:
            self.client.on_reply = callback

    def attach(self, client: RpcClient) -> None:
        client.on_reply = self._on_reply
        self.client = client
        self._up.set()
        client.closed.add_done_callback(lambda _: self._lost(client))

    def _lost(self, client: RpcClient) -> None:
        if self.client is client:
            self.detach()

    def detach(self) -> None:
        """The connection is gone: senders fail fast, waiters wait for the next one."""
        self.client = None
        self._up.clear()

    def _drop_if_closing(self) -> None:
        """Detach a connection that is going away but whose ``closed`` may not be set yet.

        Why: when the daemon dies the transport sees EOF and is closing one loop iteration
        before ``connection_lost`` resolves ``closed`` (both with the standard loop and
        uvloop), and every running vCPU gets a step in that window. A request sent then fails
        at once; if the link still looked up, ``wait_up`` would return at once and the fault
        path would retry forever without yielding, so the loss would never be seen.
        """
        client = self.client
        if client is None:
            return
        transport = client.transport
        if client.closed.done() or transport is None or transport.is_closing():
            self.detach()

    async def wait_up(self) -> None:
        self._drop_if_closing()
        await self._up.wait()

    def lost(self, client: RpcClient | None = None) -> asyncio.Future[None]:
        """Resolves when the attached connection (or ``client``) closes."""
        client = client or self.client
        if client is None:
            raise ConnectionClosed("no connection to the platform daemon")
        return client.closed

    def _current(self) -> RpcClient:
        self._drop_if_closing()
        if self.client is None:
            raise ConnectionClosed("no connection to the platform daemon")
        return self.client

    def send(self, msg: Message, request_id: int = 0) -> None:
        self._current().send(msg, request_id)

    def request_nowait(self, msg: Message) -> asyncio.Future[Any]:
        return self._current().request_nowait(msg)

    def request(self, msg: Message, timeout: float | None = None) -> Awaitable[Any]:
        """``RpcClient.request`` on the current connection (sent now, no coroutine layer)."""
        return self._current().request(msg, timeout)

    async def ctl(self, op: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
        return await self._current().ctl(op, timeout, **args)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


@contextlib.contextmanager
def corked(link: object) -> Iterator[None]:
    """Requests sent inside go out in one write when it ends (``RpcClient.cork``): for code
    that sends several requests and does not wait inside. Anything but a connection or the
    link to one (a test's fake daemon) sends as usual."""
    client = link.client if isinstance(link, PlatformLink) else link
    if not isinstance(client, RpcClient):
        yield
        return
    client.cork()
    try:
        yield
    finally:
        client.uncork()


#: What the agent's parts accept: the reconnecting link, or a bare connection (tests,
#: benchmarks).
Link = PlatformLink | RpcClient
