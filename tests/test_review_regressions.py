"""Regression tests for the defects of the code review (fixed in "Review fixes: ...").

Each test drives a real in-process PlatformServer with the scripted ``FakeAgent`` of
``test_services_swap.py``, in the situation the reviewer's reproduction set up:

* a read first touch in the LOW free state waited the whole ``low_wait_seconds``;
* retiring frames when no frame was free raised OutOfMemoryError inside dispatch, which
  dropped the VM and leaked a frame;
* p2mUpdate with the same BPN in two outstanding batches raised KeyError;
* a second daemon started on a live daemon's socket stole it;
* a control request whose arguments made the daemon raise ValueError got no reply.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.machine import HOST_OWNER
from platform_daemon.server import PlatformServer
from shared.config import PlatformConfig
from shared.constants import NO_FRAME, FaultReason, FreeState, PageState, PageStatus, ServiceType
from shared.errors import VMMemError
from shared.layout import SlotState
from shared.messages import FAULT_FLAG_WRITABLE, Fault, FaultReply, Request
from tests.test_services_swap import (
    REPLY_TIMEOUT,
    FakeAgent,
    metric,
    reclaim,
    running_platform,
    wait_until,
)
from vmm_agent.rpc import PeerError, RpcClient

MiB = 1 << 20


def assert_frames_consistent(server: PlatformServer) -> None:
    """No frame leaked: the allocator's counters match its per-frame states, every USED frame
    is owned by a live VM page that maps it, by the host or is a zero frame, every private
    frame of a VM is USED and owned by that page, and no free or retired frame has an owner."""
    machine = server.machine
    alloc = machine.allocator
    st = alloc.frame_state
    assert np.count_nonzero(st == FrameState.FREE) == alloc.free
    assert np.count_nonzero(st == FrameState.USED) == alloc.used
    assert np.count_nonzero(st == FrameState.RETIRED) == alloc.retired
    assert alloc.free + alloc.used + alloc.retired == alloc.host_pages

    used = np.flatnonzero(st == FrameState.USED)
    owner = machine.owner_vm[used]
    host = (owner == HOST_OWNER) | np.isin(used, sorted(machine.zero_frames))
    orphans = used[(owner < 0) & ~host]
    assert len(orphans) == 0, f"USED frames nobody owns (leaked): {orphans[:8].tolist()}"
    assert (machine.owner_vm[st != FrameState.USED] == -1).all(), "a free frame has an owner"
    for vm_id in np.unique(owner[owner >= 0]).tolist():
        assert vm_id in server.vms, f"frames owned by VM {vm_id}, which is gone"
        vm = server.vms[vm_id]
        mpns = used[owner == vm_id]
        bpns = machine.owner_bpn[mpns]
        assert (vm.p2m.frame[bpns] == mpns).all(), "owner map and p2m disagree"
    for vm in server.vms.values():
        p2m = vm.p2m
        private = p2m.frame[(p2m.frame != NO_FRAME) & (p2m.flags == 0)]
        assert len(np.unique(private)) == len(private), "two pages on one frame"
        assert (st[private] == FrameState.USED).all()
        assert (machine.owner_vm[private] == vm.vm_id).all()


# ---- LOW free state: reads need no frame ---------------------------------------------------


@pytest.mark.timeout(60)
async def test_read_first_touch_in_low_is_answered_at_once_write_waits(
    short_tmp: Path, mem_dir: Path
) -> None:
    """In LOW, a read first touch maps the shared zero frame at once (no wait, no low_waits
    count) while a write first touch waits for memory and is served once frames are back."""
    async with running_platform(short_tmp, mem_dir, host_mib=8, low_wait_seconds=5.0) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(256))
        server.memsched.set_host_limit(server.machine.allocator.used)
        server.memsched.tick(time.monotonic())
        assert server.memsched.state == FreeState.LOW
        vm = server.vms[agent.vm_id]
        zero = server.machine.zero_frame[vm.home_node]

        t0 = time.monotonic()
        reply = await agent.fault(600, write=False, around=4)
        assert time.monotonic() - t0 < 1.0, "a read first touch waited in LOW"
        assert reply.reason == FaultReason.FIRST_TOUCH
        assert reply.bpns.tolist() == list(range(600, 605))
        assert (reply.mpns == zero).all()
        assert not (reply.flags & FAULT_FLAG_WRITABLE).any()
        assert vm.stats.low_waits == 0
        assert metric(server, "vmmem_low_memory_waits_total", outcome="served") == 0
        assert metric(server, "vmmem_low_memory_waits_total", outcome="failed") == 0
        await agent.verify(np.arange(600, 605))  # zeros

        # A write first touch needs a frame: it waits, counted, until memory comes back.
        used = server.machine.allocator.used
        t0 = time.monotonic()
        pending = agent.link.request_nowait(Fault(700, True, 0))
        await asyncio.sleep(0.3)
        assert not pending.done(), "a write first touch in LOW did not wait"
        assert vm.stats.low_waits == 1
        assert server.machine.allocator.used == used
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        written = await asyncio.wait_for(pending, REPLY_TIMEOUT)
        assert isinstance(written, FaultReply)
        assert time.monotonic() - t0 >= 0.3
        assert written.reason == FaultReason.FIRST_TOUCH and written.bpns.tolist() == [700]
        assert written.flags[0] & FAULT_FLAG_WRITABLE
        assert int(written.mpns[0]) not in server.machine.zero_frames
        assert metric(server, "vmmem_low_memory_waits_total", outcome="served") == 1
        assert metric(server, "vmmem_low_memory_waits_total", outcome="failed") == 0
        agent.install(written)
        await agent.write_pages([700])
        await agent.verify(np.concatenate((np.arange(256), [700])))
        assert agent.errors == []
        await agent.close()


# ---- retire when memory is exhausted --------------------------------------------------------


@pytest.mark.timeout(60)
async def test_retire_without_free_frames_keeps_pages_and_vm_then_moves_them(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Frames of pages on both NUMA nodes retired with one free frame left: one page moves,
    the others stay resident on their failing frames with their bytes, the VM stays connected
    and no frame leaks; once another VM frees memory, every page moves off its failing frame
    and every failing frame ends RETIRED."""
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        alloc = server.machine.allocator
        big = await FakeAgent.connect(server, "big", guest_pages=1400)
        await big.write_pages(np.arange(1400))
        spare = alloc.free - 1
        filler = await FakeAgent.connect(server, "filler", guest_pages=spare)
        await filler.write_pages(np.arange(spare))
        assert alloc.free == 1
        vm = server.vms[big.vm_id]

        nodes = alloc.node_of(big.frame[:1400])
        victims = np.concatenate(
            [np.flatnonzero(nodes == n)[[0, -1]] for n in range(server.machine.nodes)]
        )
        assert len(np.unique(nodes[victims])) == 2, "the victims must span both nodes"
        old = big.frame[victims].copy()
        for mpn in old.tolist():
            result = await big.link.ctl("retire", mpn=mpn, timeout=REPLY_TIMEOUT)
            assert result["was"] == "used" and result["page_state"] == "exposed"

        batches = await big.round()
        assert [int(r.service) for r, _, _ in batches] == [ServiceType.PAGE_RETIRE]
        req, offered, accepted = batches[0]
        assert sorted(offered.tolist()) == sorted(victims.tolist()) == sorted(accepted.tolist())
        status = await big.barrier()  # the VM is still served
        assert [v["name"] for v in status["vms"]] == ["big", "filler"]
        outcome = big.region.slot(req.slot).status[: req.count].tolist()
        assert sorted(outcome) == sorted([PageStatus.OK] + [PageStatus.NO_SPACE] * 3)
        batch_pages = "vmmem_platform_batch_pages_total"
        assert metric(server, batch_pages, service="page_retire", outcome="no_space") == 3
        assert alloc.free == 0 and alloc.retired == 1
        moved = offered[np.array(outcome) == PageStatus.OK]
        stuck = offered[np.array(outcome) == PageStatus.NO_SPACE]
        assert (vm.p2m.state[victims] == PageState.RESIDENT).all()
        assert not np.isin(vm.p2m.frame[moved], old).any()
        frame_of = dict(zip(victims.tolist(), old.tolist(), strict=True))
        assert vm.p2m.frame[stuck].tolist() == [frame_of[b] for b in stuck.tolist()]
        assert server.machine.failing[vm.p2m.frame[stuck]].all()
        assert (alloc.frame_state[vm.p2m.frame[stuck]] == FrameState.USED).all()
        assert vm.stats.retired_moves == 1
        assert big.errors == []
        assert_frames_consistent(server)

        # Retire the frame the moved page just got while no frame at all is free: that page
        # is resident (nobody maps it), so retire tries to move it at once, and cannot.
        second = int(vm.p2m.frame[moved[0]])
        result = await big.link.ctl("retire", mpn=second, timeout=REPLY_TIMEOUT)
        assert result["was"] == "used" and result["page_state"] == "resident"
        assert int(vm.p2m.frame[moved[0]]) == second
        assert big.vm_id in server.vms and big.errors == []
        assert_frames_consistent(server)

        # Content is intact on the failing frames: read some back through faults (REMAP, no
        # frame needed); the rest stays resident. Rounds meanwhile lose nothing.
        read_back = np.concatenate((stuck[:2], moved))
        reasons = await big.verify(read_back)
        assert reasons == {"REMAP": len(read_back)}
        assert (big.frame[read_back] == vm.p2m.frame[read_back]).all()
        for _, offered_again, _ in await big.round():
            assert set(offered_again.tolist()) <= set(read_back.tolist())
        await big.barrier()
        assert big.vm_id in server.vms and big.errors == []
        assert alloc.free == 0 and alloc.retired == 1
        assert server.machine.failing[vm.p2m.frame[read_back]].all()
        await big.verify(stuck[:1])  # exposed again: the next move goes through a batch
        assert_frames_consistent(server)

        # Memory comes back (the other VM goes away): the retire queue empties.
        await filler.close()
        await wait_until(lambda: filler.vm_id not in server.vms, "the filler VM to go")
        retired_total = len(victims) + 1
        batches = await big.round()
        assert [int(r.service) for r, _, _ in batches] == [ServiceType.PAGE_RETIRE]
        assert batches[0][1].tolist() == [int(stuck[0])]
        await big.barrier()
        assert alloc.retired == retired_total
        failing = np.concatenate((old, [second]))
        assert (alloc.frame_state[failing] == FrameState.RETIRED).all()
        assert not server.machine.failing[failing].any()
        assert not np.isin(vm.p2m.frame, failing).any()
        assert vm.stats.retired_moves == retired_total
        assert not big.region.pending & ServiceType.PAGE_RETIRE.bit
        await big.verify(np.arange(1400))
        assert big.errors == []
        assert_frames_consistent(server)
        await big.close()
        await wait_until(lambda: not server.vms, "the VM to be released")
        assert_frames_consistent(server)
        assert alloc.retired == retired_total


# ---- p2mUpdate: one BPN in two batches ------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first_done", ["older", "newer"])
async def test_p2m_update_same_bpn_queued_twice_while_its_batch_is_outstanding(
    short_tmp: Path, mem_dir: Path, first_done: str
) -> None:
    """A page whose p2mUpdate batch (old zero frame o1) is outstanding is queued again when
    the new zero frame n1 is retired too: with two batches outstanding nothing raises, no BPN
    is in two outstanding batches, the VM stays connected, and once the batches complete (in
    either order) both o1 and n1 end RETIRED."""
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=256)
        await agent.fault(0, write=False, around=7)
        vm = server.vms[agent.vm_id]
        alloc = server.machine.allocator
        p2m_update: Any = server.services[ServiceType.P2M_UPDATE]
        o1 = server.machine.zero_frame[vm.home_node]
        assert (agent.frame[:8] == o1).all()
        await agent.link.ctl("retire", mpn=o1, timeout=REPLY_TIMEOUT)
        req1 = await agent.get_request()
        assert req1.service == ServiceType.P2M_UPDATE and req1.count == 8

        # Page 0 faults while SELECTED (now mapped on the new zero frame n1), pages 8..15 are
        # first read on n1; then n1 is retired as well: pages 0..15 are queued for n1.
        n1 = server.machine.zero_frame[vm.home_node]
        assert n1 != o1
        reply = await agent.fault(0, write=False)
        assert int(reply.mpns[0]) == n1
        await agent.fault(8, write=False, around=7)
        assert (vm.p2m.frame[:16] == n1).all()
        assert (agent.frame[1:8] == o1).all()  # the VMM still maps these on o1
        result = await agent.link.ctl("retire", mpn=n1, timeout=REPLY_TIMEOUT)
        assert result["was"] == "zero_frame" and result["stale_pages"] == 16

        outstanding: list[Request] = [req1]
        while (req := await agent.get_request()).has_work:
            outstanding.append(req)
        assert len(outstanding) >= 2, "the second batch was not issued"
        assert len({r.slot for r in outstanding}) == len(outstanding)
        offered = [set(agent.batch(r)[0].tolist()) for r in outstanding]
        assert sum(len(s) for s in offered) == len(set().union(*offered)), (
            "a BPN is in two outstanding batches"
        )
        assert set(range(8, 16)) <= set().union(*offered[1:])
        assert (agent.batch(outstanding[1])[2] == n1).all()

        order = outstanding if first_done == "older" else outstanding[::-1]
        for r in order:
            agent.decide(r)
            agent.complete(r)
            await agent.barrier()
        assert agent.errors == [] and agent.vm_id in server.vms
        for r in outstanding:
            assert agent.region.slot(r.slot).read_header()[1] == SlotState.FREE
        assert alloc.frame_state[o1] == FrameState.RETIRED

        # The deferred pages get their own batch in a later round.
        for _ in range(5):
            await agent.round()
            await agent.barrier()
            if p2m_update.stale_frames() == 0:
                break
        assert alloc.frame_state[o1] == FrameState.RETIRED
        assert alloc.frame_state[n1] == FrameState.RETIRED
        assert not server.machine.failing[[o1, n1]].any()
        assert p2m_update.stale_frames() == 0
        assert p2m_update.old_of == {} and p2m_update.since == {}
        assert not p2m_update.queues.get(vm.vm_id)
        assert metric(server, "vmmem_p2m_stale_mapping_seconds_count") == 8 + 16
        assert agent.errors == [] and agent.vm_id in server.vms
        status = await agent.barrier()
        assert status["host"]["retired"] == 2

        # Every page still reads zeros, now from the current zero frame.
        await agent.verify(np.arange(16))
        current = server.machine.zero_frame[vm.home_node]
        assert current not in (o1, n1)
        assert (agent.frame[:16] == current).all()
        assert_frames_consistent(server)
        await agent.close()


# ---- a second daemon on a live socket --------------------------------------------------------


@pytest.fixture
def second_mem_dir(short_tmp: Path) -> Iterator[Path]:
    """A mem_dir of its own for the second daemon, so what it leaves behind can be listed."""
    path = Path("/dev/shm") / f"vmmem-test2-{os.getpid()}-{short_tmp.name}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("same_swap_file", [False, True])
async def test_second_daemon_on_live_socket_fails_and_leaves_first_intact(
    short_tmp: Path, mem_dir: Path, second_mem_dir: Path, same_swap_file: bool
) -> None:
    """A second PlatformServer on the socket of a live one fails with a clear error; the first
    keeps its socket (clients connect and get status) and its swapped pages; the second
    leaves no machine file in its mem_dir and no swap file (nor removes the first's)."""
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=512)
        written = np.arange(400)
        await agent.write_pages(written)
        server.memsched.set_host_limit(server.machine.allocator.used - 40)
        await reclaim(server, [agent])
        vm = server.vms[agent.vm_id]
        swapped = np.flatnonzero(vm.p2m.state == PageState.SWAPPED)
        assert len(swapped) >= 40
        first_swap = server.config.swap_file
        assert first_swap is not None and first_swap.exists()

        own_swap = short_tmp / "swap2"
        cfg = PlatformConfig(
            socket=server.config.socket,
            mem_dir=second_mem_dir,
            host_memory=8 * MiB,
            metrics_port=-1,
            swap_file=first_swap if same_swap_file else own_swap,
            swap_size=4 * MiB,
            log_level="warning",
        )
        t0 = time.monotonic()
        with pytest.raises(VMMemError, match="another daemon is serving"):
            second = PlatformServer(cfg)
            await asyncio.wait_for(second.serve(), REPLY_TIMEOUT)
        assert time.monotonic() - t0 < 5.0

        assert server.config.socket.is_socket()
        assert sorted(os.listdir(second_mem_dir)) == []
        assert not own_swap.exists()
        assert first_swap.exists(), "the second daemon removed the live daemon's swap file"
        client = await RpcClient.connect(str(server.config.socket))
        try:
            status = await client.ctl("status", timeout=REPLY_TIMEOUT)
        finally:
            client.close()
        assert status["pid"] == os.getpid()
        assert [v["name"] for v in status["vms"]] == ["vm1"]
        assert (await agent.barrier())["swap"]["used"] == len(swapped)

        # The live daemon's swapped pages still come back intact.
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        reasons = await agent.verify(written)
        assert reasons["SWAP_IN"] >= 1
        assert agent.errors == []
        await agent.close()
    assert not server.config.socket.exists()


@pytest.mark.timeout(60)
async def test_second_daemon_built_before_the_first_listens_fails_at_startup(
    short_tmp: Path, mem_dir: Path, second_mem_dir: Path
) -> None:
    """A second PlatformServer built while the socket was free, started once the first one
    serves it, fails in startup with a clear error, leaves the first's socket working and
    removes its own machine and swap files."""
    own_swap = short_tmp / "swap2"
    cfg = PlatformConfig(
        socket=short_tmp / "p.sock",
        mem_dir=second_mem_dir,
        host_memory=8 * MiB,
        metrics_port=-1,
        swap_file=own_swap,
        swap_size=4 * MiB,
        log_level="warning",
    )
    second = PlatformServer(cfg)
    assert own_swap.exists() and os.listdir(second_mem_dir)
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        assert server.config.socket == cfg.socket
        with pytest.raises(VMMemError, match="another daemon is serving"):
            await asyncio.wait_for(second.serve(), REPLY_TIMEOUT)
        assert server.config.socket.is_socket()
        assert sorted(os.listdir(second_mem_dir)) == []
        assert not own_swap.exists()
        agent = await FakeAgent.connect(server, "vm1", guest_pages=64)
        await agent.write_pages(np.arange(8))
        status = await agent.barrier()
        assert [v["name"] for v in status["vms"]] == ["vm1"]
        await agent.verify(np.arange(8))
        await agent.close()


@pytest.mark.timeout(60)
async def test_socket_left_by_a_dead_daemon_is_replaced(short_tmp: Path, mem_dir: Path) -> None:
    """A socket file nobody listens on (its daemon died) does not stop a new daemon: it is
    replaced and served."""
    path = short_tmp / "p.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=64)
        assert (await agent.barrier())["vms"][0]["name"] == "vm1"
        await agent.close()
    assert not path.exists()


# ---- control requests that raise ValueError -------------------------------------------------


@pytest.mark.timeout(60)
async def test_ctl_request_raising_value_error_gets_an_error_reply(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A control request whose arguments make the daemon raise ValueError (retire with
    random_used and seed=-1) gets CtlReply ok=False at once, not a timeout, and changes
    nothing; the connection keeps working."""
    async with running_platform(short_tmp, mem_dir, host_mib=8) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=256)
        await agent.write_pages(np.arange(64))
        t0 = time.monotonic()
        with pytest.raises(PeerError) as info:
            await agent.link.ctl("retire", random_used=True, seed=-1, timeout=5.0)
        assert time.monotonic() - t0 < 2.0
        assert str(info.value)
        assert server.machine.allocator.retired == 0
        assert not server.machine.failing.any()
        status = await agent.barrier()
        assert status["host"]["retired"] == 0
        assert agent.vm_id in server.vms and agent.errors == []
        await agent.verify(np.arange(64))
        await agent.close()
