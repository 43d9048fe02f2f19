"""Invariants of the daemon's state, checkable at any time (``vmmem-ctl check``).

``check(state)`` is a pure function of a ``HostState`` (the allocator, the frame → owner
maps, the zero and merged frames, every live VM's p2m, the swap file, and what work in
flight holds) and returns the violations it finds, each by name (``VIOLATIONS``). It changes
nothing and runs on whole arrays with NumPy: a 2 GiB host is checked in milliseconds. The
daemon calls it from the ``check`` ctl op, and after recovering from a crash before serving.

Work in flight never looks like a violation, because every service keeps the state
consistent at each await point (the check runs on the event loop, between two of them):

- a swap-out in flight keeps its frame (private, owned, state IN_FLIGHT) until its write
  lands; its slot is in use but no page names it yet: ``swap_writing`` counts those slots
  (writes of VMs that left, and writes a fault cancelled, included);
- a swap-in keeps its page SWAPPED, slot in use, until the frame is mapped in one step;
- a page read ahead by a swap-in keeps its slot with its frame until it is validated
  (IN_FLIGHT, op VALIDATION: ``services/readahead.py``); its slot counts as a swapped page's;
- a page-sharing merge keeps its pages' own frames until it merges them in one step;
- a retire move and a COW copy are synchronous;
- a shared frame being retired (a zero frame or a merged frame) is replaced in every p2m at
  once, but VMMs may still map the old frame read-only until p2mUpdate drains them: those
  old frames are ``held_frames``, used and mapped by no p2m.

What an agent maps is checked against the p2m by ``check_exposures`` (the daemon asks each
agent with the ctl op ``exposures``; see ``shared/exposures.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shared.constants import NO_FRAME, PageState, ServiceType
from shared.distinct import distinct_counts
from shared.exposures import Exposures

from .allocator import FrameAllocator, FrameState
from .p2m import FLAG_SHARED, NO_SLOT, P2M
from .shared_frames import SHARED_OWNER

if TYPE_CHECKING:
    from .server import PlatformServer
    from .swapfile import SwapFile

#: Every violation ``check`` and ``check_exposures`` can report, with what it means.
VIOLATIONS: dict[str, str] = {
    "frame_counts": "free + used + retired frames differ from all frames, or from the "
    "allocator's counters",
    "page_state": "a page's frame or swap slot does not fit its state (e.g. swapped with a "
    "frame, exposed without one, in flight with no operation)",
    "private_frame_not_owned": "a page maps a private frame that is not in use or that the "
    "owner map gives to another page",
    "frame_multiple_owners": "one frame is the private frame of two pages",
    "shared_frame_invalid": "a page maps read-only shared a frame that is neither a zero "
    "frame nor a merged frame",
    "shared_refcount": "a merged frame's reference count differs from the pages that map it",
    "frame_leaked": "a used frame that no page, zero frame, merged frame or work in flight holds",
    "free_frame_owned": "a free or retired frame still has an owner in the owner map",
    "swap_slots": "swap slots in use differ from swapped pages plus writes in flight, or a "
    "swapped page's slot is not in use or is shared",
    "vm_exposes_foreign_frame": "an agent maps a frame the daemon did not give that page "
    "(or maps a shared frame writable)",
}

_EXAMPLES = 5
_USED = int(FrameState.USED)
_ZERO, _EXPOSED, _SELECTED = int(PageState.ZERO), int(PageState.EXPOSED), int(PageState.SELECTED)
_IN_FLIGHT, _SWAPPED = int(PageState.IN_FLIGHT), int(PageState.SWAPPED)
_LAST_STATE = int(max(PageState))
_VALIDATION = int(ServiceType.VALIDATION)
_SERVICES = np.array([int(s) for s in ServiceType], dtype=np.uint8)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its name (a key of VIOLATIONS), how many cases, a few of them."""

    name: str
    count: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "detail": self.detail}


@dataclass(frozen=True)
class HostState:
    """What ``check`` reads: the daemon's own arrays, never copied.

    ``vms`` maps a live VM's id to its p2m. ``held_frames`` are used frames that work in
    flight keeps alive though no p2m maps them (p2mUpdate's old frames). ``swap_writing``
    counts the swap slots taken by writes not finished yet; None when unknown, and then only
    "at least the swapped pages" is checked.
    """

    allocator: FrameAllocator
    owner_vm: npt.NDArray[np.int32]
    owner_bpn: npt.NDArray[np.int64]
    zero_frames: Collection[int]
    refs: npt.NDArray[np.int32]
    merged_frames: int
    vms: Mapping[int, P2M]
    held_frames: Collection[int] = ()
    swap: SwapFile | None = None
    swap_writing: int | None = 0

    @classmethod
    def of(cls, server: PlatformServer) -> HostState:
        """The state of a running (or just recovered) daemon."""
        machine, shared = server.machine, server.shared
        p2m_update = server.services.get(ServiceType.P2M_UPDATE)
        swap_svc = server.services.get(ServiceType.SWAP)
        defrag = server.services.get(ServiceType.DEFRAG_2M)
        promotion = server.services.get(ServiceType.PROMOTION_2M)
        return cls(
            allocator=machine.allocator,
            owner_vm=machine.owner_vm,
            owner_bpn=machine.owner_bpn,
            zero_frames=list(machine.zero_frame),
            refs=shared.refs,
            merged_frames=shared.frames,
            vms={vm_id: vm.p2m for vm_id, vm in server.vms.items()},
            # p2mUpdate's old frames, the frames of runs 2M defrag is emptying, and the
            # runs 2M promotion is copying into.
            held_frames=[
                *getattr(p2m_update, "refs", {}),
                *getattr(defrag, "held_frames", list)(),
                *getattr(promotion, "held_frames", list)(),
            ],
            swap=server.swap,
            swap_writing=getattr(swap_svc, "writing", None),
        )


def _examples(values: npt.NDArray[Any] | list[Any]) -> str:
    items = values[:_EXAMPLES].tolist() if isinstance(values, np.ndarray) else values[:_EXAMPLES]
    return ", ".join(str(v) for v in items) + (", ..." if len(values) > _EXAMPLES else "")


@dataclass
class _Pages:
    """Every live VM's pages in one set of arrays: one vectorised pass for all VMs."""

    vm: npt.NDArray[np.int32]
    bpn: npt.NDArray[np.int64]
    frame: npt.NDArray[np.int64]
    state: npt.NDArray[np.uint8]
    op: npt.NDArray[np.uint8]
    slot: npt.NDArray[np.int64]
    flags: npt.NDArray[np.uint8]

    @classmethod
    def of(cls, vms: Mapping[int, P2M]) -> _Pages:
        p2ms = list(vms.items())
        if not p2ms:
            e64, e8 = np.empty(0, np.int64), np.empty(0, np.uint8)
            return cls(np.empty(0, np.int32), e64, e64, e8, e8, e64, e8)
        return cls(
            np.concatenate([np.full(p.guest_pages, i, np.int32) for i, p in p2ms]),
            np.concatenate([np.arange(p.guest_pages, dtype=np.int64) for _, p in p2ms]),
            np.concatenate([p.frame for _, p in p2ms], dtype=np.int64),
            np.concatenate([p.state for _, p in p2ms]),
            np.concatenate([p.op for _, p in p2ms]),
            np.concatenate([p.swap_slot for _, p in p2ms], dtype=np.int64),
            np.concatenate([p.flags for _, p in p2ms]),
        )

    def where(self, mask: npt.NDArray[np.bool_]) -> str:
        """A few of the masked pages as vm:bpn."""
        idx = np.flatnonzero(mask)
        text = ", ".join(f"{self.vm[i]}:{self.bpn[i]}" for i in idx[:_EXAMPLES].tolist())
        return text + (", ..." if len(idx) > _EXAMPLES else "")


def check(state: HostState) -> list[Violation]:
    """Every violated invariant of ``state``, by name; an empty list when all hold."""
    pages = _Pages.of(state.vms)
    out: list[Violation] = []
    out += _frame_counts(state.allocator)
    out += _page_states(pages)
    out += _frame_owners(state, pages)
    out += _swap_slots(state, pages)
    return out


def _frame_counts(alloc: FrameAllocator) -> list[Violation]:
    counts = np.bincount(alloc.frame_state, minlength=3)
    by_state = (int(counts[0]), int(counts[1]), int(counts[2]))
    counters = (alloc.free, alloc.used, alloc.retired)
    total = int(counts.sum())
    if by_state == counters and sum(counters) == alloc.host_pages == total and len(counts) == 3:
        return []
    return [
        Violation(
            "frame_counts",
            1,
            f"frames by state free/used/retired {by_state} (of {total}), allocator counters "
            f"{counters}, host frames {alloc.host_pages}",
        )
    ]


def _page_states(pages: _Pages) -> list[Violation]:
    has_frame, has_slot = pages.frame != NO_FRAME, pages.slot != NO_SLOT
    st = pages.state
    bad = np.zeros(len(st), dtype=bool)
    bad |= (st == _ZERO) & (has_frame | has_slot)
    bad |= (st == _SWAPPED) & (has_frame | ~has_slot)
    mapped_states = (st != _ZERO) & (st != _SWAPPED)
    bad |= mapped_states & (~has_frame | (has_slot & ~_read_ahead(pages)))
    bad |= (st == _IN_FLIGHT) & ~np.isin(pages.op, _SERVICES)
    bad |= st > _LAST_STATE
    n = int(np.count_nonzero(bad))
    if not n:
        return []
    return [Violation("page_state", n, f"pages (vm:bpn) {pages.where(bad)}")]


def _frame_owners(state: HostState, pages: _Pages) -> list[Violation]:
    alloc, host = state.allocator, state.allocator.host_pages
    fs = alloc.frame_state
    out: list[Violation] = []
    mapped = pages.frame != NO_FRAME
    in_range = (pages.frame >= 0) & (pages.frame < host)
    shared = (pages.flags & FLAG_SHARED) != 0
    zero = np.zeros(host, dtype=bool)
    zero[np.asarray(list(state.zero_frames), dtype=np.int64)] = True

    # Private pages: the frame is in use and the owner map names exactly this page.
    private = mapped & ~shared
    f = np.where(private & in_range, pages.frame, 0)
    ok = in_range & (fs[f] == _USED) & (state.owner_vm[f] == pages.vm)
    ok &= state.owner_bpn[f] == pages.bpn
    bad = private & ~ok
    if bad.any():
        out.append(
            Violation(
                "private_frame_not_owned",
                int(np.count_nonzero(bad)),
                f"pages (vm:bpn) {pages.where(bad)} map frames {_examples(pages.frame[bad])}",
            )
        )
    frames, counts = distinct_counts(pages.frame[private])
    if (counts > 1).any():
        out.append(
            Violation(
                "frame_multiple_owners",
                int(np.count_nonzero(counts > 1)),
                f"frames {_examples(frames[counts > 1])} are private to several pages",
            )
        )

    # Shared pages: a zero frame, or a merged frame counted once per page that maps it.
    f = np.where(shared & in_range, pages.frame, 0)
    merged = (state.owner_vm[f] == SHARED_OWNER) & (state.refs[f] > 0)
    ok = in_range & (fs[f] == _USED) & (zero[f] | merged)
    bad = shared & mapped & ~ok
    bad_zero = np.flatnonzero(zero & ((fs != _USED) | (state.refs != 0)))
    if bad.any() or len(bad_zero):
        out.append(
            Violation(
                "shared_frame_invalid",
                int(np.count_nonzero(bad)) + len(bad_zero),
                f"pages (vm:bpn) {pages.where(bad)}; zero frames not in use or counted "
                f"{_examples(bad_zero)}",
            )
        )
    sharers = np.bincount(pages.frame[shared & mapped & in_range], minlength=host)[:host]
    sharers[zero] = 0
    wrong = np.flatnonzero(sharers != state.refs)
    n_merged = int(np.count_nonzero(state.refs > 0))
    if len(wrong) or n_merged != state.merged_frames:
        out.append(
            Violation(
                "shared_refcount",
                len(wrong) + (n_merged != state.merged_frames),
                f"frames {_examples(wrong)} count {_examples(state.refs[wrong])} sharers, "
                f"mapped by {_examples(sharers[wrong])}; merged frames {n_merged}, "
                f"counted {state.merged_frames}",
            )
        )

    # Every used frame is held by someone; no free or retired frame has an owner.
    held = np.zeros(host, dtype=bool)
    held[pages.frame[private & in_range]] = True
    held |= zero | (state.refs > 0)
    held[np.asarray(list(state.held_frames), dtype=np.int64)] = True
    leaked = np.flatnonzero((fs == _USED) & ~held)
    if len(leaked):
        out.append(
            Violation(
                "frame_leaked",
                len(leaked),
                f"frames {_examples(leaked)} (owner map: {_examples(state.owner_vm[leaked])})",
            )
        )
    owned_free = np.flatnonzero((fs != _USED) & (state.owner_vm != -1))
    if len(owned_free):
        out.append(
            Violation(
                "free_frame_owned",
                len(owned_free),
                f"frames {_examples(owned_free)} owned by {_examples(state.owner_vm[owned_free])}",
            )
        )
    return out


def _read_ahead(pages: _Pages) -> npt.NDArray[np.bool_]:
    """Pages held after a swap-in read them ahead: a frame and still their slot."""
    held: npt.NDArray[np.bool_] = (pages.state == _IN_FLIGHT) & (pages.op == _VALIDATION)
    held &= pages.slot != NO_SLOT
    return held


def _swap_slots(state: HostState, pages: _Pages) -> list[Violation]:
    slots = pages.slot[(pages.state == _SWAPPED) | _read_ahead(pages)]
    swap = state.swap
    problems: list[str] = []
    if swap is None:
        if len(slots):
            problems.append(f"{len(slots)} pages swapped with no swap file")
    else:
        in_range = (slots >= 0) & (slots < swap.slots)
        if not in_range.all():
            problems.append(f"slots out of range: {_examples(slots[~in_range])}")
        slots = slots[in_range]
        not_in_use = slots[~swap.in_use[slots]]
        if len(not_in_use):
            problems.append(f"swapped pages' slots not in use: {_examples(not_in_use)}")
        uniq, counts = distinct_counts(slots)
        if (counts > 1).any():
            problems.append(f"slots of several pages: {_examples(uniq[counts > 1])}")
        marked = int(np.count_nonzero(swap.in_use))
        if marked != swap.used:
            problems.append(f"{marked} slots marked in use, {swap.used} counted")
        writing = state.swap_writing
        expected = len(slots) + (writing or 0)
        if (swap.used != expected) if writing is not None else (swap.used < expected):
            problems.append(
                f"{swap.used} slots in use for {len(slots)} swapped pages and "
                f"{'an unknown number of' if writing is None else writing} writes in flight"
            )
    if not problems:
        return []
    return [Violation("swap_slots", len(problems), "; ".join(problems))]


@dataclass(frozen=True)
class P2MView:
    """A copy of what ``check_exposures`` reads of one p2m, taken before asking the agent."""

    frame: npt.NDArray[np.int64]
    state: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    op: npt.NDArray[np.uint8]

    @classmethod
    def of(cls, p2m: P2M) -> P2MView:
        frame = p2m.frame.astype(np.int64)  # a copy, widened: the p2m stores int32
        return cls(frame, p2m.state.copy(), p2m.flags.copy(), p2m.op.copy())


def _may_map(
    view: P2M | P2MView, frame: npt.NDArray[np.int64], writable: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Per BPN: the VMM may map ``frame`` so under ``view`` (the page's frame while it is
    exposed, selected for a batch not answered yet, or in flight to validation: a read-ahead
    page held mapped until its verdict, a moved page whose new frame is being installed;
    writable only when private)."""
    st, private = view.state, (view.flags & FLAG_SHARED) == 0
    validating = (st == _IN_FLIGHT) & (view.op == _VALIDATION)
    ok: npt.NDArray[np.bool_] = (
        (view.frame == frame)
        & ((st == _EXPOSED) | (st == _SELECTED) | validating)
        & (~writable | private)
    )
    return ok


def foreign_mappings(
    state: HostState, vm_id: int, exposures: Exposures, earlier: P2MView | None = None
) -> npt.NDArray[np.int64]:
    """BPNs whose mapping in the agent's table the p2m does not allow.

    Allowed: the page's frame as the p2m has it now, or as ``earlier`` had it (a copy taken
    before the agent was asked: a fault reply or a batch may have crossed the question), or
    an old frame p2mUpdate still holds, read-only. Pages with a fault on the wire are skipped.
    """
    p2m = state.vms[vm_id]
    f, w = exposures.frame, exposures.writable
    ok = _may_map(p2m, f, w)
    if earlier is not None:
        ok |= _may_map(earlier, f, w)
    ok |= np.isin(f, np.asarray(list(state.held_frames), dtype=np.int64)) & ~w
    bad = (f != NO_FRAME) & ~ok
    faulting = exposures.faulting
    bad[faulting[(faulting >= 0) & (faulting < p2m.guest_pages)]] = False
    return np.flatnonzero(bad).astype(np.int64)


def exposure_violation(
    state: HostState, vm_id: int, exposures: Exposures, bpns: npt.NDArray[np.int64], name: str
) -> Violation:
    """The violation for ``bpns`` of ``foreign_mappings``, a few of them spelled out."""
    p2m, f, w = state.vms[vm_id], exposures.frame, exposures.writable
    cases = [
        f"bpn {b} frame {f[b]}{' rw' if w[b] else ''} (p2m: frame {p2m.frame[b]}, "
        f"{_state_name(int(p2m.state[b]))})"
        for b in bpns[:_EXAMPLES].tolist()
    ]
    more = "; ..." if len(bpns) > _EXAMPLES else ""
    return Violation("vm_exposes_foreign_frame", len(bpns), f"vm {name}: {'; '.join(cases)}{more}")


def _state_name(state: int) -> str:
    return PageState(state).name.lower() if state <= _LAST_STATE else str(state)


def check_exposures(
    state: HostState,
    vm_id: int,
    exposures: Exposures,
    name: str = "",
    earlier: P2MView | None = None,
) -> list[Violation]:
    """What one agent maps against its p2m (see ``foreign_mappings``), as violations."""
    label = name or str(vm_id)
    guest_pages = state.vms[vm_id].guest_pages
    if len(exposures.frame) != guest_pages:
        detail = (
            f"vm {label}: agent reports {len(exposures.frame)} pages, the p2m has {guest_pages}"
        )
        return [Violation("vm_exposes_foreign_frame", 1, detail)]
    bpns = foreign_mappings(state, vm_id, exposures, earlier)
    return [exposure_violation(state, vm_id, exposures, bpns, label)] if len(bpns) else []
