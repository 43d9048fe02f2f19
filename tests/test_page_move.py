"""The move shared by NUMA migration, 2M defrag and 2M promotion (``services/page_move.py``).

Review findings this file pins down:

- defrag took the target node of a whole batch from its first page, so pages of a run
  isolated on another node landed on the wrong node: each page now goes to its own node;
- the three services each had their own copy of the move and of the fault's completion, and
  promotion's did not bump the faulted page's epoch as the other two did: the contract is
  now one module, checked here for all three.

The harness is ``tests/test_hugepages.py``'s (real machine memory in /dev/shm, two nodes of
4 runs of 512 frames, the real RoundEngine, the agent's own filters); content is checked on
real bytes and the daemon's invariants after each step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import platform_daemon.services.numa_migration as numa
from platform_daemon.hugepages import FLAG_LARGE, coverage
from platform_daemon.machine import MachineMemory
from platform_daemon.p2m import NO_OP
from platform_daemon.services import page_move
from shared.constants import PAGE_SIZE, PAGES_PER_2M, FaultReason, PageState, ServiceType
from shared.errors import VMMemError
from shared.shm import create_mapped, frames_view, open_read_only
from tests.test_hugepages import HugeHarness, promoted, region, split_count
from tests.test_numa_migration import Guest, _released, content, home_room, unmapped

pytestmark = pytest.mark.timeout(60)
R = PAGES_PER_2M


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[HugeHarness]:
    harness = HugeHarness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


def nearly_free(h: HugeHarness, g: Guest, bpns: list[int], node: int, keep: int) -> list[int]:
    """Back ``bpns`` (1023 pages) on frames 1..1023 of ``node``'s first two runs, then free
    those on its second run but ``keep``: that run is nearly free. Returns the pages kept."""
    frames = h.back(g, bpns, node=node)
    second = h.machine.allocator.node_runs(node)[0] + 1
    on_second = frames // R == second
    assert on_second.sum() > keep
    idx = np.array(bpns, dtype=np.int64)
    drop, stay = idx[on_second][keep:], idx[on_second][:keep]
    p2m = g.vm.p2m
    h.machine.release_or_retire(p2m.frame[drop])
    p2m.frame[drop], p2m.state[drop] = -1, PageState.ZERO
    g.exposure.frame[drop] = -1
    for b in drop.tolist():
        del g.data[b]
    pages: list[int] = stay.tolist()
    return pages


def _isolated_on_both_nodes(h: HugeHarness, g: Guest) -> tuple[list[int], list[int]]:
    """A nearly free run on each node, both isolated, their pages queued for ``g`` and not
    mapped by the VMM (RESIDENT: the selection moves them itself, all in one call, whatever
    batch sizes the scheduler would pick). Returns each node's pages."""
    stay0 = nearly_free(h, g, list(range(1023)), node=0, keep=5)
    stay1 = nearly_free(h, g, list(range(1023, 2046)), node=1, keep=5)
    h.defrag.proactiveness = 100  # compact whenever any free frame is outside a whole run
    h.defrag.step(h.clock())
    runs = [st.isolated.run if st.isolated else -1 for st in h.defrag.nodes]
    assert runs == [1, h.machine.allocator.node_runs(1)[0] + 1]
    both = np.array(stay0 + stay1, dtype=np.int64)
    g.exposure.invalidate(both)
    g.vm.p2m.state[both] = PageState.RESIDENT
    assert sorted(h.defrag.queues[g.vm.vm_id]) == stay0 + stay1
    return stay0, stay1


def test_defrag_moves_each_page_within_its_own_node(h: HugeHarness) -> None:
    """One VM has a nearly free run on each node, both isolated; one selection moves the
    pages of both. Each page moves to a free frame of its own node outside its run (not all
    to the node of the first page), and both runs are then freed whole."""
    g = h.add_vm(guest_pages=4 * R)
    stay0, stay1 = _isolated_on_both_nodes(h, g)
    runs = [st.isolated.run for st in h.defrag.nodes if st.isolated]

    sel = h.defrag.select_work(g.vm, R, R, h.clock())

    assert len(sel.bpns) == 0 and h.defrag.stats.moved == 10  # moved without a batch
    alloc, p2m = h.machine.allocator, g.vm.p2m
    assert (alloc.node_of(p2m.frame[stay0]) == 0).all()
    assert (alloc.node_of(p2m.frame[stay1]) == 1).all()
    assert not np.isin(p2m.frame[stay0 + stay1] // R, runs).any()
    assert (p2m.state[stay0 + stay1] == PageState.RESIDENT).all()
    assert h.invariants() == []
    h.defrag.step(h.clock() + 0.01)
    assert h.defrag.stats.runs_freed == 2
    assert [int(alloc.run_free[r]) for r in runs] == [R, R]
    h.content_intact(g)
    assert h.invariants() == []


def test_defrag_moves_what_each_node_has_room_for(h: HugeHarness) -> None:
    """Node 0 has no free frame left outside its isolated run: its pages keep their frames
    (not sent to node 1), node 1's still move, within node 1."""
    g = h.add_vm(guest_pages=4 * R)
    stay0, stay1 = _isolated_on_both_nodes(h, g)
    old0 = g.vm.p2m.frame[stay0].copy()
    filler = h.add_vm(guest_pages=4 * R)
    h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)

    h.defrag.select_work(g.vm, R, R, h.clock())

    alloc, p2m = h.machine.allocator, g.vm.p2m
    assert (p2m.frame[stay0] == old0).all()
    assert (alloc.node_of(p2m.frame[stay1]) == 1).all()
    assert h.defrag.stats.moved == 5
    h.content_intact(g)
    assert h.invariants() == []


def _in_flight(h: HugeHarness, g: Guest, service: ServiceType) -> list[int]:
    """Run one low round up to the VMM's release of ``service``'s pages (their move spawned,
    not run); returns the pages in flight."""
    if service == ServiceType.NUMA_MIGRATION:
        pages = [5, 6, 7, 8]
        h.back(g, pages, node=1)
        h.scan(g)
    elif service == ServiceType.PROMOTION_2M:
        pages = region(0)
        h.back(g, pages, node=0)
        h.promo.scan(g.vm, 64, h.clock())
    else:
        pages = nearly_free(h, g, list(range(1023)), node=0, keep=4)
        h.defrag.proactiveness = 100
        h.defrag.step(h.clock())
    batches = h.low_round(g, run_moves=False)  # (its size follows measured costs)
    assert {s for s, _ in batches} == {service}
    released = sorted(b for _, bs in batches for b in bs)
    assert set(released) <= set(pages) and len(released) >= 2
    assert (g.vm.p2m.state[released] == PageState.IN_FLIGHT).all()
    return released


@pytest.mark.parametrize(
    "service",
    [ServiceType.NUMA_MIGRATION, ServiceType.DEFRAG_2M, ServiceType.PROMOTION_2M],
    ids=lambda s: s.name.lower(),
)
def test_a_fault_on_a_page_in_flight_is_completed_the_same_way_by_every_mover(
    h: HugeHarness, service: ServiceType
) -> None:
    """Each mover completes a faulted page's move at once (COMPLETE, its new frame), exposes
    it and bumps its epoch past the release's, so the pending step skips it: the page is
    not copied again over the guest's write, and nothing is freed twice."""
    g = h.add_vm(guest_pages=4 * R)
    pages = _in_flight(h, g, service)
    bpn = pages[1]
    p2m = g.vm.p2m
    released = int(p2m.epoch[bpn])
    old = int(p2m.frame[bpn])

    reply = h.services[service].on_fault(g.vm, bpn, True)

    assert reply.reason == FaultReason.COMPLETE and reply.bpns.tolist() == [bpn]
    new = int(p2m.frame[bpn])
    assert new != old and reply.mpns.tolist() == [new]
    assert p2m.state[bpn] == PageState.EXPOSED and int(p2m.epoch[bpn]) == released + 1
    assert not page_move.still_ours(
        g.vm, np.array([bpn]), np.array([released], dtype=np.uint32), int(service)
    ).any()
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, bpn, np.full(4096, 7, dtype=np.uint8))
    h.run_spawned()
    assert int(p2m.frame[bpn]) == new  # not moved twice
    h.rounds(g)
    assert (g.exposure.frame[pages] == p2m.frame[pages]).all()  # the others installed
    h.content_intact(g)
    assert h.invariants() == []


def _destinations(h: HugeHarness, n: int) -> list[npt.NDArray[np.int64]]:
    """Destinations of ``n`` frames of every shape: one aligned run, scattered frames in
    descending order (no two consecutive), and stretches of 1, 2, TAKE_MIN and more."""
    alloc = h.machine.allocator
    run = alloc.allocate_run(1)
    assert run is not None
    mixed, lengths = [], [1, 2, page_move.TAKE_MIN, page_move.TAKE_MIN - 1, 9, 3]
    pool = alloc.allocate(2 * n + 2 * len(lengths) + 16, 1)
    pool.sort()
    at, i = 0, 0
    while sum(map(len, mixed)) < n:
        k = min(lengths[i % len(lengths)], n - sum(map(len, mixed)))
        mixed.append(pool[at : at + k])
        at, i = at + k + 1, i + 1  # one frame skipped: the next stretch starts apart
    return [run[:n], alloc.allocate(n, 1)[::-1].copy(), np.concatenate(mixed)]


@pytest.mark.parametrize("n", [1, 3, 7, R])
def test_copy_frames_copies_into_runs_and_scattered_frames_alike(h: HugeHarness, n: int) -> None:
    """Stretches of consecutive destination frames are gathered from the read-only mapping,
    short ones stored page by page: every destination gets its own page's bytes and no other
    frame changes; a page without a frame (or past the last frame) is refused."""
    frames, source = h.machine.frames, h.machine.source
    old = h.machine.allocator.allocate(n, 0)
    rng = np.random.default_rng(n)
    frames[old] = rng.integers(0, 256, size=(n, frames.shape[1]), dtype=np.uint8)
    destinations = _destinations(h, n)
    for new in destinations:
        before = frames.copy()
        page_move.copy_frames(frames, source, new, old)
        assert (frames[new] == before[old]).all()
        untouched = np.ones(len(frames), dtype=bool)
        untouched[new] = False
        assert (frames[untouched] == before[untouched]).all()
    run = destinations[0]
    for bad in (-1, len(frames)):  # np.take's "clip" would copy the first or last frame
        for k in (1, min(n, page_move.TAKE_MIN)):  # a slice store, a gather
            wrong = np.full(k, bad, dtype=np.int64)
            with pytest.raises(ValueError):
                page_move.copy_frames(frames, source, run[:k], wrong)
    before = frames.copy()
    for k in (1, min(n, page_move.TAKE_MIN)):  # destinations off either end: refused, no copy
        for outside in (np.arange(-k, 0), np.arange(len(frames) - k + 1, len(frames) + 1)):
            with pytest.raises(ValueError):
                page_move.copy_frames(frames, source, outside.astype(np.int64), old[:k])
    # A good stretch before a bad one: refused before the good one is copied.
    mixed = np.append(run[: min(n, page_move.TAKE_MIN)], len(frames))
    with pytest.raises(ValueError, match="outside machine memory"):
        page_move.copy_frames(frames, source, mixed, np.resize(old, len(mixed)))
    assert (frames == before).all()


# ---- gaps a mutation sweep found ---------------------------------------------------------------


def test_an_unmapped_page_of_a_large_region_is_split_before_it_moves_home(h: HugeHarness) -> None:
    """A large region off the VM's home node whose pages no VMM maps (RESIDENT): NUMA
    migration moves them in the selection, without a batch (so no release splits the region
    on the way); the move itself ends the large mapping first, else the p2m would call
    scattered frames one large region."""
    g = h.add_vm(home_node=1)
    promoted(h, g)
    pages = region(0)
    unmapped(g, pages)  # (the agent splits its own large mapping as it drops it)
    g.vm.home_node = 0
    h.svc.vms.pop(g.vm.vm_id)
    h.svc.pending_work(g.vm, h.clock())
    h.scan(g)

    sel = h.svc.select_work(g.vm, R, R, h.clock())

    assert len(sel.bpns) == 0 and h.svc.stats(g.vm).migrated == R  # moved, no batch
    p2m = g.vm.p2m
    assert (h.machine.allocator.node_of(p2m.frame[pages]) == 0).all()
    assert not (p2m.flags[pages] & FLAG_LARGE).any()
    assert coverage(p2m)[0] == 0
    assert g.vm.stats.hugepage_splits == 1 and split_count(h, "numa_migration") == 1
    h.content_intact(g)
    assert h.invariants() == []


def test_a_stale_step_leaves_a_page_released_again_to_its_own_step(h: HugeHarness) -> None:
    """A fault cancelled page 3's move (no room), so the pending step of that release still
    holds it; room came back and the page was released again, for the same service. It is
    IN_FLIGHT for the same operation once more, and only its epoch tells the two releases
    apart: the old step moves page 4 and leaves page 3 to the new release's step."""
    g = h.add_vm()
    old = _released(h, g, [3, 4])
    released = int(g.vm.p2m.epoch[3])
    filler = home_room(h, 0)
    reply = h.svc.on_fault(g.vm, 3, write=True)
    assert reply.reason == FaultReason.CANCEL
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, 3, content(4242))  # the guest writes to the page it kept
    freed = list(range(h.svc.reserve(0) + 4))  # room again: the filler frees some pages
    h.machine.release_or_retire(filler.vm.p2m.frame[freed])
    filler.vm.p2m.frame[freed], filler.vm.p2m.state[freed] = -1, PageState.ZERO
    for b in freed:
        del filler.data[b]
    h.scan(g)
    assert h.low_round(g, run_moves=False) == [(ServiceType.NUMA_MIGRATION, [3])]
    p2m = g.vm.p2m
    assert p2m.state[3] == PageState.IN_FLIGHT and p2m.op[3] == ServiceType.NUMA_MIGRATION
    assert int(p2m.epoch[3]) > released and len(h.spawned) == 2

    asyncio.run(h.spawned.pop(0))  # the first release's step only

    assert h.node(g, 4) == 0 and p2m.state[4] == PageState.RESIDENT
    assert p2m.state[3] == PageState.IN_FLIGHT and int(p2m.frame[3]) == old[0]
    assert h.svc.stats(g.vm).migrated == 1
    asyncio.run(h.spawned.pop(0))  # the second release's step moves it
    assert h.node(g, 3) == 0 and p2m.state[3] == PageState.RESIDENT and p2m.op[3] == NO_OP
    st = h.svc.stats(g.vm)
    assert (st.migrated, st.aborted) == (2, 1) and h.svc.promised == [0, 0]
    h.rounds(g)  # validation maps both
    assert (g.exposure.frame[[3, 4]] == p2m.frame[[3, 4]]).all()
    h.content_intact(g)
    assert h.invariants() == []


def test_a_move_yields_to_the_event_loop_between_chunks(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A released batch is copied MOVE_CHUNK pages at a time, the coroutine suspending
    before each chunk, so a fault (or another VM) is served between chunks: here a fault on
    a page of the last chunk completes it while the move is half done, and the last chunk
    skips it. Stepped by hand (send) so each suspension is seen."""
    monkeypatch.setattr(numa, "MOVE_CHUNK", 2)
    g = h.add_vm()
    pages = list(range(10, 16))
    _released(h, g, pages)
    coro = h.spawned.pop(0)
    p2m = g.vm.p2m

    def moved() -> list[int]:
        return [b for b in pages if p2m.state[b] != PageState.IN_FLIGHT]

    coro.send(None)  # suspended before its first chunk
    assert moved() == []
    coro.send(None)
    assert moved() == [10, 11]
    reply = h.svc.on_fault(g.vm, 14, write=True)  # served while the move is half done
    assert reply.reason == FaultReason.COMPLETE
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, 14, content(777))
    coro.send(None)
    assert moved() == [10, 11, 12, 13, 14]
    assert p2m.state[15] == PageState.IN_FLIGHT
    with pytest.raises(StopIteration):
        coro.send(None)  # the last chunk: 15 moves, 14 (exposed since) is skipped
    assert [h.node(g, b) for b in pages] == [0] * 6
    assert h.svc.stats(g.vm).migrated == 6 and h.svc.promised == [0, 0]
    h.rounds(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_the_read_only_mapping_refuses_a_file_replaced_under_its_name(short_tmp: Path) -> None:
    """The copies' source is a second mapping opened by name: if the name now holds another
    file (replaced meanwhile), copies would read other memory with no error; refused."""
    path = short_tmp / "machine"
    first = create_mapped(path, 4 * PAGE_SIZE)
    try:
        second = open_read_only(path, 4 * PAGE_SIZE, same_as=first)
        assert second.ident == first.ident
        view = frames_view(second)
        assert not view.flags.writeable  # PROT_READ: no write can go through it
        del view
        second.close()
        path.unlink()
        create_mapped(path, 4 * PAGE_SIZE).close()  # another file, the same name and size
        with pytest.raises(VMMemError, match="replaced"):
            open_read_only(path, 4 * PAGE_SIZE, same_as=first)
    finally:
        first.close()
        path.unlink(missing_ok=True)


def test_copy_off_loop_copies_on_the_copier_thread(h: HugeHarness) -> None:
    """``copy_off_loop`` does the copies (``run_copy``) on the machine's copier thread, not the
    loop's, and the bytes land."""
    machine = h.machine
    old = np.array([5, 9, 2], dtype=np.int64)
    new = np.array([600, 601, 602], dtype=np.int64)
    machine.frames[old] = np.arange(3, dtype=np.uint8)[:, None] + 7
    threads: list[str] = []
    real = page_move.run_copy

    def noting(*args: object) -> None:
        threads.append(threading.current_thread().name)
        real(*args)  # type: ignore[arg-type]

    page_move.run_copy = noting  # type: ignore[assignment]
    try:
        asyncio.run(page_move.copy_off_loop(machine, new, old))
    finally:
        page_move.run_copy = real
    assert len(threads) == 1 and threads[0].startswith("vmmem-copier")
    assert (machine.frames[new] == machine.frames[old]).all()


def test_closing_machine_memory_waits_for_a_copy_in_flight(tmp_path: Path) -> None:
    """A copy still running on the copier thread (its task cancelled at shutdown) writes
    through the mappings: ``close`` waits for it before unmapping them."""
    machine = MachineMemory(Path("/dev/shm") / f"vmmem-close-{os.getpid()}", 2048, 1, False)
    go = threading.Event()

    def slow_copy(frames: npt.NDArray[np.uint8], source: npt.NDArray[np.uint8]) -> None:
        go.wait(10)
        page_move.copy_frames(frames, source, np.array([1000]), np.array([3]))

    running = machine.copier.submit(slow_copy, machine.frames, machine.source)
    closer = threading.Thread(target=machine.close)
    closer.start()
    try:
        closer.join(0.2)
        assert closer.is_alive(), "close did not wait for the copy"
    finally:
        go.set()
        closer.join(10)
    assert not closer.is_alive()
    running.result(0)  # the copy ran to its end, through live mappings


def test_a_copy_plan_gathers_stretches_of_take_min_frames_or_more_in_any_order() -> None:
    """``plan_copy``: destinations handed out top down (as the allocator's stacks do) are put
    in ascending order first, so a descending stretch is one gather too, each destination
    with its own source; a stretch of exactly TAKE_MIN frames is a gather, a shorter one is
    stored page by page."""
    k = page_move.TAKE_MIN
    new = np.concatenate(
        [np.arange(109, 99, -1), np.arange(200, 200 + k), np.arange(300, 300 + k - 1)]
    ).astype(np.int64)
    old = np.arange(1000, 1000 + len(new), dtype=np.int64)

    plan = page_move.plan_copy(2048, new, old)

    gathers = [(first, olds.tolist()) for first, olds in plan.gathers]
    assert gathers == [(100, old[:10][::-1].tolist()), (200, old[10 : 10 + k].tolist())]
    assert plan.single_new == list(range(300, 300 + k - 1))
    assert plan.single_old == old[10 + k :].tolist()


def test_the_copier_is_one_thread_running_one_copy_after_another(tmp_path: Path) -> None:
    """``MachineMemory.copier`` is one thread (copies are memory-bound; the other core is the
    loop's): a copy handed over while another runs waits for it, on the same thread."""
    machine = MachineMemory(Path("/dev/shm") / f"vmmem-copier-{os.getpid()}", 2048, 1, False)
    go = threading.Event()
    ran: list[tuple[str, int]] = []

    def first_copy() -> None:
        go.wait(10)
        ran.append(("first", threading.get_ident()))

    def second_copy() -> None:
        ran.append(("second", threading.get_ident()))

    try:
        first = machine.copier.submit(first_copy)
        second = machine.copier.submit(second_copy)
        with pytest.raises(TimeoutError):
            second.result(0.2)  # waits for the first copy
        go.set()
        first.result(10)
        second.result(10)
    finally:
        go.set()
        machine.close()
    assert [name for name, _ in ran] == ["first", "second"]
    assert ran[0][1] == ran[1][1]
