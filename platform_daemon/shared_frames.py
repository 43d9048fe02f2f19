"""Frames mapped read-only into several guest pages, and the content table of page sharing.

Two kinds of frame are shared:

- the zero frame of each node (``MachineMemory.zero_frame``): permanent, never counted,
  mapped by reads of untouched pages and by page sharing's merges of zero pages;
- merged frames: page sharing found pages of identical content, kept one frame for all of
  them and freed the others. Each merged frame has a reference count (the pages that map
  it) and its content hash is in ``by_hash``, so the next page with that content merges in
  with one lookup and one full compare. The frame is freed with its last sharer.

A page mapping a shared frame has ``FLAG_SHARED`` in its p2m flags (a write must copy it
first); pages mapped there by a merge also have ``FLAG_MERGED``, so statistics tell them
from untouched pages that were only read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from shared.distinct import distinct_counts

from .machine import MachineMemory
from .p2m import FLAG_MERGED, P2M

#: owner_vm value of merged frames: many pages, possibly of many VMs, map them.
SHARED_OWNER = -3


class SharedFrames:
    """Reference counts and the content-hash table of merged frames."""

    def __init__(
        self,
        machine: MachineMemory,
        *,
        origin: npt.NDArray[np.int32] | None = None,
        joined: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """``origin``/``joined``: arrays to keep those in (a mapped state file, so that a
        daemon started after a crash still knows them; ``adopt`` rebuilds the rest)."""
        self.machine = machine
        n = machine.host_pages
        self.refs = np.zeros(n, dtype=np.int32)
        #: The merged frame has had two sharers or more (a new one waits for its partner).
        self.joined = np.zeros(n, dtype=bool) if joined is None else joined
        #: For a new merged frame: the scan pass of its first sharer's VM when it was made.
        self.born = np.zeros(n, dtype=np.int64)
        #: The VM whose page a merged frame was (its frame became the shared one).
        self.origin = np.full(n, -1, dtype=np.int32) if origin is None else origin
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        #: Merged frames currently in use (refs > 0).
        self.frames = 0
        self._keys: npt.NDArray[np.uint64] | None = None  # sorted by_hash keys, when current

    def adopt(self, refs: npt.NDArray[np.int32]) -> None:
        """After a crash: the merged frames and their sharers, counted from the p2ms.

        Their content hashes are computed again (one xxh3 per merged frame), so the next
        page with the same content still merges in with one lookup.
        """
        merged = np.flatnonzero(refs > 0)
        self.refs[:] = refs
        self.frames = len(merged)
        self.joined[refs == 0] = False
        self.joined[refs >= 2] = True
        self.origin[refs == 0] = -1
        self.machine.owner_vm[merged] = SHARED_OWNER
        self.machine.owner_bpn[merged] = -1
        self.by_hash.clear()
        self.hash_of.clear()
        frames = self.machine.frames
        for mpn in merged.tolist():
            h = xxhash.xxh3_64_intdigest(frames[mpn].data)
            if h not in self.by_hash:
                self.by_hash[h] = mpn
                self.hash_of[mpn] = h
        self._keys = None

    def lookup(self, content_hash: int) -> int | None:
        """The merged frame holding content with this hash, if any (compare before use)."""
        return self.by_hash.get(content_hash)

    def hash_keys(self) -> npt.NDArray[np.uint64]:
        """The content hashes of merged frames, sorted (cached until the table changes), so a
        scan tests a whole batch of hashes against the table at once."""
        if self._keys is None:
            self._keys = np.sort(
                np.fromiter(self.by_hash, dtype=np.uint64, count=len(self.by_hash))
            )
        return self._keys

    def in_table(self, hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Which of ``hashes`` are the content hash of a merged frame."""
        keys = self.hash_keys()
        if len(keys) == 0:
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
        found: npt.NDArray[np.bool_] = keys[at] == hashes
        return found

    def is_merged(self, mpn: int) -> bool:
        return bool(self.refs[mpn] > 0)

    def is_shared(self, mpn: int) -> bool:
        """A zero frame or a merged frame: mapped read-only, written only through COW."""
        return self.refs[mpn] > 0 or mpn in self.machine.zero_frames

    def create(self, mpn: int, content_hash: int, sharers: int) -> None:
        """Turn the used frame ``mpn`` into a merged frame mapped by ``sharers`` pages."""
        self.origin[mpn] = self.machine.owner_vm[mpn]
        self.refs[mpn] = sharers
        self.joined[mpn] = sharers >= 2
        self.frames += 1
        self.machine.owner_vm[mpn] = SHARED_OWNER
        self.machine.owner_bpn[mpn] = -1
        # A colliding hash keeps its first frame: the newcomer is still shared, only not
        # findable (the full compare decides every merge, so a collision costs nothing else).
        if content_hash not in self.by_hash:
            self.by_hash[content_hash] = mpn
            self.hash_of[mpn] = content_hash
            self._keys = None

    def ref(self, mpn: int, n: int = 1) -> None:
        self.refs[mpn] += n
        self.joined[mpn] = True

    def unref(self, mpns: npt.NDArray[Any]) -> None:
        """One sharer of each listed frame (repeats allowed) is gone; free emptied frames."""
        mpns = np.asarray(mpns, dtype=np.int64)
        if len(mpns) == 0:
            return
        uniq, counts = distinct_counts(mpns)
        if np.any(self.refs[uniq] < counts):
            raise ValueError("unref of a merged frame below zero sharers")
        self.refs[uniq] -= counts.astype(np.int32)
        emptied = uniq[self.refs[uniq] == 0]
        for mpn in emptied.tolist():
            self._forget(mpn)
        self.machine.release_or_retire(emptied)

    def make_private(self, mpn: int, vm_id: int, bpn: int) -> None:
        """The last sharer keeps the frame as its own page (no copy needed)."""
        if self.refs[mpn] != 1:
            raise ValueError(f"frame {mpn} has {self.refs[mpn]} sharers, not one")
        self.refs[mpn] = 0
        self._forget(mpn)
        self.machine.set_owner(np.array([mpn]), vm_id, np.array([bpn]))

    def move(self, old: int, new: int) -> None:
        """Content and sharers of ``old`` now live in ``new`` (retiring a failing frame)."""
        self.refs[new], self.refs[old] = self.refs[old], 0
        self.joined[new], self.joined[old] = self.joined[old], False
        self.born[new] = self.born[old]
        self.origin[new] = self.origin[old]
        self.machine.owner_vm[new] = SHARED_OWNER
        content_hash = self.hash_of.pop(old, None)
        if content_hash is not None:
            self.by_hash[content_hash] = new
            self.hash_of[new] = content_hash

    def _forget(self, mpn: int) -> None:
        self.frames -= 1
        self.joined[mpn] = False
        content_hash = self.hash_of.pop(mpn, None)
        if content_hash is not None and self.by_hash.get(content_hash) == mpn:
            del self.by_hash[content_hash]
            self._keys = None


def merged_pages(p2m: P2M) -> int:
    """Pages of one VM that page sharing merged (a scan: for status and scrapes)."""
    return int(np.count_nonzero(p2m.flags & FLAG_MERGED))


def frames_saved(p2ms: list[P2M], shared: SharedFrames) -> int:
    """Frames page sharing saves host-wide: every merged page but one per merged frame.

    A merged frame with r sharers saves r - 1 frames; a page merged into a zero frame saves
    one. Summed: all merged pages minus the merged frames in use.
    """
    return sum(merged_pages(p) for p in p2ms) - shared.frames


def frames_saved_by(p2m: P2M, vm_id: int, shared: SharedFrames) -> int:
    """Frames one VM saves: its merged pages, less the merged frames that were its own pages.

    Summed over the VMs this is ``frames_saved``: each merged frame is counted once, against
    the VM whose page it was.
    """
    own = np.count_nonzero((shared.origin == vm_id) & (shared.refs > 0))
    return merged_pages(p2m) - int(own)
