"""Frame allocation: per-NUMA-node free stacks over one host-wide frame-state array.

Each node owns a contiguous MPN range. ``frame_state`` (one byte per frame) says FREE, USED
or RETIRED and catches double frees. Free frames of a node sit in a stack (a NumPy array
with a top index), so allocating or freeing a batch of n frames costs O(n), never a scan of
host memory. Retiring a free frame only marks it; the stack drops it lazily when it surfaces.

2 MiB runs (512 aligned frames, the 2 MB regions of DESIGN.md): ``run_free`` counts the free
frames of each run, kept up to date by every allocation and release (O(n) for n frames).
``allocate_run`` hands out a whole free run and ``claim_free`` takes the free frames of one
run (defrag isolates a run while it empties it, as Linux isolates a pageblock); both take
frames that sit anywhere in the stack, so they too remove them lazily: the stack keeps a
stale entry, skipped when it surfaces. A frame taken that way and freed again is in the
stack twice, so a pop drops repeats, and marks what it takes USED at once. Stale entries are
counted; when they outnumber the live ones the node's stack is rebuilt from ``frame_state``
(a scan of the node, paid for by at least as many lazy removals).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import PAGES_PER_2M
from shared.distinct import distinct, first_occurrences, has_repeats
from shared.errors import OutOfMemoryError, VMMemError

Frames = npt.NDArray[np.int64]
#: Stale stack entries a node tolerates before its stack is rebuilt (beyond its live ones):
#: at least REBUILD_SLACK, and a REBUILD_FRACTION-th of the node, so that a rebuild (a scan
#: of the node's frame states) costs at most that many reads per stale entry on any host
#: (a fixed slack made it O(node) per few runs on a big host with little free).
REBUILD_SLACK = 4096
REBUILD_FRACTION = 16
_RUN_SHIFT = PAGES_PER_2M.bit_length() - 1  # MPN >> _RUN_SHIFT is its run


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
        #: Entries below ``top`` that are not free frames any more (lazily removed).
        self.stale = 0
        #: Where ``allocate_run`` looks next (a run index), so it scans a window, not the node.
        self.run_hand = first // PAGES_PER_2M
        #: Stale entries tolerated beyond the live ones before a rebuild.
        self.slack = max(REBUILD_SLACK, (last - first) // REBUILD_FRACTION)

    def push(self, frames: Frames) -> None:
        n = len(frames)
        if self.top + n > len(self.stack):  # lazily-dropped retired entries freed room below
            # Doubled, not grown by n: growing by exactly n copied the whole stack (a copy
            # the size of the node) on nearly every release once it was full.
            grown = np.empty(max(self.top + n, 2 * len(self.stack)), dtype=np.int64)
            grown[: self.top] = self.stack[: self.top]
            self.stack = grown
        self.stack[self.top : self.top + n] = frames
        self.top += n
        self.free += n


def _per_run(ordered: Frames) -> tuple[Frames, npt.NDArray[np.int16]]:
    """The 2 MiB runs of sorted frames, and how many of the frames each holds (cheaper than
    ``np.add.at`` and ``np.unique``: the frames are sorted already)."""
    runs = ordered >> _RUN_SHIFT
    if runs[0] == runs[-1]:
        return runs[:1], np.array([len(runs)], dtype=np.int16)
    starts = np.flatnonzero(np.concatenate(([True], runs[1:] != runs[:-1])))
    return runs[starts], np.diff(np.append(starts, len(runs))).astype(np.int16)


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
        #: Per home node, the stacks in the order ``allocate_one`` looks (home node first).
        self._search = [(self._nodes[n], *self._nodes) for n in range(nodes)]
        self._node_of_block = np.repeat(
            np.arange(nodes, dtype=np.int16), [b - a for a, b in self.node_bounds]
        )
        for ns in self._nodes:  # only the frames FREE now go on the stacks, lowest on top
            self._rebuild(ns)
        #: Free frames of each 2 MiB run (a partial run at the end of memory never fills).
        self.runs = -(-host_pages // PAGES_PER_2M)
        runs_of_free = np.flatnonzero(frame_state == _FREE) // PAGES_PER_2M
        self.run_free = np.bincount(runs_of_free, minlength=self.runs).astype(np.int16)
        self.retired = int(np.count_nonzero(frame_state == _RETIRED))
        # Host-wide free count kept beside the per-node ones: read on every fault.
        self._free = sum(ns.free for ns in self._nodes)

    @property
    def free(self) -> int:
        """Free frames on the host."""
        return self._free

    @property
    def used(self) -> int:
        return self.host_pages - self._free - self.retired

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
        if n == 1:
            return np.array([self.allocate_one(node)], dtype=np.int64)
        if n > self.free:
            raise OutOfMemoryError(f"need {n} frames, {self.free} free")
        parts, need = [], n
        for idx in [node, *[i for i in range(self.nodes) if i != node]]:
            if need == 0:
                break
            got = self._pop(self._nodes[idx], need)
            parts.append(got)
            need -= len(got)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def allocate_one(self, node: int) -> int:
        """One frame, from ``node`` first and then the others, as an int: ``_pop`` of one
        frame with scalar reads and writes (the fault path's case; NumPy costs ~1 µs per
        call on a one-element array, and ``allocate(1)`` made several)."""
        if self._free < 1:
            raise OutOfMemoryError(f"need 1 frame, {self._free} free")
        # ``.item()`` reads give Python ints: indexing gives NumPy scalars, slower to use.
        state = self.frame_state
        for ns in self._search[node]:
            while ns.top > 0:
                ns.top -= 1
                mpn: int = ns.stack.item(ns.top)
                if state.item(mpn) != _FREE:  # lazily removed (retired, or taken by a run)
                    if ns.stale:
                        ns.stale -= 1
                    continue
                state[mpn] = _USED
                run = mpn >> _RUN_SHIFT
                self.run_free[run] = self.run_free.item(run) - 1
                ns.free -= 1
                self._free -= 1
                return mpn
        raise OutOfMemoryError("no free frame found on any node")  # counts disagree: a bug

    def _pop(self, ns: _NodeStack, want: int) -> Frames:
        """Up to ``want`` free frames from the top of ``ns``, marked USED."""
        out: list[Frames] = []
        got = 0
        while got < want and ns.top > 0:
            take = min(want - got, ns.top)
            chunk = ns.stack[ns.top - take : ns.top][::-1].copy()
            ns.top -= take
            # Lazily removed entries (retired, or taken by a run) are skipped; a frame taken
            # by a run and freed again is here twice: the first copy wins.
            before = len(chunk)
            chunk = chunk[self.frame_state[chunk] == _FREE]
            if ns.stale:
                if len(chunk) > 1:
                    first = first_occurrences(chunk)
                    if len(first) != len(chunk):
                        chunk = chunk[first]
                ns.stale = max(0, ns.stale - (before - len(chunk)))
            # Marked at once, so a later chunk of this pop skips a second copy of the frame.
            self.frame_state[chunk] = _USED
            self._take_from_runs(chunk)
            ns.free -= len(chunk)
            self._free -= len(chunk)
            out.append(chunk)
            got += len(chunk)
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _take_from_runs(self, frames: Frames) -> None:
        if len(frames) == 1:  # the fault path's case: no NumPy machinery
            self.run_free[int(frames[0]) >> _RUN_SHIFT] -= 1
        elif len(frames):
            runs = frames >> _RUN_SHIFT
            lo, hi = runs.min(), runs.max()
            if lo == hi:  # a chunk off the stack usually lies in one run
                self.run_free[lo] -= len(frames)
            elif len(frames) <= 64:
                np.subtract.at(self.run_free, runs, 1)
            else:  # a sort beats ufunc.at for big batches
                per_run, counts = _per_run(np.sort(frames))
                self.run_free[per_run] -= counts

    def _rebuild(self, ns: _NodeStack) -> None:
        """The node's stack from ``frame_state``: its free frames, lowest on top."""
        free = np.flatnonzero(self.frame_state[ns.first : ns.last] == _FREE) + ns.first
        ns.stack = free[::-1].astype(np.int64)
        ns.top = ns.free = len(free)
        ns.stale = 0

    def _lazily_removed(self, ns: _NodeStack, n: int) -> None:
        """``n`` frames of ``ns`` left the free pool without leaving its stack."""
        ns.free -= n
        self._free -= n
        ns.stale += n
        if ns.stale > ns.free + ns.slack:
            self._rebuild(ns)

    def release(self, frames: npt.NDArray[Any]) -> None:
        """Give back used frames; a frame not in use raises (a double free is a bug)."""
        frames = np.asarray(frames, dtype=np.int64)
        if len(frames) == 0:
            return
        # One sort serves the range check, the check for a repeated frame and the count per
        # 2 MiB run (``np.add.at`` and ``np.unique`` each cost more than the sort).
        ordered = np.sort(frames)
        self._check_sorted(ordered, "release")
        if np.any(self.frame_state[frames] != _USED):
            bad = frames[self.frame_state[frames] != _USED][:4]
            raise VMMemError(f"release of frames not in use: {bad.tolist()}")
        self.frame_state[frames] = _FREE
        self._free += len(frames)
        runs, counts = _per_run(ordered)
        self.run_free[runs] += counts
        if self.nodes == 1:
            self._nodes[0].push(frames)
            return
        nodes = self._node_of_block[frames]
        for node in distinct(nodes):
            self._nodes[int(node)].push(frames[nodes == node])

    def _check_sorted(self, ordered: Frames, what: str) -> None:
        """``_check_batch`` for frames already sorted."""
        if ordered[0] < 0 or ordered[-1] >= self.host_pages:
            raise VMMemError(f"{what} of MPNs outside 0..{self.host_pages - 1}")
        if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
            raise VMMemError(f"{what}: the same frame appears twice in one batch")

    def _check_batch(self, frames: Frames, what: str) -> None:
        """MPNs in range and distinct: NumPy would wrap a negative MPN (NO_FRAME) around to
        the last frame, and a repeated one would be counted twice."""
        if frames.min() < 0 or frames.max() >= self.host_pages:
            raise VMMemError(f"{what} of MPNs outside 0..{self.host_pages - 1}")
        if has_repeats(frames):
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
            self._lazily_removed(self._nodes[int(self._node_of_block[mpn])], 1)
            self.run_free[mpn >> _RUN_SHIFT] -= 1
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

    # ---- 2 MiB runs -------------------------------------------------------------------------

    def node_runs(self, node: int) -> tuple[int, int]:
        """The whole runs of ``node``: run indices ``first .. last-1``."""
        a, b = self.node_bounds[node]
        return -(-a // PAGES_PER_2M), b // PAGES_PER_2M

    def free_runs(self, node: int) -> int:
        """Whole 2 MiB runs of ``node`` that are all free (a scan of one count per run)."""
        first, last = self.node_runs(node)
        return int(np.count_nonzero(self.run_free[first:last] == PAGES_PER_2M))

    def find_run(self, node: int, window: int) -> int | None:
        """A free run of ``node`` among ``window`` runs from the node's hand, or None.

        The hand moves on past the window, so repeated calls cover the node: the cost of one
        call is bounded by ``window``, not by the node's size.
        """
        first, last = self.node_runs(node)
        n = last - first
        if n <= 0:
            return None
        ns = self._nodes[node]
        start = min(max(ns.run_hand, first), last - 1) - first
        idx = first + (start + np.arange(min(window, n))) % n
        full = idx[self.run_free[idx] == PAGES_PER_2M]
        if len(full):
            ns.run_hand = int(full[0])  # the next call looks here first
            return int(full[0])
        ns.run_hand = int(first + (start + min(window, n)) % n)
        return None

    def allocate_run(self, node: int, window: int = 1 << 16) -> Frames | None:
        """A whole free 2 MiB run of ``node``, 512 aligned frames marked USED; None when the
        ``window`` of runs looked at has none (defrag makes some)."""
        run = self.find_run(node, window)
        if run is None:
            return None
        frames = np.arange(run * PAGES_PER_2M, (run + 1) * PAGES_PER_2M, dtype=np.int64)
        self.frame_state[frames] = _USED
        self.run_free[run] = 0
        self._lazily_removed(self._nodes[node], PAGES_PER_2M)
        return frames

    def claim_free(self, run: int) -> Frames:
        """Take the free frames of ``run`` out of the free pool (marked USED, no owner): no
        allocation lands there while defrag empties the run. ``release`` gives them back."""
        if not 0 <= run < self.runs:
            raise VMMemError(f"run {run} out of range 0..{self.runs - 1}")
        lo = run * PAGES_PER_2M
        span = self.frame_state[lo : min(lo + PAGES_PER_2M, self.host_pages)]
        frames = np.flatnonzero(span == _FREE).astype(np.int64) + lo
        if len(frames):
            self.frame_state[frames] = _USED
            self.run_free[run] -= len(frames)
            self._lazily_removed(self._nodes[int(self._node_of_block[lo])], len(frames))
        return frames

    def counts_by_node(self) -> list[dict[str, int]]:
        """Frames by state for each node (a scan: for metrics scrapes, not hot paths)."""
        out = []
        for first, last in self.node_bounds:
            counts = np.bincount(self.frame_state[first:last], minlength=3)
            out.append({s.name.lower(): int(counts[s]) for s in FrameState})
        return out
