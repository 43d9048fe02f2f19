"""A blocking control client for ``vmmem-ctl``: one CtlRequest, one CtlReply, over the codec.

The command line needs no event loop and must not borrow the agent's RPC client (the two
daemons share only ``shared/``), so this is the few lines of socket code it needs.
"""

from __future__ import annotations

import socket
from typing import Any

from shared.codec import Codec
from shared.errors import ErrorCode, VMMemError
from shared.messages import CtlReply, CtlRequest, Error


class CtlError(VMMemError):
    """The daemon refused the request (``ok: false`` or an Error message)."""


class CtlClient:
    """A connection to a daemon's socket for control requests, answered in order."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.codec = Codec()
        self._next_id = 1

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send ``op`` and wait for its reply; raise CtlError if it failed."""
        rid, self._next_id = self._next_id, self._next_id + 1
        self.sock.sendall(self.codec.send(CtlRequest(op=op, args=args), rid))
        while True:
            env = self.codec.next_event()
            if env is None:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise CtlError("the daemon closed the connection", ErrorCode.PROTOCOL)
                self.codec.receive_data(data)
                continue
            if env.request_id != rid:
                continue  # unsolicited (e.g. a Kick): not for us
            msg = env.message
            if isinstance(msg, Error):
                raise CtlError(msg.message, ErrorCode(msg.code))
            if not isinstance(msg, CtlReply):
                raise CtlError(f"unexpected reply {type(msg).__name__}", ErrorCode.PROTOCOL)
            if not msg.ok:
                raise CtlError(msg.error, ErrorCode.BAD_REQUEST)
            return msg.result

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
