"""Sans-I/O wire codec: feed bytes in, take messages out; turn messages into bytes.

Frame header, little-endian, 18 bytes::

    offset size field
    0      2    magic       0x4D56 (bytes b"VM")
    2      1    version     1
    3      1    type        MessageType
    4      2    flags       reserved, must be 0 on send, ignored on receive
    6      4    length      body length in bytes, 0..max_frame
    10     8    request_id  matches replies to requests; 0 for unsolicited messages

Invariant: whatever bytes are fed, ``next_event`` returns a message, returns None (needs more
bytes), or raises ``RemoteProtocolError``. After an error the codec stays broken.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import MESSAGE_CLASSES, Message, MessageType

MAGIC = 0x4D56
VERSION = 1
HEADER = struct.Struct("<HBBHIQ")
HEADER_SIZE = HEADER.size
#: Largest body accepted by default: far above any legal message, small enough to bound memory.
DEFAULT_MAX_FRAME = 1 << 20


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded frame: its request id and message."""

    request_id: int
    message: Message


class Codec:
    """One direction-agnostic connection core; no I/O, no clock."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the peer."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def next_event(self) -> Envelope | None:
        """Decode one frame, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def events(self) -> list[Envelope]:
        """Decode every complete frame buffered so far."""
        out = []
        while (env := self.next_event()) is not None:
            out.append(env)
        return out

    def _next(self) -> Envelope | None:
        if len(self._buf) < HEADER_SIZE:
            return None
        magic, version, mtype, _flags, length, request_id = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad magic 0x{magic:04x}", ErrorCode.BAD_MAGIC)
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported version {version}", ErrorCode.BAD_VERSION)
        try:
            kind = MessageType(mtype)
        except ValueError:
            raise RemoteProtocolError(
                f"unknown message type {mtype}", ErrorCode.UNKNOWN_TYPE
            ) from None
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds limit {self.max_frame}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if length == 0:
            raise RemoteProtocolError(f"{kind.name} with empty body", ErrorCode.BAD_LENGTH)
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        message = MESSAGE_CLASSES[kind].decode_body(body)
        return Envelope(request_id, message)

    def send(self, message: Message, request_id: int = 0) -> bytes:
        """Bytes of one frame carrying ``message``."""
        try:
            body = message.encode_body()
        except (struct.error, OverflowError) as exc:
            # A field does not fit its wire width: our bug, not the peer's.
            raise LocalProtocolError(f"{type(message).__name__}: {exc}") from None
        if not 0 < len(body) <= self.max_frame:
            raise LocalProtocolError(f"{type(message).__name__} body of {len(body)} bytes")
        if not 0 <= request_id < 1 << 64:
            raise LocalProtocolError(f"request id {request_id} out of range")
        return HEADER.pack(MAGIC, VERSION, message.TYPE, 0, len(body), request_id) + body
