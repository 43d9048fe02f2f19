"""The swap service of a real in-process PlatformServer, driven by a scripted fake agent.

The fake agent (``FakeAgent``) speaks the wire protocol through ``RpcClient`` and maps machine
memory and its control region like ``vmm_agent/agent.py`` does, but every step is explicit:
the test decides which faults to send, which batches to ask for and what to answer. Content
is real: pages get unique bytes, and whatever moves through swap must come back identical.

The helpers here (``running_platform``, ``FakeAgent``, ``reclaim``, ``wait_until``) are also
used by ``test_services_retire.py`` and ``test_disconnect.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.server import PlatformServer
from shared.config import PlatformConfig
from shared.constants import (
    NO_FRAME,
    PAGE_SIZE,
    FaultReason,
    PageState,
    PageStatus,
    Priority,
    ServiceType,
)
from shared.errors import ErrorCode
from shared.layout import ControlRegion, SlotState
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    CompleteRequest,
    Error,
    Fault,
    FaultReply,
    GetRequest,
    Kick,
    Message,
    Register,
    Registered,
    Request,
)
from shared.shm import frames_view, open_mapped
from vmm_agent.rpc import PeerError, RpcClient

MiB = 1 << 20
REPLY_TIMEOUT = 10.0


# ---- helpers shared by the fake-peer tests ---------------------------------------------------


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``pred`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_platform(
    tmp: Path,
    mem_dir: Path,
    *,
    host_mib: int = 16,
    swap_file: Path | None = None,
    swap_size: int = 8 * MiB,
    **config: Any,
) -> AsyncIterator[PlatformServer]:
    """A real PlatformServer on ``tmp/p.sock`` in this event loop; memsched is ticked by the
    tests themselves (no main loop), so every reclaim step is deterministic."""
    cfg = PlatformConfig(
        socket=tmp / "p.sock",
        mem_dir=mem_dir,
        host_memory=host_mib * MiB,
        metrics_port=-1,
        swap_file=swap_file if swap_file is not None else tmp / "swap",
        swap_size=swap_size,
        log_level="warning",
        **config,
    )
    server = PlatformServer(cfg)
    await server.startup()
    try:
        yield server
    finally:
        server.request_stop()
        await server.shutdown()


def pattern(tag: int, bpn: int, version: int = 0) -> npt.NDArray[np.uint8]:
    """Unique, deterministic content of page ``bpn`` of VM ``tag`` at ``version``."""
    page = np.random.default_rng([tag, bpn, version]).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    page[:8] = np.frombuffer(np.uint64(bpn).tobytes(), np.uint8)
    return page


def metric(server: PlatformServer, name: str, **labels: str) -> float:
    value = server.metrics_registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def swap_in_flight(server: PlatformServer) -> int:
    return sum(server.services[ServiceType.SWAP].in_flight.values())  # type: ignore[attr-defined]


class FakeAgent:
    """A scripted VMM: explicit faults, batches and verdicts, real bytes in real frames."""

    def __init__(
        self,
        link: RpcClient,
        unsolicited: list[Message],
        reg: Registered,
        guest_pages: int,
        tag: int,
    ) -> None:
        self.link = link
        self.unsolicited = unsolicited
        self.reg = reg
        self.tag = tag
        self.guest_pages = guest_pages
        self.machine = open_mapped(Path(reg.machine_memory_path), reg.host_pages * PAGE_SIZE)
        self.frames: Any = frames_view(self.machine)
        self.region_file = open_mapped(Path(reg.control_region_path))
        self.region = ControlRegion(self.region_file.mm)
        assert (self.region.vm_id, self.region.generation) == (reg.vm_id, reg.generation)
        # The exposure table: what this VMM maps.
        self.frame = np.full(guest_pages, NO_FRAME, dtype=np.int64)
        self.writable = np.zeros(guest_pages, dtype=bool)
        # What every written page must contain.
        self.expected = np.zeros((guest_pages, PAGE_SIZE), dtype=np.uint8)
        self.written = np.zeros(guest_pages, dtype=bool)
        self.reasons: Counter[str] = Counter()

    @classmethod
    async def connect(
        cls, server: PlatformServer, name: str, guest_pages: int, **register: Any
    ) -> FakeAgent:
        unsolicited: list[Message] = []
        link = await RpcClient.connect(str(server.config.socket), on_message=unsolicited.append)
        reg = await link.request(
            Register(name=name, guest_pages=guest_pages, vcpus=1, **register), REPLY_TIMEOUT
        )
        assert isinstance(reg, Registered)
        return cls(link, unsolicited, reg, guest_pages, tag=reg.vm_id)

    @property
    def vm_id(self) -> int:
        return self.reg.vm_id

    @property
    def kicks(self) -> list[Kick]:
        return [m for m in self.unsolicited if isinstance(m, Kick)]

    @property
    def errors(self) -> list[Error]:
        return [m for m in self.unsolicited if isinstance(m, Error)]

    async def close(self) -> None:
        self.link.close()
        await asyncio.wait_for(asyncio.shield(self.link.closed), REPLY_TIMEOUT)
        self.unmap()

    def unmap(self) -> None:
        self.frames = None
        self.machine.close()
        self.region_file.close()

    # ---- faults ---------------------------------------------------------------------------

    def install(self, reply: FaultReply) -> None:
        idx = reply.bpns.astype(np.int64)
        self.frame[idx] = reply.mpns
        self.writable[idx] = (reply.flags & FAULT_FLAG_WRITABLE) != 0
        self.reasons[FaultReason(reply.reason).name] += 1

    async def fault(self, bpn: int, write: bool = False, around: int = 0) -> FaultReply:
        reply = await self.link.request(Fault(bpn, write, around), REPLY_TIMEOUT)
        assert isinstance(reply, FaultReply), reply
        assert int(reply.bpns[0]) == bpn
        self.install(reply)
        return reply

    async def write_pages(self, bpns: Any, version: int = 0) -> None:
        """Make ``bpns`` writable (fault-around on the way) and fill them with unique bytes."""
        bpns = np.asarray(bpns, dtype=np.int64)
        wanted = set(bpns.tolist())
        for bpn in bpns.tolist():
            if not self.writable[bpn]:
                # Fault-around over the next pages of the set only: nothing else gets mapped.
                around = 0
                while around < 16 and bpn + around + 1 in wanted:
                    around += 1
                await self.fault(bpn, write=True, around=around)
            assert self.writable[bpn]
        for bpn in bpns.tolist():
            self.expected[bpn] = pattern(self.tag, bpn, version)
        self.frames[self.frame[bpns]] = self.expected[bpns]
        self.written[bpns] = True

    async def verify(self, bpns: Any) -> Counter[str]:
        """Every page in ``bpns`` reads back what was written (faulting in what is not
        exposed); returns the fault reasons it took."""
        reasons: Counter[str] = Counter()
        for bpn in np.asarray(bpns, dtype=np.int64).tolist():
            if self.frame[bpn] < 0:
                reply = await self.fault(bpn, write=False)
                reasons[FaultReason(reply.reason).name] += 1
            got = self.frames[self.frame[bpn]]
            assert np.array_equal(got, self.expected[bpn]), f"vm {self.tag} BPN {bpn}: corrupt"
        return reasons

    # ---- batches --------------------------------------------------------------------------

    async def get_request(self) -> Request:
        req = await self.link.request(GetRequest(Priority.HIGH), REPLY_TIMEOUT)
        assert isinstance(req, Request), req
        return req

    def batch(self, req: Request) -> tuple[Any, Any, Any]:
        """The slot of ``req`` as the daemon filled it: (bpn, status, mpn) views."""
        slot = self.region.slot(req.slot)
        stype, state, count, seq = slot.read_header()
        assert (stype, state, count, seq) == (req.service, SlotState.ISSUED, req.count, req.seq)
        return slot.batch(count)

    def decide(
        self, req: Request, verdict: Callable[[Any, Any, Any], None] | None = None
    ) -> npt.NDArray[np.int64]:
        """Write a status per page like the real agent (frame checks, p2mUpdate filter), then
        let ``verdict(bpns, mpns, status)`` change them; stop exposing the accepted pages."""
        bpn_view, status, mpns = self.batch(req)
        bpns = bpn_view.astype(np.int64)
        status[:] = PageStatus.OK
        status[self.frame[bpns] != mpns] = PageStatus.STALE_FRAME
        status[self.frame[bpns] < 0] = PageStatus.NOT_EXPOSED
        if req.service == ServiceType.P2M_UPDATE:
            status[(status == PageStatus.OK) & self.writable[bpns]] = PageStatus.NOT_SHARED
        if verdict is not None:
            verdict(bpns, mpns, status)
        accepted: npt.NDArray[np.int64] = bpns[status == PageStatus.OK]
        self.frame[accepted] = NO_FRAME
        self.writable[accepted] = False
        return accepted

    def complete(self, req: Request) -> None:
        self.link.send(CompleteRequest(req.slot, req.count, req.seq))

    async def round(
        self, verdict: Callable[[Any, Any, Any], None] | None = None
    ) -> list[tuple[Request, npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
        """One high-priority round; returns (request, BPNs offered, BPNs accepted) per batch."""
        done = []
        while (req := await self.get_request()).has_work:
            offered = self.batch(req)[0].astype(np.int64)
            accepted = self.decide(req, verdict)
            self.complete(req)
            done.append((req, offered, accepted))
        return done

    async def barrier(self) -> dict[str, Any]:
        """A control request on this connection: its reply comes after everything sent
        before it was dispatched (and shows the daemon is still serving)."""
        return await self.link.ctl("status", timeout=REPLY_TIMEOUT)


async def reclaim(server: PlatformServer, agents: list[FakeAgent], max_ticks: int = 100) -> int:
    """Tick memsched and let the agents run rounds (accepting everything) until reclaim is
    over or ``max_ticks`` ticks passed; waits for every swap write to land after each round.
    Returns the number of ticks that found reclaim still needed."""
    ticks = 0
    for _ in range(max_ticks):
        server.memsched.tick(time.monotonic())
        if not server.memsched.reclaiming:
            break
        ticks += 1
        for agent in agents:
            await agent.round()
        await wait_until(lambda: swap_in_flight(server) == 0, "swap writes to land")
    return ticks


def page_states(server: PlatformServer, agent: FakeAgent) -> npt.NDArray[np.uint8]:
    return server.vms[agent.vm_id].p2m.state


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_swap_out_under_pressure_and_back_in_with_content_intact(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Under a host limit below what the VM uses, memsched sets a swap target, the swap
    service releases pages in batches, their frames go back to the allocator and their bytes
    to swap slots; faulting them back in (after the limit is lifted) returns every byte."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 600, dtype=np.int64)
        await agent.write_pages(written)
        alloc = server.machine.allocator
        used_before = alloc.used
        assert used_before >= len(written)

        server.memsched.set_host_limit(used_before - 150)
        ticks = await reclaim(server, [agent])
        assert ticks >= 1
        states = page_states(server, agent)
        swapped = np.flatnonzero(states == PageState.SWAPPED)
        assert len(swapped) >= 150, f"only {len(swapped)} pages swapped"
        assert np.isin(swapped, written).all()
        assert server.swap is not None and server.swap.used == len(swapped)
        assert alloc.used == used_before - len(swapped)
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.frame[swapped] == NO_FRAME).all()
        assert len(np.unique(vm.p2m.swap_slot[swapped])) == len(swapped)
        assert vm.stats.swapped_out == len(swapped)
        assert metric(server, "vmmem_swap_pages_total", direction="out") == len(swapped)
        assert metric(
            server, "vmmem_platform_batch_pages_total", service="swap", outcome="ok"
        ) == len(swapped)
        assert agent.kicks, "memsched never kicked the VM"

        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        # Three vCPUs fault on each of a few swapped pages at once: one read per page, and
        # every fault gets the same new frame.
        racers = swapped[:8]
        futures = [
            agent.link.request_nowait(Fault(bpn, False, 0))
            for bpn in racers.tolist()
            for _ in range(3)
        ]
        replies = await asyncio.wait_for(asyncio.gather(*futures), REPLY_TIMEOUT)
        for i, bpn in enumerate(racers.tolist()):
            trio = replies[3 * i : 3 * i + 3]
            assert {int(r.mpns[0]) for r in trio} == {int(vm.p2m.frame[bpn])}
            assert sorted(FaultReason(r.reason).name for r in trio) == [
                "MAPPED",
                "MAPPED",
                "SWAP_IN",
            ]
            agent.install(trio[0])
        assert vm.stats.swapped_in == len(racers)
        reasons = await agent.verify(written)
        assert reasons["SWAP_IN"] == len(swapped) - len(racers)
        assert server.swap.used == 0
        assert (states[written] == PageState.EXPOSED).all()
        assert vm.stats.swapped_in == len(swapped)
        assert metric(server, "vmmem_swap_pages_total", direction="in") == len(swapped)
        await agent.close()


@pytest.mark.timeout(60)
async def test_fault_storm_on_in_flight_swap_outs_cancels_each_page_once(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Faults on pages whose swap-out is in flight cancel it: however many faults hit the
    same page at once, its swap-out is cancelled exactly once, every fault is answered with
    the page's own frame at once (not after the write), and when the delayed write lands the
    cancelled pages are not marked swapped and their slots are free again."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 512, dtype=np.int64)
        await agent.write_pages(written)
        assert server.swap is not None
        armed = await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 1.5})
        assert armed == {"armed": "swap_write_delay", "value": 1.5}

        server.memsched.set_host_limit(server.machine.allocator.used - 60)
        server.memsched.tick(time.monotonic())
        req = await agent.get_request()
        assert req.has_work and req.service == ServiceType.SWAP
        offered = agent.batch(req)[0].astype(np.int64)
        frames_of = dict(zip(offered.tolist(), agent.frame[offered].tolist(), strict=True))
        accepted = agent.decide(req)
        assert len(accepted) == req.count >= 16
        agent.complete(req)
        await agent.barrier()
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.state[accepted] == PageState.IN_FLIGHT).all()
        assert swap_in_flight(server) == len(accepted)
        assert server.swap.used == len(accepted)

        # The storm: 5 faults on each of 16 in-flight pages, all on the wire at once.
        victims = accepted[:16]
        t0 = time.monotonic()
        futures = [
            (bpn, agent.link.request_nowait(Fault(bpn, write=bool(i % 2), around=0)))
            for i in range(5)
            for bpn in victims.tolist()
        ]
        replies = await asyncio.wait_for(asyncio.gather(*(f for _, f in futures)), REPLY_TIMEOUT)
        assert time.monotonic() - t0 < 1.0, "faults waited for the delayed write"
        assert swap_in_flight(server) == len(accepted) - len(victims), "write already landed"
        by_page: dict[int, list[FaultReply]] = {}
        for (bpn, _), reply in zip(futures, replies, strict=True):
            assert isinstance(reply, FaultReply)
            assert reply.bpns.tolist() == [bpn]
            assert int(reply.mpns[0]) == frames_of[bpn], "fault answered with another frame"
            assert reply.flags[0] & FAULT_FLAG_WRITABLE
            by_page.setdefault(bpn, []).append(reply)
            agent.install(reply)
        for bpn, page_replies in by_page.items():
            reasons = sorted(FaultReason(r.reason).name for r in page_replies)
            assert reasons == ["CANCEL", *["MAPPED"] * 4], (bpn, reasons)
        assert vm.stats.swap_cancelled == len(victims)
        assert metric(server, "vmmem_swap_cancelled_pages_total") == len(victims)
        assert metric(server, "vmmem_platform_faults_total", reason="cancel") == len(victims)
        # The guest writes new content into half of the pages it got back before the stale
        # write lands: the discarded write must not matter.
        await agent.write_pages(victims[::2], version=1)
        await agent.verify(victims)

        await wait_until(lambda: swap_in_flight(server) == 0, "the delayed write to land")
        rest = np.setdiff1d(accepted, victims)
        assert (vm.p2m.state[victims] == PageState.EXPOSED).all()
        assert (vm.p2m.swap_slot[victims] == -1).all()
        assert vm.p2m.frame[victims].tolist() == [frames_of[b] for b in victims.tolist()]
        alloc = server.machine.allocator
        assert (alloc.frame_state[vm.p2m.frame[victims]] == FrameState.USED).all()
        assert (vm.p2m.state[rest] == PageState.SWAPPED).all()
        assert server.swap.used == len(rest)
        assert set(np.flatnonzero(server.swap.in_use).tolist()) == set(
            vm.p2m.swap_slot[rest].tolist()
        )
        assert vm.stats.swapped_out == len(rest)
        await agent.verify(victims)

        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 0})
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        final = await agent.verify(written)
        assert final["SWAP_IN"] == len(rest)
        assert server.swap.used == 0
        await agent.close()


@pytest.fixture
def small_tmpfs(short_tmp: Path) -> Any:
    """A 256 KiB tmpfs (64 pages) for a swap file that runs out of disk space."""
    path = short_tmp / "fs"
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        reason = f"cannot mount a small tmpfs: {proc.stderr.strip() or proc.returncode}"
        if in_ci():
            pytest.fail(f"{reason} (CI=true, so this is a failure)")
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


@pytest.mark.timeout(60)
async def test_enospc_keeps_pages_resident_and_daemon_serving(
    short_tmp: Path, mem_dir: Path, small_tmpfs: Path
) -> None:
    """A swap file larger than its filesystem: once the disk is full, writes fail with
    ENOSPC; the pages of those batches stay resident (their bytes intact), their slots go
    back, metrics count them as no_space, and the daemon goes on serving faults, batches and
    control requests."""
    async with running_platform(
        short_tmp, mem_dir, host_mib=16, swap_file=small_tmpfs / "swap", swap_size=2 * MiB
    ) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 700, dtype=np.int64)
        await agent.write_pages(written)
        assert server.swap is not None and server.swap.slots == 512

        server.memsched.set_host_limit(server.machine.allocator.used - 200)
        await reclaim(server, [agent], max_ticks=12)
        vm = server.vms[agent.vm_id]
        states = vm.p2m.state
        swapped = np.flatnonzero(states == PageState.SWAPPED)
        resident = np.flatnonzero(states == PageState.RESIDENT)
        no_space = metric(server, "vmmem_swap_errors_total", reason="no_space")
        assert 0 < len(swapped) <= 64, "the 256 KiB filesystem holds at most 64 pages"
        assert no_space > 0, "no write failed for lack of space"
        assert len(resident) == no_space, "pages of failed writes must stay resident"
        assert server.swap.used == len(swapped)
        assert metric(server, "vmmem_swap_errors_total", reason="io_error") == 0
        alloc = server.machine.allocator
        assert (alloc.frame_state[vm.p2m.frame[resident]] == FrameState.USED).all()
        assert (server.machine.owner_vm[vm.p2m.frame[resident]] == vm.vm_id).all()

        # Still serving: control, batches, faults on resident pages (no frame needed).
        status = await agent.barrier()
        assert status["swap"]["used"] == len(swapped)
        await agent.round()
        await wait_until(lambda: swap_in_flight(server) == 0, "swap writes to land")
        resident = np.flatnonzero(vm.p2m.state == PageState.RESIDENT)
        reasons = await agent.verify(resident)
        assert reasons["REMAP"] == len(resident)
        assert agent.errors == []

        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        await agent.verify(written)
        await agent.write_pages(np.arange(700, 800), version=0)  # new first touches work
        await agent.verify(np.arange(0, 800))
        assert server.swap.used == 0
        await agent.close()


@pytest.mark.timeout(60)
async def test_swap_file_full_gives_no_space_status(short_tmp: Path, mem_dir: Path) -> None:
    """When the swap file has fewer free slots than a completed batch needs (two batches
    were outstanding at once), the pages left over get status NO_SPACE in the slot, stay
    resident and keep their bytes; metrics count them under no_space."""
    tiny = 16 * PAGE_SIZE
    async with running_platform(short_tmp, mem_dir, host_mib=16, swap_size=tiny) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=512)
        written = np.arange(0, 400, dtype=np.int64)
        await agent.write_pages(written)
        server.memsched.set_host_limit(server.machine.allocator.used - 100)
        server.memsched.tick(time.monotonic())
        first = await agent.get_request()
        second = await agent.get_request()  # before completing the first: both fit 16 slots
        assert first.has_work and second.has_work
        assert first.count == second.count == 16
        accepted = [agent.decide(first), agent.decide(second)]
        agent.complete(first)
        agent.complete(second)
        await agent.barrier()
        assert agent.region.slot(first.slot).status[:16].tolist() == [PageStatus.OK] * 16
        assert agent.region.slot(second.slot).status[:16].tolist() == [PageStatus.NO_SPACE] * 16
        assert agent.region.slot(second.slot).read_header()[1] == SlotState.FREE
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.state[accepted[1]] == PageState.RESIDENT).all()
        assert (vm.p2m.op[accepted[1]] == 0xFF).all()  # no operation holds them any more
        assert metric(server, "vmmem_swap_errors_total", reason="no_space") == 16
        assert (
            metric(server, "vmmem_platform_batch_pages_total", service="swap", outcome="no_space")
            == 16
        )
        await wait_until(lambda: swap_in_flight(server) == 0, "swap writes to land")
        # Full swap file: no more swap work is offered, and every page is intact.
        assert not (await agent.get_request()).has_work
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        reasons = await agent.verify(written)
        assert reasons == Counter({"SWAP_IN": 16, "REMAP": 16})
        await agent.close()


@pytest.mark.timeout(60)
async def test_injected_write_error_loses_nothing(short_tmp: Path, mem_dir: Path) -> None:
    """A failed swap write (failpoint swap_write_error, EIO) frees no frame: the pages stay
    resident with their bytes, their slots go back, metrics count io_error, and the next
    writes succeed."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 512, dtype=np.int64)
        await agent.write_pages(written)
        armed = await agent.link.ctl("failpoint", name="swap_write_error", value=5)
        assert armed["armed"] == "swap_write_error"
        assert server.swap is not None

        used = server.machine.allocator.used
        server.memsched.set_host_limit(used - 40)
        server.memsched.tick(time.monotonic())
        batches = await agent.round()
        assert len(batches) == 1
        accepted = batches[0][2]
        await wait_until(lambda: swap_in_flight(server) == 0, "the failing write")
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.state[accepted] == PageState.RESIDENT).all()
        assert metric(server, "vmmem_swap_errors_total", reason="io_error") == len(accepted)
        assert server.swap.used == 0
        assert server.machine.allocator.used == used
        assert vm.stats.swapped_out == 0
        reasons = await agent.verify(accepted)
        assert reasons == Counter({"REMAP": len(accepted)})

        # Swap-outs back off for a while after a failed write, then reclaim works again
        # (the failpoint fired once).
        swap_svc: Any = server.services[ServiceType.SWAP]
        assert swap_svc.paused_until > 0
        server.memsched.tick(time.monotonic())
        if time.monotonic() < swap_svc.paused_until:
            assert not swap_svc.has_work(vm)
        await wait_until(lambda: time.monotonic() >= swap_svc.paused_until, "the back-off")
        await reclaim(server, [agent])
        assert vm.stats.swapped_out > 0
        assert server.swap.used == np.count_nonzero(vm.p2m.state == PageState.SWAPPED)
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        await agent.verify(written)
        await agent.close()


@pytest.mark.timeout(60)
async def test_corrupt_swap_slot_is_detected_by_checksum(short_tmp: Path, mem_dir: Path) -> None:
    """A swapped page whose slot was changed on disk is caught by its checksum on swap-in:
    the fault gets an Error (never the wrong bytes), the page stays swapped, and every other
    page still swaps in intact on the same connection."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 512, dtype=np.int64)
        await agent.write_pages(written)
        server.memsched.set_host_limit(server.machine.allocator.used - 50)
        await reclaim(server, [agent])
        vm = server.vms[agent.vm_id]
        swapped = np.flatnonzero(vm.p2m.state == PageState.SWAPPED)
        assert len(swapped) >= 50
        victim = int(swapped[len(swapped) // 2])
        slot = int(vm.p2m.swap_slot[victim])
        assert server.swap is not None
        with open(server.swap.path, "r+b") as fh:
            fh.seek(slot * PAGE_SIZE + 1000)
            fh.write(b"\xa5" * 8)

        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        with pytest.raises(PeerError) as info:
            await agent.fault(victim, write=False)
        assert info.value.code == ErrorCode.INTERNAL
        assert "checksum" in str(info.value)
        assert metric(server, "vmmem_swap_errors_total", reason="checksum") == 1
        assert agent.frame[victim] == NO_FRAME
        assert vm.p2m.state[victim] == PageState.SWAPPED
        assert vm.p2m.swap_slot[victim] == slot
        # A fault that reads ahead over the corrupt slot still gets its own page: the
        # neighbour's bad checksum is not the faulting page's problem.
        before = int(victim) - 1
        assert vm.p2m.state[before] == PageState.SWAPPED
        reply = await agent.fault(before, write=False, around=8)
        assert reply.reason == FaultReason.SWAP_IN
        assert victim not in reply.bpns.tolist()
        assert vm.p2m.state[victim] == PageState.SWAPPED
        others = np.setdiff1d(written, [victim])
        await agent.verify(others)
        assert vm.stats.swapped_in == len(swapped) - 1
        assert server.swap.used == 1
        with pytest.raises(PeerError):
            await agent.fault(victim, write=True)
        assert not agent.link.closed.done()
        await agent.close()


@pytest.mark.timeout(60)
async def test_resident_pages_are_swapped_without_asking_the_vmm(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Pages left resident by a failed write (no VMM maps them) are swapped out by the
    platform itself on a later round, and read back intact."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(0, 512, dtype=np.int64)
        await agent.write_pages(written)
        await agent.link.ctl("failpoint", name="swap_write_error", value=5)
        server.memsched.set_host_limit(server.machine.allocator.used - 40)
        server.memsched.tick(time.monotonic())
        accepted = (await agent.round())[0][2]
        await wait_until(lambda: swap_in_flight(server) == 0, "the failing write")
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.state[accepted] == PageState.RESIDENT).all()
        swap_svc: Any = server.services[ServiceType.SWAP]
        await wait_until(lambda: time.monotonic() >= swap_svc.paused_until, "the back-off")
        # Reclaim enough that the clock hand comes round to the resident pages again.
        server.memsched.set_host_limit(server.machine.allocator.used - 400)
        offered: list[int] = []
        for _ in range(20):
            server.memsched.tick(time.monotonic())
            if not server.memsched.reclaiming:
                break
            for _, batch, _ in await agent.round():
                offered.extend(batch.tolist())
            await wait_until(lambda: swap_in_flight(server) == 0, "swap writes to land")
        swapped = accepted[vm.p2m.state[accepted] == PageState.SWAPPED]
        assert len(swapped) > 0, "no resident page was swapped"
        assert not set(swapped.tolist()) & set(offered), "resident pages went through the VMM"
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        await agent.verify(written)
        await agent.close()


@pytest.mark.timeout(60)
async def test_a_large_guest_swaps_out_in_batches_as_large_as_its_slots(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Unless configured, each VM's slots scale with its guest (1/32 of it, 512 to 4096
    pages): on one daemon a 128 MiB guest gets 1024-page slots and swaps out in batches that
    fill them, a 4 MiB guest keeps 512-page ones; every byte comes back."""
    async with running_platform(short_tmp, mem_dir, host_mib=32, swap_size=16 * MiB) as server:
        small = await FakeAgent.connect(server, "small", guest_pages=1024)
        large = await FakeAgent.connect(server, "large", guest_pages=32768)
        assert (small.reg.slot_capacity, small.region.slot_capacity) == (512, 512)
        assert (large.reg.slot_capacity, large.region.slot_capacity) == (1024, 1024)
        written = np.arange(3000, dtype=np.int64)
        await large.write_pages(written)
        server.memsched.set_host_limit(server.machine.allocator.used - 2500)
        server.memsched.tick(time.monotonic())
        assert server.memsched.reclaiming
        sizes = []
        for _ in range(20):
            sizes += [len(offered) for _, offered, _ in await large.round()]
            await wait_until(lambda: swap_in_flight(server) == 0, "swap writes to land")
            server.memsched.tick(time.monotonic())
            if not server.memsched.reclaiming:
                break
        assert max(sizes) == 1024, sizes
        swapped = np.flatnonzero(page_states(server, large) == PageState.SWAPPED)
        assert len(swapped) >= 2500
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        reasons = await large.verify(written)
        assert reasons["SWAP_IN"] >= 1
        await small.close()
        await large.close()
