"""Client side of the wire protocol over asyncio: request ids, futures, unsolicited messages.

The agent uses it to talk to the platform daemon; ``vmmem-ctl`` and ``vmmem-load`` use it
for control requests to the daemon and to agents.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, cast

from shared.codec import Codec, parse_fault_reply
from shared.errors import ErrorCode, RemoteProtocolError, VMMemError
from shared.messages import CtlReply, CtlRequest, Error, Message


class PeerError(VMMemError):
    """The peer answered a request with an Error message."""


class ConnectionClosed(VMMemError):
    """The connection to the peer is gone."""


class RpcClient(asyncio.Protocol):
    """A connection that matches replies to requests by request id."""

    def __init__(self, on_message: Callable[[Message], None] | None = None) -> None:
        self.codec = Codec()
        self.transport: asyncio.Transport | None = None
        self.on_message = on_message
        self.on_reply: Callable[[int, Message], None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        #: Frames held back by ``cork`` until ``uncork`` writes them in one call.
        self._corked: list[bytes] | None = None

    @classmethod
    async def connect(cls, path: str, **kwargs: Any) -> RpcClient:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_unix_connection(lambda: cls(**kwargs), path)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.codec.buffered:
            # The common read: one whole one-page FaultReply (a vCPU waits for it). Anything
            # else takes the codec, which checks and reports it.
            reply = parse_fault_reply(data)
            if reply is not None:
                self._deliver(*reply)
                return
        self.codec.receive_data(data)
        try:
            while (env := self.codec.next_event()) is not None:
                self._deliver(env.request_id, env.message)
        except RemoteProtocolError as exc:
            self._fail_all(exc)
            self.close()

    def _deliver(self, request_id: int, msg: Message) -> None:
        if request_id and self.on_reply is not None:
            self.on_reply(request_id, msg)  # the fast path installs mappings before waking
        fut = self._waiting.pop(request_id, None) if request_id else None
        if fut is None:
            if self.on_message is not None:
                self.on_message(msg)
            return
        if fut.done():
            return
        if isinstance(msg, Error):
            fut.set_exception(PeerError(msg.message, ErrorCode(msg.code)))
        else:
            fut.set_result(msg)

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, msg: Message, request_id: int = 0) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        frame = self.codec.send(msg, request_id)
        if self._corked is not None:
            self._corked.append(frame)
        else:
            self.transport.write(frame)

    def cork(self) -> None:
        """Hold the frames sent from now on until ``uncork``, which writes them in one call
        (several requests, one syscall and one wakeup of the peer)."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Write the frames held since ``cork``. A connection closed meanwhile drops them: their
        requests fail with the connection (``connection_lost``)."""
        out, self._corked = self._corked, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def request_nowait(self, msg: Message) -> asyncio.Future[Any]:
        """Send ``msg`` and return the future of its reply."""
        rid = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiting[rid] = fut
        try:
            self.send(msg, rid)
        except ConnectionClosed:
            del self._waiting[rid]
            raise
        return fut

    def request(self, msg: Message, timeout: float | None = None) -> Awaitable[Any]:
        """Send ``msg`` now; await the result for its reply.

        Not a coroutine: without a timeout (the fault path's case) this is the reply's future
        itself, so a fault costs no coroutine of its own. Every caller awaits it at once.
        """
        if timeout is None:
            return self.request_nowait(msg)
        return asyncio.wait_for(self.request_nowait(msg), timeout)

    async def ctl(self, op: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
        """A control request; raises PeerError when the peer says it failed."""
        reply = await self.request(CtlRequest(op=op, args=args), timeout)
        if not isinstance(reply, CtlReply):
            raise PeerError(f"unexpected reply {type(reply).__name__}")
        if not reply.ok:
            raise PeerError(reply.error, ErrorCode.BAD_REQUEST)
        return reply.result

    def _fail_all(self, exc: Exception) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionClosed("connection closed by peer"))
        if not self.closed.done():
            self.closed.set_result(None)
