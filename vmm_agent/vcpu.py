"""vCPUs: tasks that run the guest workload on real frames in machine memory.

Each access is a real read (hash the frame, compare with the expected hash) or a real write
(new content, new expected hash). A page that is not exposed, or not writable for a write,
goes through the fault path first; the access itself happens synchronously right after, so
no release batch can slip in between "exposed" and "touched".

An anonymous access first takes its page for the workload from wherever the guest OS has it
(free pool, page cache, balloon: ``GuestOS.claim``). A free page the guest once used holds
old content; the guest clears a page before it hands it out again, so the first access to
such a page is a write, whatever the stream drew: if the host swapped the page out, the
fault reads the old content back first only for it to be overwritten (ESX'02's double
paging). A page the balloon gave back is a first touch instead.

A page-cache read finds the page that holds its block (and sets its referenced bit: the
page cache evicts by recency); a block not in memory is a refault: the vCPU waits for the
simulated disk read (a stall), takes a page for the block and writes the block's content
into it (so every later read of it is checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import numpy.typing as npt
import structlog

from shared.workload import Phase

from .access import CHUNK, AccessStream
from .exposure import ExposureTable
from .fault_path import FaultPath
from .guest import GuestMemory
from .guest_os import ANON, BALLOON, FREE, GuestOS
from .guest_time import GuestGate, GuestProgress
from .rpc import PeerError
from .touches import TouchLog

log = structlog.get_logger("vmmem.vmm.vcpu")
#: Accesses between two yields to the event loop when no fault forced one.
OPS_PER_YIELD = 64
#: The cache block of every access of a chunk without page-cache reads: none.
_NO_BLOCKS = [-1] * CHUNK


def _worth_logging(count: int) -> bool:
    """Log the first ten occurrences, then every power of two: never one line per page."""
    return count <= 10 or count & (count - 1) == 0


class VCpu:
    """One virtual CPU of the guest."""

    def __init__(
        self,
        index: int,
        frames: npt.NDArray[np.uint8],
        exposure: ExposureTable,
        faults: FaultPath,
        guest: GuestMemory,
        gate: GuestGate,
        progress: GuestProgress,
        guest_os: GuestOS | None = None,
    ) -> None:
        self.index = index
        self.frames = frames
        self.exposure = exposure
        self.faults = faults
        self.guest = guest
        self.gate = gate
        self.progress = progress
        self.os = guest_os if guest_os is not None else GuestOS(len(exposure.frame))
        self.reads = 0
        self.writes = 0
        self.fault_errors = 0

    async def run(
        self, phase: Phase, stream: AccessStream, stop: asyncio.Event, touches: TouchLog
    ) -> None:
        """Run ``phase`` until ``stop`` is set or its duration is over."""
        self.progress.vcpu_started()
        try:
            await self._run(phase, stream, stop, touches)
        finally:
            self.progress.vcpu_stopped()

    async def _fault(self, bpn: int, write: bool, sequential: bool) -> bool:
        """Resolve a fault (counted as a stall while it waits); False if it failed."""
        self.progress.wait_begins()
        try:
            await self.faults.ensure(bpn, write, sequential=sequential)
        except PeerError as exc:
            self.fault_errors += 1
            self.guest.accesses_failed[exc.code.name.lower()] += 1
            if _worth_logging(self.fault_errors):
                log.warning(
                    "fault_failed",
                    vcpu=self.index,
                    bpn=bpn,
                    error=str(exc),
                    failures=self.fault_errors,
                )
            return False
        finally:
            self.progress.wait_ends()
        return True

    async def _cache_read(self, block: int, kind: int, pick: int, refault: float) -> int:
        """The page holding ``block``, exposed, for a read; -1 when there is none to read.

        A block not in memory is a refault: the vCPU waits ``refault`` seconds for the disk
        (a stall; another vCPU reading the same block waits for that read), takes a page
        for the block (``GuestOS.cache_page_for``), pins it while it faults it in writable
        and writes the block's content. Anything it looked at is looked at again after each
        await: the page cache may have dropped the block meanwhile.
        """
        os, exposure = self.os, self.exposure
        while True:
            page = os.cached_page(block)
            if page >= 0:
                if exposure.frame[page] >= 0:
                    os.cache_hits += 1
                    os.referenced[block] = 1
                    return page
                if not await self._fault(page, False, False):
                    return -1
                continue  # looked at again: the block may have left that page meanwhile
            waiting = os.reading.get(block)
            if waiting is not None:  # another vCPU reads this block from disk
                await asyncio.wait((waiting,))
                continue
            done = asyncio.get_running_loop().create_future()
            os.reading[block] = done
            try:
                return await self._refault(block, kind, pick, refault)
            finally:
                del os.reading[block]
                done.set_result(None)

    async def _refault(self, block: int, kind: int, pick: int, refault: float) -> int:
        """Read ``block`` from the simulated disk into a page of the page cache."""
        os, exposure, pinned = self.os, self.exposure, self.exposure.pinned
        t0 = time.monotonic()
        self.progress.wait_begins()
        try:
            await asyncio.sleep(refault)
        finally:
            self.progress.wait_ends()
            os.refault_seconds += time.monotonic() - t0
        os.refaults += 1
        faults = self.faults

        def unavailable(page: int) -> bool:  # pinned, or a fault on it in flight
            return bool(pinned[page]) or page in faults.pending

        while True:
            page = os.cache_page_for(block, unavailable)
            if page < 0:
                os.uncached_reads += 1  # no memory to cache it in: read, and not kept
                return -1
            pinned[page] += 1  # the disk read lands in it: no release takes it meanwhile
            try:
                while exposure.frame[page] < 0 or not exposure.writable[page]:
                    if not await self._fault(page, True, False):
                        os.drop_block(block)
                        return -1
                if os.page_block[page] != block:
                    continue  # an anonymous access took the page meanwhile: another one
                self.guest.write(self.frames, int(exposure.frame[page]), page, kind, pick)
                return page
            finally:
                pinned[page] -= 1

    async def _run(
        self, phase: Phase, stream: AccessStream, stop: asyncio.Event, touches: TouchLog
    ) -> None:
        deadline = time.monotonic() + phase.duration
        exposure, guest, frames, gate = self.exposure, self.guest, self.frames, self.gate
        os, kinds_of, referenced, used = (
            self.os,
            self.os.kind_bytes,
            self.os.referenced,
            self.os.used,
        )
        stamp, firsts = touches.stamp, touches.firsts
        think = phase.think_us * OPS_PER_YIELD / 1e6
        refault = phase.refault_ms / 1e3
        last_fault = -2
        since_yield = 0
        period = touches.current
        while not stop.is_set() and time.monotonic() < deadline:
            bpns, writes, kinds, blocks = stream.chunk()
            picks = stream.rng.integers(0, 1 << 30, len(bpns))
            for bpn, write, kind, pick, block in zip(
                bpns.tolist(),
                writes.tolist(),
                kinds.tolist(),
                picks.tolist(),
                _NO_BLOCKS if blocks is None else blocks.tolist(),
                strict=True,
            ):
                if block >= 0:  # a read of a file block, through the page cache
                    page = os.cached_page(block)
                    if page >= 0 and exposure.frame[page] >= 0:
                        os.cache_hits += 1
                        referenced[block] = 1
                    else:
                        page = await self._cache_read(block, kind, pick, refault)
                        since_yield = 0
                        self.progress.last_progress = time.monotonic()
                        if gate.closed:
                            await gate.wait_open()
                        period = touches.current
                        if stop.is_set():
                            return
                        if page < 0:
                            continue
                    bpn = page
                elif not write and kinds_of[bpn] == FREE and used[bpn]:
                    write = True  # a reused page is cleared (written) before it is read
                if block < 0 and (
                    exposure.frame[bpn] < 0 or (write and not exposure.writable[bpn])
                ):
                    if kinds_of[bpn] != ANON:
                        os.claim(bpn)  # the guest takes the page before it touches it
                    if not await self._fault(bpn, write, bpn == last_fault + 1):
                        # Nothing else in a chunk of failing faults looks at the stop: a
                        # halt would wait for the whole chunk (seconds when out of memory).
                        if stop.is_set() or time.monotonic() >= deadline:
                            return
                        await asyncio.sleep(0.05)
                        continue
                    last_fault = bpn
                    since_yield = 0
                    self.progress.last_progress = time.monotonic()
                    if gate.closed:  # the monitor exited the guest while we waited
                        await gate.wait_open()
                    period = touches.current  # a new sample may have started meanwhile
                    if stop.is_set():
                        return
                frame = int(exposure.frame[bpn])
                if frame < 0 or (write and not exposure.writable[bpn]):
                    continue  # released again while we waited; the next pass retries
                if kinds_of[bpn] != ANON:  # a cache page, or a page not taken yet
                    if block < 0:
                        os.claim(bpn)
                    if kinds_of[bpn] == BALLOON:
                        os.balloon_touches += 1  # must never happen: the guest took it back
                exposure.accessed[bpn] = True
                if stamp[bpn] != period:  # TouchLog.touch, inlined: this loop is the guest
                    stamp[bpn] = period
                    firsts[period] = firsts.get(period, 0) + 1
                if write:
                    guest.write(frames, frame, bpn, kind, pick)
                    self.writes += 1
                else:
                    if not guest.check(frames, frame, bpn) and _worth_logging(guest.mismatches):
                        log.error(
                            "data_mismatch",
                            vcpu=self.index,
                            bpn=bpn,
                            frame=frame,
                            mismatches=guest.mismatches,
                        )
                    self.reads += 1
                since_yield += 1
                if since_yield >= OPS_PER_YIELD:
                    since_yield = 0
                    # Think time is guest computation: progress, until it is over.
                    self.progress.last_progress = time.monotonic() + think
                    if think:  # think time, but a stop ends it at once
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), think)
                    else:
                        await asyncio.sleep(0)
                    if gate.closed:  # a low-priority round runs with the guest exited
                        await gate.wait_open()
                    period = touches.current
                    if stop.is_set() or time.monotonic() >= deadline:
                        return
