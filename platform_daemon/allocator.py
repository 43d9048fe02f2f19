"""Frame allocation: per-NUMA-node free stacks over one host-wide frame-state array.

Each node owns a contiguous MPN range. ``frame_state`` (one byte per frame) says FREE, USED
or RETIRED and catches double frees. Free frames of a node sit in a stack (a NumPy array
with a top index), so allocating or freeing a batch of n frames costs O(n), never a scan of
host memory. Retiring a free frame only marks it; the stack drops it lazily when it surfaces.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import OutOfMemoryError, VMMemError

Frames = npt.NDArray[np.int64]


class FrameState(IntEnum):
    """Host-side state of one frame."""

    FREE = 0
    USED = 1
    RETIRED = 2


# Plain ints for comparisons with NumPy values: comparing NumPy data with an IntEnum member
# costs microseconds on Python 3.11 (NumPy probes the enum class for array attributes).
_FREE, _USED, _RETIRED = int(FrameState.FREE), int(FrameState.USED), int(FrameState.RETIRED)


class _NodeStack:
    """Free MPNs of one node; the top of the stack is ``stack[top-1]``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        # Reversed so that the lowest MPNs are handed out first (nicer to read in tests).
        self.stack: Frames = np.arange(last - 1, first - 1, -1, dtype=np.int64)
        self.top = len(self.stack)
        self.free = len(self.stack)

    def push(self, frames: Frames) -> None:
        n = len(frames)
        if self.top + n > len(self.stack):  # lazily-dropped retired entries freed room below
            grown = np.empty(self.top + n, dtype=np.int64)
            grown[: self.top] = self.stack[: self.top]
            self.stack = grown
        self.stack[self.top : self.top + n] = frames
        self.top += n
        self.free += n


class FrameAllocator:
    """Hands out and takes back frames of ``host_pages``, split into ``nodes`` NUMA nodes."""

    def __init__(
        self, host_pages: int, nodes: int, frame_state: npt.NDArray[np.uint8] | None = None
    ) -> None:
        """``frame_state``: an array to keep the state in (a mapped state file, so a daemon
        started after a crash finds it); its FREE/USED/RETIRED values are adopted as they are.
        """
        if nodes < 1 or host_pages < nodes:
            raise ValueError(f"cannot split {host_pages} frames into {nodes} nodes")
        self.host_pages = host_pages
        self.nodes = nodes
        bounds = np.linspace(0, host_pages, nodes + 1).astype(np.int64)
        # Align node boundaries to 2 MB regions when memory allows it.
        if host_pages >= 512 * nodes:
            bounds[1:-1] = (bounds[1:-1] // 512) * 512
        self.node_bounds: list[tuple[int, int]] = [
            (int(bounds[i]), int(bounds[i + 1])) for i in range(nodes)
        ]
        if frame_state is None:
            frame_state = np.zeros(host_pages, dtype=np.uint8)
        elif len(frame_state) != host_pages:
            raise ValueError(f"frame state of {len(frame_state)} frames for {host_pages}")
        self.frame_state = frame_state
        self._nodes = [_NodeStack(a, b) for a, b in self.node_bounds]
        self._node_of_block = np.repeat(
            np.arange(nodes, dtype=np.int16), [b - a for a, b in self.node_bounds]
        )
        for ns in self._nodes:  # only the frames FREE now go on the stacks, lowest on top
            free = np.flatnonzero(frame_state[ns.first : ns.last] == _FREE) + ns.first
            ns.stack = free[::-1].astype(np.int64)
            ns.top = ns.free = len(free)
        self.retired = int(np.count_nonzero(frame_state == _RETIRED))
        # Host-wide free count kept beside the per-node ones: read on every fault.
        self._free = sum(ns.free for ns in self._nodes)

    @property
    def free(self) -> int:
        """Free frames on the host."""
        return self._free

    @property
    def used(self) -> int:
        return self.host_pages - self.free - self.retired

    def free_on(self, node: int) -> int:
        return self._nodes[node].free

    def node_of(self, mpns: npt.NDArray[Any]) -> npt.NDArray[np.int16]:
        """NUMA node of each MPN."""
        nodes: npt.NDArray[np.int16] = self._node_of_block[mpns]
        return nodes

    def allocate(self, n: int, node: int) -> Frames:
        """``n`` frames, from ``node`` first and then the others; all or nothing."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if n > self.free:
            raise OutOfMemoryError(f"need {n} frames, {self.free} free")
        parts, need = [], n
        for idx in [node, *[i for i in range(self.nodes) if i != node]]:
            if need == 0:
                break
            got = self._pop(self._nodes[idx], need)
            parts.append(got)
            need -= len(got)
        frames = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.frame_state[frames] = _USED
        return frames

    def _pop(self, ns: _NodeStack, want: int) -> Frames:
        out: list[Frames] = []
        got = 0
        while got < want and ns.top > 0:
            take = min(want - got, ns.top)
            chunk = ns.stack[ns.top - take : ns.top][::-1].copy()
            ns.top -= take
            # Frames retired while free are skipped here (lazy removal).
            chunk = chunk[self.frame_state[chunk] == _FREE]
            ns.free -= len(chunk)
            self._free -= len(chunk)
            out.append(chunk)
            got += len(chunk)
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def release(self, frames: npt.NDArray[Any]) -> None:
        """Give back used frames; a frame not in use raises (a double free is a bug)."""
        frames = np.asarray(frames, dtype=np.int64)
        if len(frames) == 0:
            return
        self._check_batch(frames, "release")
        if np.any(self.frame_state[frames] != _USED):
            bad = frames[self.frame_state[frames] != _USED][:4]
            raise VMMemError(f"release of frames not in use: {bad.tolist()}")
        self.frame_state[frames] = _FREE
        self._free += len(frames)
        nodes = self._node_of_block[frames]
        for node in np.unique(nodes):
            self._nodes[int(node)].push(frames[nodes == node])

    def _check_batch(self, frames: Frames, what: str) -> None:
        """MPNs in range and distinct: NumPy would wrap a negative MPN (NO_FRAME) around to
        the last frame, and a repeated one would be counted twice."""
        if frames.min() < 0 or frames.max() >= self.host_pages:
            raise VMMemError(f"{what} of MPNs outside 0..{self.host_pages - 1}")
        if len(np.unique(frames)) != len(frames):
            raise VMMemError(f"{what}: the same frame appears twice in one batch")

    def retire(self, mpn: int) -> bool:
        """Take ``mpn`` out of use forever; True if it was free (nothing else to do)."""
        if not 0 <= mpn < self.host_pages:
            raise VMMemError(f"MPN {mpn} out of range 0..{self.host_pages - 1}")
        state = self.frame_state[mpn]
        if state == _RETIRED:
            return False
        was_free = state == _FREE
        self.frame_state[mpn] = _RETIRED
        self.retired += 1
        if was_free:
            self._nodes[int(self._node_of_block[mpn])].free -= 1
            self._free -= 1
        return bool(was_free)

    def retire_used(self, mpns: npt.NDArray[Any]) -> None:
        """Mark used frames (already emptied by their owner) retired instead of freeing them."""
        mpns = np.asarray(mpns, dtype=np.int64)
        if len(mpns) == 0:
            return
        self._check_batch(mpns, "retire_used")
        if np.any(self.frame_state[mpns] != _USED):
            raise VMMemError("retire_used of frames not in use")
        self.frame_state[mpns] = _RETIRED
        self.retired += len(mpns)

    def counts_by_node(self) -> list[dict[str, int]]:
        """Frames by state for each node (a scan: for metrics scrapes, not hot paths)."""
        out = []
        for first, last in self.node_bounds:
            counts = np.bincount(self.frame_state[first:last], minlength=3)
            out.append({s.name.lower(): int(counts[s]) for s in FrameState})
        return out
