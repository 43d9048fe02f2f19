"""Runs workload phases on the vCPUs, pins pages for device-I/O models, verifies everything."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import MAX_FAULT_AROUND, ServiceType
from shared.workload import Phase

from .access import AccessStream, cache_blocks
from .exposure import NOT_RELEASED, ExposureTable
from .fault_path import FaultPath
from .guest import GuestMemory
from .guest_os import GuestOS
from .guest_time import GuestGate, GuestProgress
from .link import corked
from .rpc import PeerError
from .touches import TouchLog
from .vcpu import VCpu

log = structlog.get_logger("vmmem.vmm.runner")
#: How long halt() lets vCPUs finish their current access before cancelling them.
HALT_SECONDS = 10.0
#: Services whose filters do not skip pinned pages (see vmm_agent/services).
PIN_EXEMPT = np.array([ServiceType.PAGE_RETIRE, ServiceType.P2M_UPDATE], dtype=np.uint8)
#: Verification faults every this many missing pages with the largest fault-around: a
#: swap-in reply maps the page and up to MAX_FAULT_AROUND swapped neighbours (the window of
#: a walk); a smaller span sent faults for pages the previous reply was already mapping.
VERIFY_AROUND = MAX_FAULT_AROUND
FAULT_AROUND_SPAN = VERIFY_AROUND + 1
#: Pages verify faults in and checks at a time: four fault-around spans, so that when every
#: page is swapped the chunk's four faults map it exactly and none reaches into the next
#: chunk, whose faults are out at the same time (``_verify``).
VERIFY_CHUNK = 4 * FAULT_AROUND_SPAN
#: Finished phases whose throughput is kept for the report.
PHASES_KEPT = 64


def _cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    for task in tasks:
        task.cancel()


class WorkloadRunner:
    """The guest's activity: phases on vCPUs, plus the final verification pass."""

    def __init__(
        self,
        vcpus: int,
        seed: int,
        frames: npt.NDArray[np.uint8],
        exposure: ExposureTable,
        faults: FaultPath,
        guest: GuestMemory,
        gate: GuestGate,
        progress: GuestProgress,
        touches: TouchLog,
        guest_os: GuestOS | None = None,
    ) -> None:
        self.seed = seed
        self.exposure = exposure
        self.faults = faults
        self.guest = guest
        self.os = guest_os if guest_os is not None else GuestOS(exposure.guest_pages)
        self.cpus = [
            VCpu(i, frames, exposure, faults, guest, gate, progress, self.os) for i in range(vcpus)
        ]
        self.touches = touches
        self.phase: Phase | None = None
        self.started = 0.0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.pin_cycles = 0
        self.pin_violations = 0
        #: True while the verification pass reads the guest back (the balloon waits).
        self.verifying = False
        #: Throughput of the phases run so far: name, seconds, accesses, accesses/s.
        self.phase_history: list[dict[str, Any]] = []
        self._accesses_at_start = 0

    def reads(self) -> int:
        return sum(c.reads for c in self.cpus)

    def writes(self) -> int:
        return sum(c.writes for c in self.cpus)

    def touched_count(self) -> int:
        return self.touches.distinct()

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self.tasks)

    async def start(self, phase: Phase) -> None:
        """Start a phase (stopping the current one first)."""
        await self.halt()
        self.phase, self.started = phase, time.monotonic()
        self._accesses_at_start = self.reads() + self.writes()
        if phase.cache_ratio > 0 or phase.cache > 0:
            self.os.cache_limit = cache_blocks(phase, self.exposure.guest_pages)
        else:
            self.os.cache_limit = 0
        self.stop = asyncio.Event()
        n = min(phase.vcpus or len(self.cpus), len(self.cpus))
        for cpu in self.cpus[:n]:
            stream = AccessStream(phase, self.exposure.guest_pages, cpu.index, n, self.seed)
            self.tasks.append(asyncio.create_task(cpu.run(phase, stream, self.stop, self.touches)))
        if phase.pinned_pages:
            self.tasks.append(asyncio.create_task(self._pinner(phase)))
        log.info(
            "phase_started",
            phase=phase.name,
            vcpus=n,
            duration=phase.duration,
            distribution=phase.distribution,
        )

    def phase_throughput(self) -> dict[str, Any] | None:
        """The current (or last) phase's accesses per second so far."""
        if self.phase is None:
            return None
        # A phase whose duration is over ran that long, however late it is halted.
        end = min(time.monotonic(), self.started + self.phase.duration)
        seconds = max(1e-9, end - self.started)
        accesses = self.reads() + self.writes() - self._accesses_at_start
        return {
            "phase": self.phase.name,
            "seconds": round(seconds, 3),
            "accesses": accesses,
            "accesses_per_second": round(accesses / seconds, 1),
        }

    async def halt(self) -> None:
        """Stop the running phase and wait for its vCPUs; then free what it frees."""
        ending = self.phase if self.tasks else None
        if self.tasks and self.phase is not None:
            ended = self.phase_throughput()
            if ended is not None:
                self.phase_history.append(ended)
                del self.phase_history[:-PHASES_KEPT]
        self.stop.set()
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=HALT_SECONDS)
            for task in late:  # stuck (e.g. a fault that never returns): do not wait forever
                task.cancel()
            if late:
                await asyncio.wait(late)
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("vcpu_crashed", error=repr(task.exception()))
        self.tasks = []
        if ending is not None and ending.anon_freed > 0:
            self._free_anon(ending)

    def _free_anon(self, phase: Phase) -> None:
        """The phase's processes exit: the top ``anon_freed`` of its anonymous working set
        goes back to the guest's free pool (its frames keep their content)."""
        pages = self.exposure.guest_pages
        first = min(int(phase.offset * pages), pages - 1)  # as AccessStream draws them
        size = max(1, min(int(phase.working_set * pages), pages - first))
        n = int(phase.anon_freed * size)
        freed = self.os.free_anon(np.arange(first + size - n, first + size, dtype=np.int64))
        log.info("phase_freed_anon", phase=phase.name, pages=freed)

    async def _pinner(self, phase: Phase) -> None:
        """Pin random pages of the working set "in translation" for a while, then unpin."""
        rng = np.random.default_rng([self.seed, phase.seed, 0xD1])
        first = int(phase.offset * self.exposure.guest_pages)
        size = max(1, int(phase.working_set * self.exposure.guest_pages))
        deadline = self.started + phase.duration
        while not self.stop.is_set() and time.monotonic() < deadline:
            pages = np.unique(first + rng.integers(0, size, phase.pinned_pages))
            pages = pages[pages < self.exposure.guest_pages]
            self.os.claim_many(pages)  # pages of the workload, for device I/O
            for bpn in pages.tolist():
                with contextlib.suppress(PeerError):
                    await self.faults.ensure(bpn, write=False)
            pages = pages[self.exposure.frame[pages] >= 0]
            frames = self.exposure.frame[pages].copy()
            readonly = ~self.exposure.writable[pages]
            versions = self.guest.version[pages].copy()
            self.exposure.released_by[pages] = NOT_RELEASED
            self.exposure.pinned[pages] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), phase.pin_seconds)
            # A pinned page must still be exposed on the same frame, unless a service that
            # may take pinned pages took it (a failing frame, a stale shared mapping), or
            # the guest itself wrote it while it was mapped read-only (copy-on-write of the
            # zero frame or a merged frame: no service took it; common when the host is out
            # of memory and the page was never written).
            moved = self.exposure.frame[pages] != frames
            released_by = self.exposure.released_by[pages]
            allowed = np.isin(released_by, PIN_EXEMPT)
            written = self.guest.version[pages] != versions
            # A write fault still on the wire dropped the read-only mapping (FaultPath.ensure).
            writing = np.fromiter((b in self.faults.pending for b in pages.tolist()), bool)
            cow = readonly & (written | writing) & (released_by == NOT_RELEASED)
            self.pin_violations += int(np.count_nonzero(moved & ~allowed & ~cow))
            self.exposure.pinned[pages] -= 1
            self.pin_cycles += 1

    async def _send_faults(
        self, chunk: npt.NDArray[np.int64], stride: int
    ) -> tuple[list[int], Sequence[asyncio.Future[None]]]:
        """Fault every ``stride``-th page of the chunk that is not exposed, all in one write
        (the daemon reads them together: one wakeup of it and one syscall here, not one a
        fault); returns the pages and their faults' tasks, already sent, not awaited."""
        missing = chunk[self.exposure.frame[chunk] < 0][::stride].tolist()
        tasks = [
            asyncio.ensure_future(
                self.faults.ensure(b, False, sequential=stride > 1, around=VERIFY_AROUND)
            )
            for b in missing
        ]
        if tasks:
            try:
                with corked(self.faults.link):
                    await asyncio.sleep(0)  # each task runs up to its fault's send
            except BaseException:
                _cancel(tasks)
                raise
        return missing, tasks

    async def _fault_in(
        self,
        chunk: npt.NDArray[np.int64],
        sent: tuple[list[int], Sequence[asyncio.Future[None]]] | None = None,
    ) -> dict[int, str]:
        """Expose a sorted chunk of pages with few messages: first every 65th missing page
        with the largest fault-around (one swap-in reply maps it and up to 64 swapped pages
        after it; ``sent``: those faults, sent already), then whatever is left, then once
        more what failed. Returns the error code of each page whose last fault failed."""
        failed: dict[int, str] = {}
        for stride in (FAULT_AROUND_SPAN, 1, 1):
            missing, tasks = sent if sent is not None else await self._send_faults(chunk, stride)
            sent = None
            try:
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:
                _cancel(tasks)
                raise
            for bpn, res in zip(missing, results, strict=True):
                if isinstance(res, PeerError):
                    failed[bpn] = res.code.name.lower()
                elif isinstance(res, BaseException):
                    raise res
                else:
                    failed.pop(bpn, None)
        return failed

    async def _check(
        self, frames: npt.NDArray[np.uint8], bpn: int, error: str | None
    ) -> str | None:
        """Check one page; None, or why it could not be read (its fault's error code)."""
        for _ in range(3):  # it may be released again between the fault and the check
            frame = int(self.exposure.frame[bpn])
            if frame >= 0:
                # A guest read, as a vCPU's: it sets the accessed bit, which the daemon's
                # verdicts read (a page read ahead for this walk and read is one the guest
                # wanted; left clear, validation dropped it and shrank the read-ahead).
                self.exposure.accessed[bpn] = True
                self.guest.check(frames, frame, bpn)
                return None
            if error is not None:
                return error  # its faults just failed, concurrently: once more alone is slow
            try:
                await self.faults.ensure(bpn, False)
            except PeerError as exc:
                error = exc.code.name.lower()
        return error or "released"

    async def verify(self) -> dict[str, Any]:
        """Read back every page the guest ever wrote, faulting in whatever is not exposed.

        A page that cannot be brought in is unreachable, counted by the error code of its
        fault: out_of_memory (no frame for it: the host is out of memory and swap) is not
        the same as a page that cannot be read back (internal: e.g. a swap checksum)."""
        await self.halt()
        self.verifying = True
        try:
            return await self._verify()
        finally:
            self.verifying = False

    async def _verify(self) -> dict[str, Any]:
        t0 = time.monotonic()
        before_v, before_m = self.guest.verified, self.guest.mismatches
        pages = self.guest.written_pages()
        frames = self.cpus[0].frames if self.cpus else None
        assert frames is not None
        unreachable: Counter[str] = Counter()
        chunks = [pages[i : i + VERIFY_CHUNK] for i in range(0, len(pages), VERIFY_CHUNK)]
        ahead = await self._send_faults(chunks[0], FAULT_AROUND_SPAN) if chunks else None
        sent: tuple[list[int], Sequence[asyncio.Future[None]]] | None = None
        try:
            for i, chunk in enumerate(chunks):
                sent = ahead
                # The next chunk's faults go out before this chunk is waited for and checked
                # (Linux's asynchronous read-ahead): the daemon serves them while this side
                # checks, instead of the two taking turns, each idle while the other works.
                ahead = None
                if i + 1 < len(chunks):
                    ahead = await self._send_faults(chunks[i + 1], FAULT_AROUND_SPAN)
                failed = await self._fault_in(chunk, sent)
                # The pages exposed now are read at once, as ``_check`` reads each (no await
                # between them either way): accessed bit set, every page hashed and compared.
                mapped = self.exposure.frame[chunk]
                here = mapped >= 0
                if here.any():
                    self.exposure.accessed[chunk[here]] = True
                    self.guest.check_many(frames, mapped[here], chunk[here])
                for bpn in chunk[~here].tolist():  # released meanwhile, or its fault failed
                    reason = await self._check(frames, bpn, failed.get(bpn))
                    if reason is not None:
                        unreachable[reason] += 1
                await asyncio.sleep(0)
        finally:
            # Cancelled, or a fault raised: no fault left behind, this chunk's (if it was
            # cancelled while the next one's were being sent) nor the next one's.
            for out in (sent, ahead):
                if out is not None:
                    _cancel(out[1])
        result = {
            "pages_verified": self.guest.verified - before_v,
            "mismatches": self.guest.mismatches - before_m,
            "unreachable": sum(unreachable.values()),
            "unreachable_by_error": dict(unreachable),
            "seconds": round(time.monotonic() - t0, 3),
        }
        log.info("verify_done", **result)
        return result
