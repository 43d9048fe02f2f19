"""The frame that answers a control request, on the daemon's socket and on an agent's.

A result that cannot be sent (larger than a frame, or not encodable as JSON) becomes
``ok: false`` naming why: the client gets its answer at once, never a timeout (the encoder's
error used to be lost in the reply task).
"""

from __future__ import annotations

from typing import Any

import structlog

from .codec import Codec
from .errors import LocalProtocolError
from .messages import CtlReply

log = structlog.get_logger("vmmem.ctl")


def reply_frame(codec: Codec, op: str, result: dict[str, Any], request_id: int) -> bytes:
    """``CtlReply{ok: true, result}`` encoded, or the error reply when it cannot be."""
    try:
        return codec.send(CtlReply(ok=True, result=result), request_id)
    except LocalProtocolError as exc:  # the body passes max_frame
        log.warning("ctl_reply_too_large", op=op, error=str(exc))
        error = f"{op}: reply too large ({exc})"
    except Exception as exc:  # a value JSON cannot hold: our bug, still an answer
        log.exception("ctl_reply_unencodable", op=op)
        error = f"{op}: reply not encodable ({type(exc).__name__}: {exc})"
    return codec.send(CtlReply(ok=False, error=error), request_id)
