"""The daemon's state in files, so that a daemon started after a crash can take over.

Everything a new daemon needs to serve the same VMs lives in the memory directory, in files
named after the daemon's socket (one set per socket, so a restart on the same socket finds
them and daemons on other sockets never touch them):

- ``vmmem-<tag>.machine``: machine memory, the guests' bytes (already a shared file);
- ``vmmem-<tag>.state``: one header, then per-frame arrays (allocator state, frames marked
  failing, page sharing's bookkeeping) and the checksum of every swap slot;
- ``vmmem-<tag>-vm<N>.p2m``: one per VM: a header with the VM's registration, then its p2m;
- ``vmmem-<tag>-vm<N>.region``: the VM's control region.

The arrays are the daemon's working arrays themselves, mapped from these files: a store is
in the file the moment it is made, so a crashed process (SIGKILL, a bug) loses nothing it
had done. Nothing is copied or flushed on the hot paths. What a crash can leave is an
operation cut between two stores; ``recovery.py`` resolves every such cut, because each
operation orders its stores so that data is never unreferenced while still needed (a frame
is freed only after no p2m entry points at it, a p2m entry points at a swap slot only after
its write returned).

Headers are written rarely (registration, startup) and carry a magic, a version, the
geometry and an xxh3 checksum, so a torn or foreign file is refused by name instead of
being trusted. The state file's header also holds a generation, incremented by every daemon
that opens it. The daemon holds an exclusive ``flock`` on the state file while it runs: a
second daemon cannot adopt the files of a live one.

A host crash loses the memory directory (it is RAM) and with it the guests; this is about
the daemon process, as a hypervisor's per-host service restarts under running VMs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.constants import NO_FRAME, PAGE_SIZE
from shared.errors import ErrorCode, VMMemError
from shared.messages import Register
from shared.shm import MappedFile, create_mapped, open_mapped

from .p2m import P2M

HEADER_SIZE = PAGE_SIZE
STATE_MAGIC = b"VMMEMST1"
P2M_MAGIC = b"VMMEMP2M"
#: Of the state file and the p2m files alike; a daemon takes over files of its own version
#: only. 3: the p2m's frame and swap slot columns became int32 (``P2M.FIELDS``).
FORMAT_VERSION = 3
#: What a refusal of another version's files tells the operator.
_OTHER_VERSION = "left by another version of the daemon: start it with --fresh to discard them"
MAX_NODES = 64
_SWAP_PATH_BYTES = 1024
_REGISTER_BYTES = 2048
# magic, version, nodes, host_pages, swap_slots, generation, next_vm_id, next_vm_generation,
# pid, host limit, zero frames, swap file path; the xxh3 of these bytes follows.
_STATE_HEADER = struct.Struct(f"<8sIIQQQQQQQ{MAX_NODES}q{_SWAP_PATH_BYTES}s")
# magic, version, vm_id, generation, guest_pages, home_node, the agent's generation and
# process start time, register JSON length, JSON.
_P2M_HEADER = struct.Struct(f"<8sIxxxxQQQqQQI{_REGISTER_BYTES}s")
_CHECKSUM = struct.Struct("<Q")


class StateError(VMMemError):
    """State files that cannot be trusted or do not match this daemon's configuration."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.BAD_REQUEST)


class UnfinishedStateError(StateError):
    """A file whose header was never written: its daemon died while creating it."""


def _align(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def state_tag(socket: Path) -> str:
    """A short name for a socket path: the files of the daemon serving it carry it."""
    resolved = str(socket.parent.resolve() / socket.name)
    return hashlib.sha256(resolved.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StatePaths:
    """Where the files of the daemon serving one socket live."""

    mem_dir: Path
    tag: str

    @classmethod
    def for_socket(cls, mem_dir: Path, socket: Path) -> StatePaths:
        return cls(mem_dir, state_tag(socket))

    @property
    def machine(self) -> Path:
        return self.mem_dir / f"vmmem-{self.tag}.machine"

    @property
    def state(self) -> Path:
        return self.mem_dir / f"vmmem-{self.tag}.state"

    def p2m(self, vm_id: int) -> Path:
        return self.mem_dir / f"vmmem-{self.tag}-vm{vm_id}.p2m"

    def region(self, vm_id: int) -> Path:
        return self.mem_dir / f"vmmem-{self.tag}-vm{vm_id}.region"

    def existing(self) -> list[Path]:
        """Every file of this set present now."""
        return sorted(self.mem_dir.glob(f"vmmem-{self.tag}.*")) + sorted(
            self.mem_dir.glob(f"vmmem-{self.tag}-vm*")
        )

    def p2m_files(self) -> list[tuple[int, Path]]:
        """(vm id, path) of the p2m files present, by VM id."""
        out = []
        for path in self.mem_dir.glob(f"vmmem-{self.tag}-vm*.p2m"):
            digits = path.name[len(f"vmmem-{self.tag}-vm") : -len(".p2m")]
            if digits.isdigit():
                out.append((int(digits), path))
        return sorted(out)

    def remove_all(self) -> list[str]:
        """Remove every file of this set; returns their names."""
        names = []
        for path in self.existing():
            path.unlink(missing_ok=True)
            names.append(path.name)
        return names


@dataclass
class StateHeader:
    nodes: int
    host_pages: int
    swap_slots: int
    generation: int
    next_vm_id: int
    #: VM generations are unique across daemons: an agent's old one never matches again.
    next_vm_generation: int
    pid: int
    #: The host limit (``vmmem-ctl set-host-limit``) in frames.
    limit_pages: int
    zero_frames: list[int]
    swap_path: str


class StateFile:
    """The host-wide state file: header plus per-frame and per-slot arrays, all mapped."""

    def __init__(self, path: Path, mapped: MappedFile, lock_fd: int, header: StateHeader) -> None:
        self.path = path
        self.mapped = mapped
        self._lock_fd = lock_fd
        self.header = header
        #: The daemon that left this file (when it was taken over).
        self.previous_pid = 0
        hp, slots = header.host_pages, header.swap_slots
        buf, off = mapped.mm, HEADER_SIZE
        self.frame_state: npt.NDArray[np.uint8] = np.frombuffer(buf, np.uint8, hp, off)
        off += _align(hp)
        self.failing: npt.NDArray[np.bool_] = np.frombuffer(buf, np.bool_, hp, off)
        off += _align(hp)
        self.shared_origin: npt.NDArray[np.int32] = np.frombuffer(buf, np.int32, hp, off)
        off += _align(4 * hp)
        self.shared_joined: npt.NDArray[np.bool_] = np.frombuffer(buf, np.bool_, hp, off)
        off += _align(hp)
        self.swap_checksum: npt.NDArray[np.uint64] = np.frombuffer(buf, np.uint64, slots, off)

    @staticmethod
    def size(host_pages: int, swap_slots: int) -> int:
        return (
            HEADER_SIZE + 3 * _align(host_pages) + _align(4 * host_pages) + _align(8 * swap_slots)
        )

    @classmethod
    def create(
        cls, path: Path, *, host_pages: int, nodes: int, swap_slots: int, swap_path: str
    ) -> StateFile:
        """A new state file (any old one at ``path`` is replaced), locked, generation 1."""
        lock_fd = lock_file(path, create=True)
        try:
            mapped = create_mapped(path, cls.size(host_pages, swap_slots))
            header = StateHeader(
                nodes, host_pages, swap_slots, 1, 1, 1, os.getpid(), host_pages, [], swap_path
            )
            state = cls(path, mapped, lock_fd, header)
            state.shared_origin[:] = -1
            state.write_header()
        except BaseException:
            os.close(lock_fd)
            raise
        return state

    @classmethod
    def open(cls, path: Path) -> StateFile:
        """Adopt the state file a previous daemon left; raises StateError if untrustworthy."""
        lock_fd = lock_file(path, create=False)
        try:
            mapped = open_mapped(path)
            header = _read_state_header(path, mapped.mm)
            expected = cls.size(header.host_pages, header.swap_slots)
            if len(mapped.mm) != expected:
                actual = len(mapped.mm)  # read before the mapping is closed
                mapped.close()
                raise StateError(f"{path}: {actual} bytes, its header says {expected}")
            state = cls(path, mapped, lock_fd, header)
            state.previous_pid = header.pid
            header.generation += 1
            header.pid = os.getpid()
            state.write_header()
        except BaseException:
            os.close(lock_fd)
            raise
        return state

    def write_header(self) -> None:
        h = self.header
        zero = h.zero_frames + [NO_FRAME] * (MAX_NODES - len(h.zero_frames))
        body = _STATE_HEADER.pack(
            STATE_MAGIC,
            FORMAT_VERSION,
            h.nodes,
            h.host_pages,
            h.swap_slots,
            h.generation,
            h.next_vm_id,
            h.next_vm_generation,
            h.pid,
            h.limit_pages,
            *zero,
            h.swap_path.encode()[:_SWAP_PATH_BYTES],
        )
        _store_header(self.mapped.mm, body)

    def close(self, unlink: bool) -> None:
        for name in ("frame_state", "failing", "shared_origin", "shared_joined", "swap_checksum"):
            setattr(self, name, None)
        self.mapped.close()
        if unlink:
            self.mapped.unlink()
        os.close(self._lock_fd)


def _store_header(mm: Any, body: bytes) -> None:
    """Body and checksum in one store (one memcpy into the mapping).

    Why: stored apart, a daemon killed between the two stores (a window that includes
    the GIL going to the swap writer's thread) left a checksum that matches neither the
    old body nor the new one, and the next daemon refused the whole takeover. These headers
    are rewritten while VMs run: two counters per registration, the host limit, a zero frame
    retired, every takeover. Only a kill inside the copy itself can still tear one.
    """
    mm[: len(body) + _CHECKSUM.size] = body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def lock_file(path: Path, create: bool) -> int:
    """An exclusive flock on ``path`` for this daemon's life (the fd stays open)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{path} is held by a running daemon") from None
    return fd


def _read_state_header(path: Path, buf: Any) -> StateHeader:
    if len(buf) < HEADER_SIZE:
        raise StateError(f"{path}: too short for a state header")
    body = bytes(buf[: _STATE_HEADER.size])
    (stored,) = _CHECKSUM.unpack_from(buf, _STATE_HEADER.size)
    fields = _STATE_HEADER.unpack(body)
    if fields[0] == bytes(len(STATE_MAGIC)):
        raise UnfinishedStateError(f"{path}: its header was never written")
    if fields[0] != STATE_MAGIC:
        raise StateError(f"{path}: not a VMMem state file")
    if fields[1] != FORMAT_VERSION:
        raise StateError(
            f"{path}: state format {fields[1]}, this daemon reads {FORMAT_VERSION} "
            f"({_OTHER_VERSION})"
        )
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise StateError(f"{path}: header checksum mismatch (a torn or damaged file)")
    nodes, host_pages, swap_slots, generation, next_vm_id, next_gen, pid, limit = fields[2:10]
    if not 1 <= nodes <= MAX_NODES:
        raise StateError(f"{path}: {nodes} NUMA nodes in the header")
    zero = [int(z) for z in fields[10 : 10 + nodes]]
    swap_path = fields[10 + MAX_NODES].rstrip(b"\0").decode()
    return StateHeader(
        nodes, host_pages, swap_slots, generation, next_vm_id, next_gen, pid, limit, zero, swap_path
    )


# ---- one VM's p2m ------------------------------------------------------------------------


@dataclass
class P2MHeader:
    vm_id: int
    generation: int
    guest_pages: int
    home_node: int
    info: Register
    #: The generation the agent was given (it names it to resume): behind ``generation``
    #: while a daemon that took the VM over waits for the agent, through further crashes.
    agent_generation: int = 0
    #: Start time of the agent's process (agent_process.start_time; 0: not known).
    agent_started: int = 0

    def __post_init__(self) -> None:
        if self.agent_generation == 0:
            self.agent_generation = self.generation


class P2MFile:
    """One VM's p2m in a file: a checksummed header with its registration, then the arrays."""

    def __init__(self, path: Path, mapped: MappedFile, header: P2MHeader) -> None:
        self.path = path
        self.mapped = mapped
        self.header = header
        self.p2m = P2M(header.guest_pages, buffer=mapped.mm, offset=HEADER_SIZE)

    @staticmethod
    def size(guest_pages: int) -> int:
        return HEADER_SIZE + _align(P2M.buffer_size(guest_pages))

    @classmethod
    def create(cls, path: Path, header: P2MHeader) -> P2MFile:
        info = header.info.model_dump_json().encode()
        if len(info) > _REGISTER_BYTES:
            raise VMMemError(f"registration of {len(info)} bytes does not fit the p2m header")
        mapped = create_mapped(path, cls.size(header.guest_pages))
        f = cls(path, mapped, header)
        f.p2m.reset()
        f.write_header()
        return f

    @classmethod
    def open(cls, path: Path) -> P2MFile:
        mapped = open_mapped(path)
        try:
            header = _read_p2m_header(path, mapped.mm)
            if len(mapped.mm) != cls.size(header.guest_pages):
                raise StateError(f"{path}: size does not match {header.guest_pages} guest pages")
        except BaseException:
            mapped.close()
            raise
        return cls(path, mapped, header)

    def write_header(self) -> None:
        h = self.header
        info = h.info.model_dump_json().encode()
        body = _P2M_HEADER.pack(
            P2M_MAGIC,
            FORMAT_VERSION,
            h.vm_id,
            h.generation,
            h.guest_pages,
            h.home_node,
            h.agent_generation,
            h.agent_started,
            len(info),
            info,
        )
        _store_header(self.mapped.mm, body)

    def close(self, unlink: bool) -> None:
        """Unmap (the p2m's arrays become read-only placeholders first) and maybe remove."""
        self.p2m.detach()
        self.mapped.close()
        if unlink:
            self.mapped.unlink()


def _read_p2m_header(path: Path, buf: Any) -> P2MHeader:
    if len(buf) < HEADER_SIZE:
        raise StateError(f"{path}: too short for a p2m header")
    body = bytes(buf[: _P2M_HEADER.size])
    (stored,) = _CHECKSUM.unpack_from(buf, _P2M_HEADER.size)
    (
        magic,
        version,
        vm_id,
        generation,
        guest_pages,
        home_node,
        agent_generation,
        started,
        n,
        info,
    ) = _P2M_HEADER.unpack(body)
    if magic == bytes(len(P2M_MAGIC)):
        raise UnfinishedStateError(f"{path}: its header was never written")
    if magic != P2M_MAGIC:
        raise StateError(f"{path}: not a VMMem p2m file")
    if version != FORMAT_VERSION:
        raise StateError(
            f"{path}: p2m format {version}, this daemon reads {FORMAT_VERSION} ({_OTHER_VERSION})"
        )
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise StateError(f"{path}: header checksum mismatch (a torn or damaged file)")
    try:
        register = Register.model_validate_json(info[:n])
    except ValueError as exc:
        raise StateError(f"{path}: registration does not parse: {exc}") from None
    if register.guest_pages != guest_pages:
        raise StateError(f"{path}: registration and header disagree on the guest size")
    return P2MHeader(vm_id, generation, guest_pages, home_node, register, agent_generation, started)
