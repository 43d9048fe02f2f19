"""Asking an agent what it maps (ctl op ``exposures`` on its control socket), for the check.

The daemon's one use of an agent's control socket: ``vmmem-ctl check`` compares each
agent's exposure table with the p2m. A few lines of asyncio over the shared codec, since
the daemon does not import the agent's RPC client.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.codec import Codec
from shared.errors import ErrorCode, VMMemError
from shared.exposures import CHUNK_PAGES, Exposures
from shared.messages import CtlReply, CtlRequest, Error

#: Seconds one agent may take to answer all of its chunks.
PROBE_TIMEOUT = 10.0


async def _call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: Codec, op: str, **args: Any
) -> dict[str, Any]:
    writer.write(codec.send(CtlRequest(op=op, args=args), 1))
    while True:
        env = codec.next_event()
        if env is None:
            data = await reader.read(1 << 16)
            if not data:
                raise VMMemError("the agent closed its control socket", ErrorCode.PROTOCOL)
            codec.receive_data(data)
            continue
        msg = env.message
        if isinstance(msg, Error):
            raise VMMemError(msg.message, ErrorCode(msg.code))
        if not isinstance(msg, CtlReply):
            raise VMMemError(f"unexpected reply {type(msg).__name__}", ErrorCode.PROTOCOL)
        if not msg.ok:
            raise VMMemError(msg.error, ErrorCode.BAD_REQUEST)
        return msg.result


async def _read_exposures(path: str, guest_pages: int) -> Exposures:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 21)
    try:
        codec = Codec()
        chunks = [
            await _call(reader, writer, codec, "exposures", start=start)
            for start in range(0, max(guest_pages, 1), CHUNK_PAGES)
        ]
    finally:
        writer.close()
    return Exposures.from_chunks(guest_pages, chunks)


async def read_exposures(path: str, guest_pages: int) -> Exposures:
    """The exposure table of the agent listening on ``path``; VMMemError or OSError if it
    cannot be had within PROBE_TIMEOUT seconds."""
    try:
        return await asyncio.wait_for(_read_exposures(path, guest_pages), PROBE_TIMEOUT)
    except TimeoutError:
        raise VMMemError(f"no answer within {PROBE_TIMEOUT:.0f}s", ErrorCode.INTERNAL) from None
