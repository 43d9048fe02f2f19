"""vCPUs: tasks that run the guest workload on real frames in machine memory.

Each access is a real read (hash the frame, compare with the expected hash) or a real write
(new content, new expected hash). A page that is not exposed, or not writable for a write,
goes through the fault path first; the access itself happens synchronously right after, so
no release batch can slip in between "exposed" and "touched".
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import numpy.typing as npt
import structlog

from shared.workload import Phase

from .access import AccessStream
from .exposure import ExposureTable
from .fault_path import FaultPath
from .guest import GuestMemory
from .guest_time import GuestGate, GuestProgress
from .rpc import PeerError
from .touches import TouchLog

log = structlog.get_logger("vmmem.vmm.vcpu")
#: Accesses between two yields to the event loop when no fault forced one.
OPS_PER_YIELD = 64


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
    ) -> None:
        self.index = index
        self.frames = frames
        self.exposure = exposure
        self.faults = faults
        self.guest = guest
        self.gate = gate
        self.progress = progress
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

    async def _run(
        self, phase: Phase, stream: AccessStream, stop: asyncio.Event, touches: TouchLog
    ) -> None:
        deadline = time.monotonic() + phase.duration
        exposure, guest, frames, gate = self.exposure, self.guest, self.frames, self.gate
        stamp, firsts = touches.stamp, touches.firsts
        think = phase.think_us * OPS_PER_YIELD / 1e6
        last_fault = -2
        since_yield = 0
        period = touches.current
        while not stop.is_set() and time.monotonic() < deadline:
            bpns, writes, kinds = stream.chunk()
            picks = stream.rng.integers(0, 1 << 30, len(bpns))
            for bpn, write, kind, pick in zip(
                bpns.tolist(), writes.tolist(), kinds.tolist(), picks.tolist(), strict=True
            ):
                if exposure.frame[bpn] < 0 or (write and not exposure.writable[bpn]):
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
