"""Sans-I/O wire codec: feed bytes in, take messages out; turn messages into bytes.

Frame header, little-endian, 18 bytes::

    offset size field
    0      2    magic       0x4D56 (bytes b"VM")
    2      1    version     1
    3      1    type        MessageType
    4      2    flags       reserved, must be 0 on send, ignored on receive
    6      4    length      body length in bytes, 0..max_frame
    10     8    request_id  matches replies to requests; 0 for unsolicited messages

The order of checks (docs/protocol.md section 2): the header (magic, version, type, length),
then the receiver's ``screen`` of the type (a type it never accepts, or not in its present
state), and only then the body. An error found after the magic and version passed is a
``FrameError`` carrying the frame's request id, so the Error sent back can carry it too.

Invariant: whatever bytes are fed, ``next_event`` returns a message, returns None (needs more
bytes), or raises ``RemoteProtocolError``. After an error the codec stays broken.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from .constants import MAX_FAULT_AROUND, FaultReason
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import MESSAGE_CLASSES, Fault, FaultReply, Message, MessageType

MAGIC = 0x4D56
VERSION = 1
HEADER = struct.Struct("<HBBHIQ")
HEADER_SIZE = HEADER.size
#: Largest body accepted by default: far above any legal message, small enough to bound memory.
DEFAULT_MAX_FRAME = 1 << 20
#: Whole frames of the fault path's two messages, header and body in one struct: a fault,
#: and a reply mapping one page (a vCPU waits for each, so every call per frame counts).
FAULT_FRAME = struct.Struct("<HBBHIQQBxH")
FAULT_REPLY_FRAME = struct.Struct("<HBBHIQBxHQqB")
_FAULT_BODY = FAULT_FRAME.size - HEADER_SIZE
_FAULT_REPLY_BODY = FAULT_REPLY_FRAME.size - HEADER_SIZE
_T_FAULT, _T_FAULT_REPLY = int(MessageType.FAULT), int(MessageType.FAULT_REPLY)
_FAULT_REASONS = frozenset(int(r) for r in FaultReason)
#: Types and classes by the header's type byte: ``MessageType(n)`` costs ~1 µs per frame.
_KINDS = {int(kind): kind for kind in MessageType}
_CLASSES = {int(kind): cls for kind, cls in MESSAGE_CLASSES.items()}
#: Called with each frame's type once its header passed, before its body is read; raises
#: RemoteProtocolError to refuse the frame by type.
Screen = Callable[[MessageType], None]


class FrameError(RemoteProtocolError):
    """A frame broke a rule after its header parsed: carries the frame's request id."""

    def __init__(self, message: str, code: ErrorCode, request_id: int) -> None:
        super().__init__(message, code)
        self.request_id = request_id


def error_request_id(exc: RemoteProtocolError) -> int:
    """The request id an Error about ``exc`` carries: the frame's, or 0 if unknown."""
    return exc.request_id if isinstance(exc, FrameError) else 0


class Envelope(NamedTuple):
    """One decoded frame: its request id and message (a tuple: built once per frame)."""

    request_id: int
    message: Message


class Codec:
    """One direction-agnostic connection core; no I/O, no clock."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, screen: Screen | None = None) -> None:
        self.max_frame = max_frame
        self.screen = screen
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None
        #: The fault frames' bodies fit under ``max_frame`` (a tiny limit takes the checks).
        self._fast = max_frame >= _FAULT_REPLY_BODY

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
        # Request id 0 for these two: with a wrong magic nothing in the header can be trusted,
        # and another version may lay its header out differently.
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad magic 0x{magic:04x}", ErrorCode.BAD_MAGIC)
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported version {version}", ErrorCode.BAD_VERSION)
        try:
            return self._frame(mtype, length, request_id)
        except FrameError:
            raise
        except RemoteProtocolError as exc:
            raise FrameError(str(exc), exc.code, request_id) from None

    def _frame(self, mtype: int, length: int, request_id: int) -> Envelope | None:
        """The rest of a frame whose magic and version are right."""
        kind = _KINDS.get(mtype)
        if kind is None:
            raise RemoteProtocolError(f"unknown message type {mtype}", ErrorCode.UNKNOWN_TYPE)
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds limit {self.max_frame}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if length == 0:
            raise RemoteProtocolError(f"{kind.name} with empty body", ErrorCode.BAD_LENGTH)
        if self.screen is not None:
            self.screen(kind)
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        message = _CLASSES[mtype].decode_body(body)
        return Envelope(request_id, message)

    def send(self, message: Message, request_id: int = 0) -> bytes:
        """Bytes of one frame carrying ``message``."""
        # The fault path's frames in one pack each. A value that does not fit (struct.error)
        # falls through to the general path, whose checks say which one.
        try:
            if type(message) is FaultReply and message.count == 1 and self._fast:
                return FAULT_REPLY_FRAME.pack(
                    MAGIC, VERSION, _T_FAULT_REPLY, 0, _FAULT_REPLY_BODY, request_id,
                    message.reason, 1, message.bpn, message.mpn, message.flag,
                )  # fmt: skip
            if type(message) is Fault and self._fast:
                return FAULT_FRAME.pack(
                    MAGIC, VERSION, _T_FAULT, 0, _FAULT_BODY, request_id,
                    message.bpn, int(message.write), message.around,
                )  # fmt: skip
        except struct.error:
            pass
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


def parse_fault(data: bytes) -> tuple[int, int, bool, int] | None:
    """``(request_id, bpn, write, around)`` when ``data`` is exactly one valid Fault frame
    (the daemon's fast path: no Envelope, no message object); None for anything else, which
    the caller then feeds to its codec, so every error is found and reported the usual way."""
    if len(data) != FAULT_FRAME.size:
        return None
    magic, version, mtype, _flags, length, request_id, bpn, write, around = FAULT_FRAME.unpack(data)
    if (
        magic != MAGIC
        or version != VERSION
        or mtype != _T_FAULT
        or length != _FAULT_BODY
        or write > 1
        or around > MAX_FAULT_AROUND
    ):
        return None
    return request_id, bpn, write == 1, around


def parse_fault_reply(data: bytes) -> tuple[int, FaultReply] | None:
    """``(request_id, reply)`` when ``data`` is exactly one valid one-page FaultReply frame
    (the agent's fast path); None for anything else, to be fed to the codec."""
    if len(data) != FAULT_REPLY_FRAME.size:
        return None
    magic, version, mtype, _flags, length, request_id, reason, n, bpn, mpn, flag = (
        FAULT_REPLY_FRAME.unpack(data)
    )
    if (
        magic != MAGIC
        or version != VERSION
        or mtype != _T_FAULT_REPLY
        or length != _FAULT_REPLY_BODY
        or n != 1
        or reason not in _FAULT_REASONS
    ):
        return None
    return request_id, FaultReply.single(reason, bpn, mpn, flag)
