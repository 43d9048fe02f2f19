"""Message types of the wire protocol.

Hot-path messages (GetRequest, Request, CompleteRequest, Fault, Kick) are frozen slotted
dataclasses with fixed binary bodies packed by ``struct``; FaultReply is a slotted class,
packed by ``struct`` for one page and by NumPy for several. Control messages are pydantic
models sent as JSON. Every class knows its ``MessageType`` and how to turn its body into
bytes and back; the codec adds the header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .constants import MAX_FAULT_AROUND, FaultReason, Priority, ServiceType
from .errors import ErrorCode, RemoteProtocolError


class MessageType(IntEnum):
    """The type byte of a frame header."""

    REGISTER = 1
    REGISTERED = 2
    ERROR = 3
    GET_REQUEST = 10
    REQUEST = 11
    COMPLETE_REQUEST = 12
    FAULT = 13
    FAULT_REPLY = 14
    KICK = 15
    CTL_REQUEST = 20
    CTL_REPLY = 21


#: Slot index in a Request that means "no work for you this round".
NO_SLOT = 0xFFFF

_GET_REQUEST = struct.Struct("<BB2xI")
_REQUEST = struct.Struct("<BBHIQ")
_COMPLETE = struct.Struct("<H2xIQI")
_FAULT = struct.Struct("<QBxH")
_FAULT_REPLY_HEAD = struct.Struct("<BxH")
#: A one-page FaultReply body: the head, then its bpn, mpn and flags (same layout as n = 1).
_FAULT_REPLY_ONE = struct.Struct("<BxHQqB")
_new_object = object.__new__
_FAULT_REASONS = frozenset(int(r) for r in FaultReason)
_KICK = struct.Struct("<I")

#: Flag bit in FaultReply.flags: the page may be written through this mapping.
FAULT_FLAG_WRITABLE = 1
#: Flag bit in GetRequest.flags: this request opens a new round (the daemon closes any round
#: of the same priority still open, e.g. one the agent left early to yield to high priority).
GET_FLAG_NEW_ROUND = 1
_GET_FLAGS = GET_FLAG_NEW_ROUND
#: Flag bit in Request.flags: the last batch of this round (the daemon has closed it), so the
#: agent completes it and asks for nothing more: one round trip fewer per round.
REQUEST_FLAG_LAST = 1
_REQUEST_FLAGS = REQUEST_FLAG_LAST


def _unpack(st: struct.Struct, body: bytes, name: str) -> tuple[Any, ...]:
    if len(body) != st.size:
        raise RemoteProtocolError(
            f"{name} body is {len(body)} bytes, expected {st.size}", ErrorCode.BAD_LENGTH
        )
    return st.unpack(body)


def _enum(enum: type[IntEnum], value: int, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise RemoteProtocolError(f"{name}: invalid value {value}", ErrorCode.BAD_BODY) from None


@dataclass(frozen=True, slots=True)
class GetRequest:
    """Agent asks for the next batch of the round.

    ``budget_us`` is the time left in the round's time bound when the request was sent (low
    priority; the daemon sizes the batch to fit it). ``flags`` bit 0 (GET_FLAG_NEW_ROUND)
    marks the first request of a round.
    """

    TYPE: ClassVar[MessageType] = MessageType.GET_REQUEST
    priority: Priority
    budget_us: int = 0
    flags: int = 0

    @property
    def new_round(self) -> bool:
        return bool(self.flags & GET_FLAG_NEW_ROUND)

    def encode_body(self) -> bytes:
        return _GET_REQUEST.pack(self.priority, self.flags, self.budget_us)

    @classmethod
    def decode_body(cls, body: bytes) -> GetRequest:
        prio, flags, budget = _unpack(_GET_REQUEST, body, "GetRequest")
        if flags & ~_GET_FLAGS:
            raise RemoteProtocolError(
                f"GetRequest: unknown flags 0x{flags:02x}", ErrorCode.BAD_BODY
            )
        return cls(_enum(Priority, prio, "priority"), budget, flags)


@dataclass(frozen=True, slots=True)
class Request:
    """Daemon hands a filled PageList slot to the agent, or ``slot == NO_SLOT``: round over.

    With NO_SLOT, ``count`` is the daemon's own time on this GetRequest in µs (so the agent
    can tell the round trip from the daemon's work). ``flags`` bit 0 (REQUEST_FLAG_LAST): this
    batch ends the round.
    """

    TYPE: ClassVar[MessageType] = MessageType.REQUEST
    service: int
    slot: int
    count: int
    seq: int
    flags: int = 0

    @property
    def has_work(self) -> bool:
        """False when the daemon has nothing more for this round."""
        return self.slot != NO_SLOT

    @property
    def last(self) -> bool:
        """This batch is the round's last: nothing more is asked after completing it."""
        return bool(self.flags & REQUEST_FLAG_LAST)

    def encode_body(self) -> bytes:
        return _REQUEST.pack(self.service, self.flags, self.slot, self.count, self.seq)

    @classmethod
    def decode_body(cls, body: bytes) -> Request:
        service, flags, slot, count, seq = _unpack(_REQUEST, body, "Request")
        if slot != NO_SLOT:
            _enum(ServiceType, service, "Request.service")
        if flags & ~_REQUEST_FLAGS:
            raise RemoteProtocolError(f"Request: unknown flags 0x{flags:02x}", ErrorCode.BAD_BODY)
        return cls(service, slot, count, seq, flags)


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    """Agent has written a status for every page of the slot; ``elapsed_us`` is its own time."""

    TYPE: ClassVar[MessageType] = MessageType.COMPLETE_REQUEST
    slot: int
    count: int
    seq: int
    elapsed_us: int = 0

    def encode_body(self) -> bytes:
        return _COMPLETE.pack(self.slot, self.count, self.seq, self.elapsed_us)

    @classmethod
    def decode_body(cls, body: bytes) -> CompleteRequest:
        return cls(*_unpack(_COMPLETE, body, "CompleteRequest"))


@dataclass(frozen=True, slots=True)
class Fault:
    """A guest touched a page the agent does not expose; ``around`` asks for neighbours too."""

    TYPE: ClassVar[MessageType] = MessageType.FAULT
    bpn: int
    write: bool
    around: int = 0

    def encode_body(self) -> bytes:
        return _FAULT.pack(self.bpn, int(self.write), self.around)

    @classmethod
    def decode_body(cls, body: bytes) -> Fault:
        bpn, write, around = _unpack(_FAULT, body, "Fault")
        if write > 1:
            raise RemoteProtocolError(
                f"Fault.write must be 0 or 1, got {write}", ErrorCode.BAD_BODY
            )
        if around > MAX_FAULT_AROUND:
            raise RemoteProtocolError(
                f"Fault.around {around} exceeds {MAX_FAULT_AROUND}", ErrorCode.BAD_BODY
            )
        return cls(bpn, bool(write), around)


class FaultReply:
    """Mappings for the faulting page (first entry) and any fault-around neighbours.

    Body: ``reason u8, pad, count u16``, then ``bpn u64[count]``, ``mpn i64[count]``,
    ``flags u8[count]``. ``reason`` is a FaultReason for the faulting page.

    Most replies map one page, and NumPy costs microseconds per call on one-element arrays,
    so a reply keeps its first page as plain ints (``bpn``, ``mpn``, ``flag``) and ``count``;
    a one-page reply (``FaultReply.single``, or decoded from the wire) makes its arrays only
    when ``bpns``/``mpns``/``flags`` are read. Treat it as immutable.
    """

    __slots__ = ("_bpns", "_flags", "_mpns", "bpn", "count", "flag", "mpn", "reason")
    TYPE: ClassVar[MessageType] = MessageType.FAULT_REPLY
    reason: int
    count: int
    bpn: int
    mpn: int
    flag: int

    def __init__(
        self,
        reason: int,
        bpns: npt.NDArray[np.uint64],
        mpns: npt.NDArray[np.int64],
        flags: npt.NDArray[np.uint8],
    ) -> None:
        n = len(bpns)
        if not (1 <= n <= MAX_FAULT_AROUND + 1) or len(mpns) != n or len(flags) != n:
            raise ValueError(f"FaultReply needs 1..{MAX_FAULT_AROUND + 1} equal-length arrays")
        self.reason, self.count = reason, n
        self.bpn, self.mpn, self.flag = int(bpns[0]), int(mpns[0]), int(flags[0])
        self._bpns: npt.NDArray[np.uint64] | None = bpns
        self._mpns: npt.NDArray[np.int64] | None = mpns
        self._flags: npt.NDArray[np.uint8] | None = flags

    @classmethod
    def single(cls, reason: int, bpn: int, mpn: int, flag: int) -> FaultReply:
        """A reply mapping one page, from plain ints (the fault path's common case)."""
        # One store per statement: a tuple assignment of five builds and unpacks a tuple,
        # and this runs twice per fault (daemon and agent): 260 → 140 ns.
        self = _new_object(cls)
        self.reason = reason
        self.count = 1
        self.bpn = bpn
        self.mpn = mpn
        self.flag = flag
        self._bpns = None
        self._mpns = None
        self._flags = None
        return self

    @property
    def bpns(self) -> npt.NDArray[np.uint64]:
        if self._bpns is None:
            self._bpns = np.array([self.bpn], dtype=np.uint64)
        return self._bpns

    @property
    def mpns(self) -> npt.NDArray[np.int64]:
        if self._mpns is None:
            self._mpns = np.array([self.mpn], dtype=np.int64)
        return self._mpns

    @property
    def flags(self) -> npt.NDArray[np.uint8]:
        if self._flags is None:
            self._flags = np.array([self.flag], dtype=np.uint8)
        return self._flags

    def __repr__(self) -> str:
        return f"FaultReply(reason={self.reason}, count={self.count}, bpn={self.bpn})"

    def encode_body(self) -> bytes:
        if self.count == 1:  # one struct call, no NumPy (the values are range-checked by it)
            return _FAULT_REPLY_ONE.pack(self.reason, 1, self.bpn, self.mpn, self.flag)
        return b"".join(
            (
                _FAULT_REPLY_HEAD.pack(self.reason, self.count),
                np.ascontiguousarray(self.bpns, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.mpns, dtype="<i8").tobytes(),
                np.ascontiguousarray(self.flags, dtype="u1").tobytes(),
            )
        )

    @classmethod
    def decode_body(cls, body: bytes) -> FaultReply:
        if len(body) == _FAULT_REPLY_ONE.size:
            reason, n, bpn, mpn, flag = _FAULT_REPLY_ONE.unpack(body)
            if n == 1:
                if reason not in _FAULT_REASONS:
                    _enum(FaultReason, reason, "FaultReply.reason")  # raises the clear error
                return cls.single(reason, bpn, mpn, flag)
        head = _FAULT_REPLY_HEAD.size
        if len(body) < head:
            raise RemoteProtocolError("FaultReply body truncated", ErrorCode.BAD_LENGTH)
        reason, n = _FAULT_REPLY_HEAD.unpack_from(body)
        _enum(FaultReason, reason, "FaultReply.reason")
        if not 1 <= n <= MAX_FAULT_AROUND + 1 or len(body) != head + 17 * n:
            raise RemoteProtocolError(
                f"FaultReply count {n} does not match body of {len(body)} bytes",
                ErrorCode.BAD_LENGTH,
            )
        bpns = np.frombuffer(body, dtype="<u8", count=n, offset=head)
        mpns = np.frombuffer(body, dtype="<i8", count=n, offset=head + 8 * n)
        flags = np.frombuffer(body, dtype="u1", count=n, offset=head + 16 * n)
        return cls(reason, bpns, mpns, flags)


@dataclass(frozen=True, slots=True)
class Kick:
    """Daemon tells the agent that work is pending (action-driven); ``pending`` is the word."""

    TYPE: ClassVar[MessageType] = MessageType.KICK
    pending: int

    def encode_body(self) -> bytes:
        return _KICK.pack(self.pending)

    @classmethod
    def decode_body(cls, body: bytes) -> Kick:
        return cls(*_unpack(_KICK, body, "Kick"))


class JsonMessage(BaseModel):
    """Base of control messages: a JSON object validated by pydantic.

    Bodies from the wire are validated strictly: an integer field takes a JSON integer only,
    never ``"16"``, ``16.0`` or ``true`` (lax validation once turned ``{"mpn": true}`` into
    frame 1). Objects built in code are validated as usual.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[MessageType]

    def encode_body(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode_body(cls, body: bytes) -> Any:
        try:
            return cls.model_validate_json(body, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise RemoteProtocolError(
                f"{cls.__name__}: {where}: {first.get('msg', 'invalid')}", ErrorCode.BAD_BODY
            ) from None


class Register(JsonMessage):
    """First message of an agent: who the VM is and what it needs."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTER
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    guest_pages: int = Field(gt=0, le=1 << 32)
    vcpus: int = Field(ge=1, le=256)
    latency_sensitivity: int = Field(default=0, ge=0, le=(1 << 64) - 1)
    home_node: int = Field(default=-1, ge=-1)
    shares: int = Field(default=1000, ge=1)
    control_socket: str = ""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    pid: int = 0
    #: The guest has a balloon driver (the agent serves BALLOON batches); without one,
    #: memsched reclaims from this VM by swap only, as ESX does for a VM without its tools.
    balloon_driver: bool = False
    #: Non-zero: the agent of this VM comes back after a daemon crash (the id and generation
    #: its earlier Registered gave); the daemon that took over carries the VM on.
    resume_vm_id: int = Field(default=0, ge=0)
    resume_generation: int = Field(default=0, ge=0)


class Registered(JsonMessage):
    """Daemon's answer to Register: where the shared files are and how they are laid out."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTERED
    vm_id: int
    machine_memory_path: str
    host_pages: int
    control_region_path: str
    slot_count: int
    slot_capacity: int
    home_node: int
    numa_nodes: int
    generation: int
    #: Faults the agent may have outstanding at once; more is a protocol violation.
    max_outstanding_faults: int = 256


class Error(JsonMessage):
    """A clear error; ``code`` is an ErrorCode. Sent before a violating peer is disconnected."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str


class CtlRequest(JsonMessage):
    """An operator or load-generator command: ``op`` and its arguments."""

    TYPE: ClassVar[MessageType] = MessageType.CTL_REQUEST
    op: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)


class CtlReply(JsonMessage):
    """Answer to a CtlRequest: ``ok`` with a result, or an error text."""

    TYPE: ClassVar[MessageType] = MessageType.CTL_REPLY
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str = ""


Message = (
    GetRequest
    | Request
    | CompleteRequest
    | Fault
    | FaultReply
    | Kick
    | Register
    | Registered
    | Error
    | CtlRequest
    | CtlReply
)

MESSAGE_CLASSES: dict[MessageType, Any] = {
    cls.TYPE: cls
    for cls in (
        GetRequest,
        Request,
        CompleteRequest,
        Fault,
        FaultReply,
        Kick,
        Register,
        Registered,
        Error,
        CtlRequest,
        CtlReply,
    )
}
