"""The thin adapter from an asyncio transport to the sans-I/O codec, one per peer.

It also admits the peer (its uid, from SO_PEERCRED, must be allowed) and screens each frame
by type before its body is read (docs/protocol.md section 2, the order of checks).
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import TYPE_CHECKING, cast

import structlog

from shared.codec import Codec, error_request_id, parse_fault
from shared.errors import ErrorCode, RemoteProtocolError, VMMemError
from shared.messages import MESSAGE_CLASSES, Error, Message, MessageType
from shared.sockets import PeerCredentials, peer_credentials, refuse_peer

if TYPE_CHECKING:
    from .server import PlatformServer
    from .vm import VM

log = structlog.get_logger("vmmem.platform.connection")

#: Types only the daemon sends: refused whatever the connection's state.
_DAEMON_SENDS = frozenset(
    {
        MessageType.REGISTERED,
        MessageType.REQUEST,
        MessageType.FAULT_REPLY,
        MessageType.KICK,
        MessageType.CTL_REPLY,
    }
)
_FAULT = MessageType.FAULT  # attribute access on an enum class costs ~0.2 µs
#: Types that only a registered VM may send.
_VM_SENDS = frozenset({MessageType.GET_REQUEST, MessageType.COMPLETE_REQUEST, MessageType.FAULT})


class ReleaseReason(StrEnum):
    """Why a VM was released (the ``reason`` of the ``vm_released`` event)."""

    CLOSED = "closed"  # the agent said goodbye, then closed its connection
    KILLED = "killed"  # the connection reset or ended without a goodbye (the agent died)
    PROTOCOL_ERROR = "protocol_error"  # the daemon disconnected it for breaking the protocol
    SHUTDOWN = "shutdown"  # the daemon is stopping
    NOT_RESUMED = "not_resumed"  # recovered after a crash, its agent never came back


class PlatformConnection(asyncio.Protocol):
    """One agent or control client connected to the daemon's Unix socket."""

    def __init__(self, server: PlatformServer) -> None:
        self.server = server
        self.codec = Codec(screen=self._screen)
        self.transport: asyncio.Transport | None = None
        self.vm: VM | None = None
        self.peer: PeerCredentials | None = None
        self.closed = False
        #: The agent announced a clean exit (ctl op ``goodbye``) before closing.
        self.goodbye = False
        self.protocol_failed = False
        #: Frames sent while a read of several frames is handled, written at its end in one
        #: call (``data_received``); None: each frame is written at once.
        self._corked: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = peer_credentials(transport)
        allowed = self.server.config.allowed_uids
        if self.peer is None or self.peer.uid not in allowed:
            self.closed = True
            refuse_peer(transport, self.peer, allowed, log, socket=str(self.server.config.socket))
            return
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        vm = self.vm
        if vm is not None and not self.codec.buffered:
            # The common read: one whole, valid Fault frame (a vCPU waits for it). Anything
            # else, valid or not, takes the codec, which checks and reports it.
            fault = parse_fault(data)
            if fault is not None:
                self.server.fault(self, vm, *fault)
                return
        self.codec.receive_data(data)
        # Why the replies of one read go out in one write: a read often carries several
        # frames (a verify or a walking guest faults several windows at once), and each
        # write is a syscall that wakes the peer, which on a busy machine preempts the daemon
        # before its next reply, once per reply. Nothing waits longer: the writes of this
        # callback all happen before it returns.
        self._corked = []
        try:
            while not self.closed and (env := self.codec.next_event()) is not None:
                self.server.dispatch(self, env.request_id, env.message)
        except RemoteProtocolError as exc:
            self.fail(exc, error_request_id(exc))
        finally:
            self._uncork()

    def _screen(self, kind: MessageType) -> None:
        """Refuse a frame by its type, before its body is read or validated."""
        if kind is _FAULT and self.vm is not None:  # the hot case, first and cheap
            return
        name = MESSAGE_CLASSES[kind].__name__
        if kind in _DAEMON_SENDS:
            raise RemoteProtocolError(
                f"{name} is sent by the daemon, never to it", ErrorCode.PROTOCOL
            )
        if self.vm is None and kind in _VM_SENDS:
            raise RemoteProtocolError(f"{name} before Register", ErrorCode.NOT_REGISTERED)
        if self.vm is not None and kind == MessageType.REGISTER:
            raise RemoteProtocolError(
                "this connection already registered a VM", ErrorCode.ALREADY_REGISTERED
            )

    def send(self, message: Message, request_id: int = 0) -> None:
        """Queue one frame to the peer (dropped silently once the peer is gone)."""
        if self.transport is not None and not self.closed:
            self.send_frame(self.codec.send(message, request_id))

    def send_frame(self, frame: bytes) -> None:
        """Queue one frame already encoded (``send`` encodes, then comes here)."""
        if self.transport is not None and not self.closed:
            if self._corked is not None:
                self._corked.append(frame)
            else:
                self.transport.write(frame)

    def _uncork(self) -> None:
        """Write the frames held back while a read was handled, in one call."""
        out, self._corked = self._corked, None
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send_error(self, exc: VMMemError, request_id: int = 0) -> None:
        """A clear Error the peer can act on; the connection stays up."""
        self.send(Error(code=int(exc.code), message=str(exc)), request_id)

    def fail(self, exc: VMMemError, request_id: int = 0) -> None:
        """The peer broke the protocol: tell it why, then disconnect it (and only it)."""
        if self.closed:
            return
        log.warning(
            "protocol_error",
            vm=self.vm.name if self.vm else None,
            peer_pid=self.peer.pid if self.peer else None,
            peer_uid=self.peer.uid if self.peer else None,
            code=ErrorCode(exc.code).name,
            error=str(exc),
        )
        self.server.metrics.protocol_errors.labels(ErrorCode(exc.code).name.lower()).inc()
        self.protocol_failed = True
        self.send_error(exc, request_id)
        self.close()

    def pause_writing(self) -> None:
        """The peer does not read its replies: stop reading its requests until it does."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self._uncork()  # what was sent before the close goes first (a protocol Error)
            self.closed = True
            self.transport.close()

    def release_reason(self) -> ReleaseReason:
        """Why this connection's VM goes: checked in this order, the first that applies."""
        if self.server.should_exit:
            return ReleaseReason.SHUTDOWN
        if self.protocol_failed:
            return ReleaseReason.PROTOCOL_ERROR
        return ReleaseReason.CLOSED if self.goodbye else ReleaseReason.KILLED

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connection_lost(self)
