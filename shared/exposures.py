"""An agent's exposure table, as the daemon's invariant check reads it (ctl op ``exposures``).

The daemon cannot see what an agent maps: ``vmmem-ctl check`` asks each agent through its
control socket and compares the answer with the p2m. The answer covers one range of BPNs
(``start``, at most ``CHUNK_PAGES`` pages, so that a reply stays far below the codec's frame
limit) in three fields:

- ``frames``: the frame each page is mapped to, hidden mappings included (``-1``: none),
  little-endian int64, zlib-compressed, base64;
- ``writable``: one bit per page (``numpy.packbits``), compressed the same way;
- ``faulting``: the BPNs of the range with a fault on the wire. A reply may already be in the
  daemon's p2m and not yet in the table, or the other way round: the check skips them.

Pure code: the agent encodes, the daemon decodes; neither needs the other's modules.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, VMMemError

#: Pages per ``exposures`` reply: 64 Ki int64 frames are 512 KiB before compression, so even
#: incompressible content (base64 adds a third) fits in one 1 MiB frame.
CHUNK_PAGES = 1 << 16


class MappedPages(Protocol):
    """What ``exposures_chunk`` reads of the agent's exposure table."""

    guest_pages: int

    def mapped_frame(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]: ...

    def mapped_writable(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]: ...


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1)).decode("ascii")


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))


def exposures_chunk(
    table: MappedPages, faulting: Collection[int], args: Mapping[str, Any]
) -> dict[str, Any]:
    """The agent's answer to ``exposures {start}``: its mappings of one range of BPNs."""
    start = args.get("start", 0)
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= table.guest_pages:
        raise VMMemError(
            f"start must be an integer in 0..{table.guest_pages}", ErrorCode.BAD_REQUEST
        )
    end = min(table.guest_pages, start + CHUNK_PAGES)
    idx = np.arange(start, end, dtype=np.int64)
    frames = table.mapped_frame(idx).astype("<i8")
    writable = np.packbits(table.mapped_writable(idx))
    return {
        "guest_pages": table.guest_pages,
        "start": start,
        "count": end - start,
        "frames": _pack(frames.tobytes()),
        "writable": _pack(writable.tobytes()),
        "faulting": sorted(b for b in faulting if start <= b < end),
    }


@dataclass
class Exposures:
    """One agent's whole exposure table as decoded by the daemon."""

    frame: npt.NDArray[np.int64]  # per BPN, -1 where the agent maps nothing
    writable: npt.NDArray[np.bool_]
    faulting: npt.NDArray[np.int64]  # BPNs with a fault on the wire when they were read

    @classmethod
    def from_chunks(cls, guest_pages: int, chunks: list[dict[str, Any]]) -> Exposures:
        """Assemble the replies for consecutive ranges; a malformed one raises VMMemError."""
        frame = np.full(guest_pages, -1, dtype=np.int64)
        writable = np.zeros(guest_pages, dtype=bool)
        faulting: list[int] = []
        covered = 0
        try:
            for c in chunks:
                start, count = int(c["start"]), int(c["count"])
                if start != covered or count < 0 or start + count > guest_pages:
                    raise ValueError(f"chunk {start}+{count} out of order or range")
                frame[start : start + count] = np.frombuffer(_unpack(c["frames"]), "<i8", count)
                bits = np.frombuffer(_unpack(c["writable"]), np.uint8)
                writable[start : start + count] = np.unpackbits(bits, count=count).astype(bool)
                faulting.extend(int(b) for b in c["faulting"])
                covered += count
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise VMMemError(f"malformed exposures reply: {exc}", ErrorCode.BAD_BODY) from None
        if covered != guest_pages:
            raise VMMemError(
                f"exposures cover {covered} of {guest_pages} pages", ErrorCode.BAD_BODY
            )
        return cls(frame, writable, np.array(faulting, dtype=np.int64))
