"""Error hierarchy; each error that crosses the wire carries its code."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by Error messages."""

    PROTOCOL = 1
    BAD_MAGIC = 2
    BAD_VERSION = 3
    UNKNOWN_TYPE = 4
    BAD_LENGTH = 5
    FRAME_TOO_LARGE = 6
    BAD_BODY = 7
    BPN_OUT_OF_RANGE = 8
    SLOT_NOT_ISSUED = 9
    DUPLICATE_BPN = 10
    TOO_MANY_FAULTS = 11
    NOT_REGISTERED = 12
    ALREADY_REGISTERED = 13
    OUT_OF_MEMORY = 14
    BAD_REQUEST = 15
    INTERNAL = 16


class VMMemError(Exception):
    """Base of every error this project raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(VMMemError):
    """A rule of the wire protocol was broken."""

    code = ErrorCode.PROTOCOL


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: its bytes or its requests are invalid."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class LayoutError(VMMemError):
    """A shared-memory layout is corrupt or an access is out of bounds."""

    code = ErrorCode.BAD_REQUEST


class OutOfMemoryError(VMMemError):
    """No free frame could be found."""

    code = ErrorCode.OUT_OF_MEMORY
