"""Unix sockets only their owner can use: safe paths, no window at creation, peer credentials.

Both daemons listen on Unix sockets (the platform daemon on ``--socket``, each agent on its
control socket), and whoever connects can steer memory: change the host limit, retire frames,
read a guest's pages through its agent. Three layers keep other users out:

- the path: a socket path (or its directory) that another user controls is refused, naming
  the owner, instead of being removed or reused;
- the file: the socket is bound under a umask that gives it its final mode at once. Binding
  and then ``chmod`` leaves a window where, under ``umask 000``, any user can connect (and
  stay connected after the chmod);
- the peer: every accepted connection's uid, as the kernel reports it (``SO_PEERCRED``), must
  be in the allowed set; a refused peer is logged with its pid and uid, told why, and closed.

Unlike the rest of ``shared``, this module does I/O: it is the one place both daemons create
and admit their sockets the same way.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .codec import Codec
from .errors import ErrorCode, VMMemError
from .messages import Error

#: Seconds a refused peer has to read its Error before the connection is closed anyway.
REFUSED_LINGER = 1.0
#: Bytes of sun_path, the terminating NUL included (Linux).
_SUN_PATH_MAX = 108
#: struct ucred {pid_t pid; uid_t uid; gid_t gid;} as SO_PEERCRED returns it.
_UCRED = struct.Struct("3i")


class UnsafeSocketPath(VMMemError):
    """A socket path another user controls, or a path that is not a socket."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, when it connected."""

    pid: int
    uid: int
    gid: int


def user_name(uid: int) -> str:
    """``uid 65534 (nobody)``, or just the number when the user has no name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_socket_path(path: Path) -> None:
    """Refuse a socket path that another user could control (raise UnsafeSocketPath).

    Refused: an existing path owned by another user, or one that is not a socket (it would
    be removed as a stale socket); a directory owned by another user other than root, or one
    that others may write without the sticky bit (they could swap the socket for their own).
    """
    me = os.getuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if st.st_uid != me:
            raise UnsafeSocketPath(
                f"socket path {path} is owned by {user_name(st.st_uid)}, not by this "
                f"process's {user_name(me)}: refusing to use or remove it"
            )
        if not stat.S_ISSOCK(st.st_mode):
            raise UnsafeSocketPath(f"socket path {path} exists and is not a socket")
    parent = path.parent
    dst = os.stat(parent)
    if dst.st_uid not in (me, 0):
        raise UnsafeSocketPath(
            f"socket directory {parent} is owned by {user_name(dst.st_uid)}, who could "
            "replace the socket: use a directory of your own"
        )
    if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
        raise UnsafeSocketPath(
            f"socket directory {parent} (mode {stat.S_IMODE(dst.st_mode):04o}) may be "
            "written by other users and is not sticky: they could replace the socket"
        )


def listen_private(path: Path, mode: int = 0o600, backlog: int = 100) -> socket.socket:
    """A non-blocking listening Unix socket at ``path`` whose file has ``mode`` from the moment
    it exists, and exists only once it accepts connections (pass it to
    ``loop.create_unix_server(sock=...)``).

    Why a umask: the kernel creates the socket file at ``bind()`` with ``0777 & ~umask``, and a
    socket's mode cannot be set before it exists. The umask is process-wide, but it is only
    tightened, for one system call: a file another thread creates meanwhile can only come out
    stricter, never looser.

    Why a rename: between ``bind()`` and ``listen()`` the file exists but refuses connections,
    and a client that takes the path's appearance for readiness (a supervisor, a test) fails.
    The socket is bound under a temporary name next to ``path`` and renamed into place once it
    listens (bound at ``path`` itself when the temporary name would be too long).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old)
        try:
            sock.listen(backlog)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(transport: asyncio.BaseTransport) -> PeerCredentials | None:
    """The peer of a Unix-socket transport, or None when the transport has no socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def refuse_peer(
    transport: asyncio.BaseTransport,
    peer: PeerCredentials | None,
    allowed: Collection[int],
    log: Any,
    **context: Any,
) -> None:
    """Log the refused peer (pid, uid), tell it why in an Error, and close the connection.

    The caller's protocol must drop the peer's data from now on.
    """
    log.warning(
        "peer_refused",
        peer_pid=peer.pid if peer else None,
        peer_uid=peer.uid if peer else None,
        allowed_uids=sorted(allowed),
        **context,
    )
    who = user_name(peer.uid) if peer else "a peer of unknown uid"
    error = Error(code=int(ErrorCode.BAD_REQUEST), message=f"permission denied: {who}")
    # uvloop's transports implement the interface without subclassing it.
    stream = cast(asyncio.Transport, transport)
    stream.write(Codec().send(error))
    # Half-close, not close: closing with the peer's first request still unread resets the
    # connection, and the peer would lose the Error. The protocol drops whatever it sends;
    # the connection closes at the peer's EOF, or after REFUSED_LINGER seconds at most.
    if stream.can_write_eof():
        stream.write_eof()
    asyncio.get_running_loop().call_later(REFUSED_LINGER, stream.close)


class _PeerGate(asyncio.Protocol):
    """Admits an allowed peer, then hands the transport to the real protocol; else refuses."""

    def __init__(
        self, inner: asyncio.Protocol, allowed: Collection[int], log: Any, context: dict[str, Any]
    ) -> None:
        self.inner = inner
        self.allowed = allowed
        self.log = log
        self.context = context

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = peer_credentials(transport)
        if peer is None or peer.uid not in self.allowed:
            refuse_peer(transport, peer, self.allowed, self.log, **self.context)
            return
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """A refused peer's bytes are dropped unread."""

    def connection_lost(self, exc: Exception | None) -> None:
        """Nothing was set up for a refused peer."""


def allowed_peers_only(
    factory: Callable[[], asyncio.Protocol],
    log: Any,
    allowed: Collection[int] | None = None,
    **context: Any,
) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for ``create_unix_server`` that admits only peers whose uid is in
    ``allowed`` (default: this process's own user)."""
    uids = frozenset(allowed) if allowed is not None else frozenset({os.getuid()})
    return lambda: _PeerGate(factory(), uids, log, context)
