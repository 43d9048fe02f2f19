"""Bytes of NumPy arrays an object holds: how much metadata a daemon keeps per guest page.

The scale benchmark asks each process what its per-VM structures cost. Rather than each
module declaring its own size (which drifts), this walks the objects and sums the memory
their arrays cover. Views of one buffer are counted once (the union of their address
ranges); memory that is not metadata (the machine's frames, a guest's own pages) is named
by the caller and left out. Only the project's own objects and plain containers are walked:
never a library's internals, and never the classes the caller says lead elsewhere (the
server, the connection), so a walk from one VM stays within that VM.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import numpy as np

PACKAGES = ("shared.", "platform_daemon.", "vmm_agent.")
_CONTAINERS = (list, tuple, set, frozenset, collections.deque)


def _children(obj: Any) -> Iterable[Any]:
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, _CONTAINERS):
        yield from obj
    else:
        if hasattr(obj, "__dict__"):
            yield from vars(obj).values()
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    yield getattr(obj, name)


def _walkable(obj: Any, skip: tuple[type, ...]) -> bool:
    if isinstance(obj, skip):
        return False
    if isinstance(obj, (dict, *_CONTAINERS)):
        return True
    return type(obj).__module__.startswith(PACKAGES)


def array_ranges(
    roots: Iterable[Any], skip: tuple[type, ...] = (), max_depth: int = 8
) -> list[tuple[int, int]]:
    """Address ranges [start, end) of every array reachable from ``roots``."""
    ranges: list[tuple[int, int]] = []
    seen: set[int] = set()
    stack = [(root, 0) for root in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            if obj.nbytes:
                start = int(obj.__array_interface__["data"][0])
                ranges.append((start, start + obj.nbytes))
            continue
        if depth >= max_depth or not _walkable(obj, skip):
            continue
        stack.extend((child, depth + 1) for child in _children(obj))
    return ranges


def covered_bytes(
    ranges: Iterable[tuple[int, int]], exclude: Iterable[tuple[int, int]] = ()
) -> int:
    """Bytes covered by the union of ``ranges``, less what falls in ``exclude``."""
    total, end = 0, -1
    for lo, hi in sorted(ranges):
        if hi <= end:
            continue
        lo = max(lo, end)
        total += hi - lo
        end = hi
    cut = 0
    merged = sorted(ranges)
    for ex_lo, ex_hi in exclude:
        cut += covered_bytes(
            [(max(lo, ex_lo), min(hi, ex_hi)) for lo, hi in merged if lo < ex_hi and hi > ex_lo]
        )
    return total - cut


def array_bytes(
    roots: Iterable[Any],
    skip: tuple[type, ...] = (),
    exclude: Iterable[np.ndarray[Any, Any]] = (),
) -> int:
    """Bytes of the arrays reachable from ``roots``, each byte once; the buffers of the
    ``exclude`` arrays (guest memory) and anything inside them are not counted."""
    cut = []
    for arr in exclude:
        start = int(arr.__array_interface__["data"][0])
        cut.append((start, start + arr.nbytes))
    return covered_bytes(array_ranges(roots, skip), cut)
