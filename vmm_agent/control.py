"""The agent's control socket: the load generator sets phases and reads results through it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog

from shared.codec import Codec
from shared.ctl_reply import reply_frame
from shared.errors import RemoteProtocolError, VMMemError
from shared.messages import CtlReply, CtlRequest, Error

log = structlog.get_logger("vmmem.vmm.control")
Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlConnection(asyncio.Protocol):
    """One load-generator connection; each CtlRequest is answered by ``handler``."""

    def __init__(self, handler: Handler, tasks: set[asyncio.Task[Any]]) -> None:
        self.handler = handler
        self.tasks = tasks
        self.codec = Codec()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        try:
            while (env := self.codec.next_event()) is not None:
                if not isinstance(env.message, CtlRequest):
                    raise RemoteProtocolError(
                        f"control socket accepts CtlRequest only, got {type(env.message).__name__}"
                    )
                task = asyncio.ensure_future(self._answer(env.request_id, env.message))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except RemoteProtocolError as exc:
            log.warning("control_protocol_error", error=str(exc))
            self._write(self.codec.send(Error(code=int(exc.code), message=str(exc)), 0))
            assert self.transport is not None
            self.transport.close()

    async def _answer(self, request_id: int, msg: CtlRequest) -> None:
        try:
            result = await self.handler(msg.op, msg.args)
        except (VMMemError, ValueError, OverflowError, TypeError) as exc:
            self._write(self.codec.send(CtlReply(ok=False, error=str(exc)), request_id))
        else:
            self._write(reply_frame(self.codec, msg.op, result, request_id))

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)
