"""Swap: release cold pages to a real swap file while the guest runs on.

Selection walks a clock hand over the VM's p2m, a bounded window per batch (the cost of a
batch does not grow with guest size), taking private exposed pages until the VM's deficit
against its memsched target is met. Completion allocates slots and starts the write in a
thread pool; a frame is freed only after its write succeeded.

Why a swap-out is cancelled, not awaited, when its page faults: the frame still holds the
page, so the fastest correct answer is to hand the same frame back at once and discard the
write when it lands (the page's epoch moved on, so the completion ignores it). The guest
never waits for the disk on a page it still has in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import structlog

from shared.constants import FaultReason, PageState, PageStatus, ServiceType
from shared.errors import ErrorCode, VMMemError
from shared.messages import FaultReply

from ..p2m import FLAG_SHARED, NO_OP, NO_SLOT, P2M
from ..swapfile import SwapChecksumError, SwapWriteError
from .base import Pages, PlatformService

if TYPE_CHECKING:
    from ..context import ServiceContext
    from ..vm import VM

log = structlog.get_logger("vmmem.platform.swap")
MIN_BACKOFF, MAX_BACKOFF = 0.25, 8.0  # seconds swap-outs pause after a failed write
_NO_SPACE_ERRNOS = {errno_mod.ENOSPC, errno_mod.EFBIG, errno_mod.EDQUOT}
_SWAPPED = int(PageState.SWAPPED)  # a plain int: compared with NumPy values per fault


class SwapService(PlatformService):
    """High-priority release service backed by the swap file (``ctx.swap``)."""

    service = ServiceType.SWAP
    #: A batch looks at no more than this many p2m entries per page it may take.
    scan_factor = 8

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.hand: dict[int, int] = {}
        #: Per VM, the read-ahead stream: (the page of its last fault, its window).
        self.streams: dict[int, tuple[int, int]] = {}
        self.in_flight: dict[int, int] = {}
        self.swapping_in: dict[tuple[int, int], asyncio.Future[None]] = {}
        # After a failed write, swap-outs pause (doubling up to a limit) instead of hammering
        # a full or failing disk every round; the pages involved stay resident meanwhile.
        self.backoff = 0.0
        self.paused_until = 0.0
        #: The last write failed for lack of space (and none has succeeded since).
        self.no_space = False
        #: Slots taken by writes not finished yet (no page names them): the invariant check.
        self.writing = 0
        #: Takes read-ahead pages, mapped and still in their slots, until they are validated
        #: (``readahead.py``); None frees their slots at once.
        self.hold_read_ahead: Callable[[VM, Pages], None] | None = None
        #: With held read-ahead: the VM's window cap from its read-ahead's hit ratio
        #: (``readahead.ReadAheadValidation.window_cap``); without, the configured cap.
        self.read_ahead_cap: Callable[[VM, int], int] | None = None
        # The labelled children of the per-batch and per-fault metrics, looked up once: a
        # ``labels()`` call costs a few µs, several times per swap-in.
        m = ctx.metrics
        self._pages_in, self._pages_out = m.swap_pages.labels("in"), m.swap_pages.labels("out")
        self._io_out, self._io_in = m.swap_io_seconds.labels("out"), m.swap_io_seconds.labels("in")
        self._io_in_cached = m.swap_io_seconds.labels("in_cached")

    def has_work(self, vm: VM) -> bool:
        swap = self.ctx.swap
        if swap is None or swap.free == 0 or self.ctx.clock() < self.paused_until:
            return False
        return self.ctx.targets.swap_deficit(vm, self.in_flight.get(vm.vm_id, 0)) > 0

    def select(self, vm: VM, capacity: int) -> tuple[Pages, npt.NDArray[np.int64]]:
        deficit = self.ctx.targets.swap_deficit(vm, self.in_flight.get(vm.vm_id, 0))
        assert self.ctx.swap is not None
        want = min(capacity, deficit, self.ctx.swap.free)
        n = vm.guest_pages
        start = self.hand.get(vm.vm_id, 0)
        span = min(n, max(want, 1) * self.scan_factor)
        window = (np.arange(start, start + span, dtype=np.int64)) % n
        p2m = vm.p2m
        # Private: not shared read-only (a page of a large region is private too; taking it
        # splits the region, ``hugepages.py``).
        private = (p2m.flags[window] & FLAG_SHARED) == 0
        state = p2m.state[window]
        # Resident pages (a failed write, a retire move) have a frame the VMM does not map:
        # the platform swaps them itself, without a batch.
        unmapped = window[(state == PageState.RESIDENT) & private][:want]
        if len(unmapped):
            self.mark_in_flight(vm, unmapped)
            self.complete(vm, unmapped, self.ok_status(len(unmapped)))
            want -= len(unmapped)
        picked = window[(state == PageState.EXPOSED) & private][:want]
        # Continue after the last page taken, or after the window if it was exhausted.
        self.hand[vm.vm_id] = (
            int((picked[-1] + 1) % n) if len(picked) == want and want else int((start + span) % n)
        )
        return picked, p2m.frame[picked].astype(np.int64)

    def complete(self, vm: VM, accepted: Pages, status: npt.NDArray[np.uint8]) -> None:
        swap = self.ctx.swap
        assert swap is not None
        slots = swap.allocate(len(accepted))
        if len(slots) < len(accepted):
            # Swap file full: the rest stays resident (unexposed until touched); nothing lost.
            rest = accepted[len(slots) :]
            vm.p2m.state[rest] = PageState.RESIDENT
            vm.p2m.op[rest] = NO_OP  # no operation holds them any more
            status[len(slots) :] = PageStatus.NO_SPACE
            self.ctx.metrics.swap_errors.labels("no_space").inc(len(rest))
            accepted = accepted[: len(slots)]
        if len(accepted) == 0:
            return
        self.in_flight[vm.vm_id] = self.in_flight.get(vm.vm_id, 0) + len(accepted)
        frames = vm.p2m.frame[accepted].astype(np.int64)
        epochs = vm.p2m.epoch[accepted].copy()
        self.writing += len(slots)
        self.ctx.spawn(self._write(vm, accepted, frames, slots, epochs))

    async def _write(
        self,
        vm: VM,
        bpns: Pages,
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
        epochs: npt.NDArray[np.uint32],
    ) -> None:
        ctx, swap = self.ctx, self.ctx.swap
        assert swap is not None
        t0 = time.perf_counter()
        try:
            # Gather and write on the swap file's writer thread: the guest keeps running, and
            # the next batch is selected meanwhile.
            await asyncio.wrap_future(swap.submit_write(ctx.machine.frames, frames, slots))
        except SwapWriteError as exc:
            # What reached the disk is swapped out as usual; the rest stays resident.
            ok = exc.written
            self._write_failed(vm, bpns[~ok], slots[~ok], epochs[~ok], exc)
            self._written(vm, bpns[ok], frames[ok], slots[ok], epochs[ok])
            return
        finally:
            self.writing -= len(slots)  # with the slots' fate decided, in the same step
        self._io_out.observe(time.perf_counter() - t0)
        self.backoff = 0.0
        self.no_space = False
        self._written(vm, bpns, frames, slots, epochs)

    def _written(
        self,
        vm: VM,
        bpns: Pages,
        frames: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int64],
        epochs: npt.NDArray[np.uint32],
    ) -> None:
        """Pages whose write succeeded: swapped out, unless a fault cancelled them meanwhile."""
        ctx, swap = self.ctx, self.ctx.swap
        assert swap is not None
        if not vm.alive:
            swap.release(slots)
            return
        p2m = vm.p2m
        ours = self._still_ours(p2m, bpns, epochs)
        done = bpns[ours]
        self.in_flight[vm.vm_id] -= len(done)
        swap.release(slots[~ours])  # cancelled while the write was in flight: discard it
        p2m.state[done] = PageState.SWAPPED
        p2m.swap_slot[done] = slots[ours]
        p2m.frame[done] = -1
        p2m.op[done] = 0xFF
        ctx.machine.release_or_retire(frames[ours])
        vm.stats.swapped_out += len(done)
        self._pages_out.inc(len(done))

    def _write_failed(
        self,
        vm: VM,
        bpns: Pages,
        slots: npt.NDArray[np.int64],
        epochs: npt.NDArray[np.uint32],
        exc: OSError,
    ) -> None:
        """The write failed: pages keep their frames (unexposed), slots go back."""
        reason = "no_space" if exc.errno in _NO_SPACE_ERRNOS else "io_error"
        self.no_space = reason == "no_space"
        self.ctx.swap.release(slots)  # type: ignore[union-attr]
        log.warning("swap_write_failed", vm=vm.name, pages=len(bpns), reason=reason, error=str(exc))
        self.ctx.metrics.swap_errors.labels(reason).inc(len(bpns))
        self.backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, 2 * self.backoff))
        self.paused_until = self.ctx.clock() + self.backoff
        if not vm.alive:
            return
        p2m = vm.p2m
        ours = self._still_ours(p2m, bpns, epochs)
        p2m.state[bpns[ours]] = PageState.RESIDENT
        p2m.op[bpns[ours]] = 0xFF
        self.in_flight[vm.vm_id] -= int(ours.sum())

    @staticmethod
    def _still_ours(p2m: P2M, bpns: Pages, epochs: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
        """Pages still in the swap-out that started at ``epochs`` (not cancelled since)."""
        mask: npt.NDArray[np.bool_] = (
            (p2m.state[bpns] == PageState.IN_FLIGHT)
            & (p2m.op[bpns] == ServiceType.SWAP)
            & (p2m.epoch[bpns] == epochs)
        )
        return mask

    def on_fault(self, vm: VM, bpn: int, write: bool) -> FaultReply:
        """Cancel the swap-out: same frame back at once, the write is discarded."""
        p2m = vm.p2m
        p2m.state[bpn] = PageState.EXPOSED
        p2m.op[bpn] = 0xFF
        p2m.epoch[bpn] += 1
        self.in_flight[vm.vm_id] -= 1
        vm.stats.swap_cancelled += 1
        self.ctx.metrics.swap_cancelled.inc()
        return self.ctx.mapper.reply(vm, FaultReason.CANCEL, np.array([bpn]))

    async def swap_in(self, vm: VM, bpn: int, around: int = 0) -> FaultReply | None:
        """Read a swapped page back, with its swapped neighbours when the guest walks memory.

        One read per page however many vCPUs fault on it: a fault on a page already being
        read waits for that read and returns None, and the caller looks at the page again.
        """
        pending = self.swapping_in.get((vm.vm_id, bpn))
        if pending is not None:
            with contextlib.suppress(VMMemError):
                await asyncio.shield(pending)
            return None
        pages = self._readahead(vm, bpn, around)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for page in pages.tolist():
            self.swapping_in[(vm.vm_id, page)] = fut
        try:
            return await self._swap_in(vm, pages)
        except VMMemError as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here: waiters only need to know it is over
            raise
        finally:
            if not fut.done():
                fut.set_result(None)
            for page in pages.tolist():
                self.swapping_in.pop((vm.vm_id, page), None)

    def _window(self, vm: VM, bpn: int, around: int) -> int:
        """Pages to read ahead of ``bpn``: the fault's fault-around, doubled each time the
        guest faults again just past the previous window, up to ``swap_readahead_max``.

        Linux's swap read-ahead adapts in the same spirit (the window grows with hits): a
        walk through swapped memory soon reads 64 pages a fault instead of 16, and a random
        fault (no fault-around asked) reads its own page only. Pages read ahead and never
        touched are dropped by read-ahead validation (``readahead.py``), and its verdicts
        lower the cap while the guest leaves most of its read-ahead untouched.
        """
        if around <= 0:
            self.streams.pop(vm.vm_id, None)
            return 0
        cap = self.ctx.config.swap_readahead_max
        if self.read_ahead_cap is not None:  # shrunk while the guest leaves its read-ahead
            cap = self.read_ahead_cap(vm, cap)
        window = min(around, cap)
        prev = self.streams.get(vm.vm_id)
        if prev is not None:
            last, size = prev
            end = last + 1 + size  # the first page past the last window
            if bpn == last:  # the same fault again (its cached read missed): same window
                return size
            if end <= bpn <= end + size:
                window = min(2 * size, cap)
        self.streams[vm.vm_id] = (bpn, window)
        return window

    def _readahead(self, vm: VM, bpn: int, around: int) -> Pages:
        """The faulting page, then swapped neighbours after it that nobody is reading yet."""
        n = min(self._window(vm, bpn, around), vm.guest_pages - bpn - 1)
        if n <= 0:
            return np.array([bpn], dtype=np.int64)
        # A slice of the p2m, not a fancy index: the window is contiguous.
        swapped = np.flatnonzero(vm.p2m.state[bpn + 1 : bpn + 1 + n] == _SWAPPED)
        if self.swapping_in:  # reads on the thread path are out: skip the pages they read
            vm_id, base = vm.vm_id, bpn + 1
            swapped = swapped[[(vm_id, base + i) not in self.swapping_in for i in swapped.tolist()]]
        pages = np.empty(len(swapped) + 1, dtype=np.int64)
        pages[0] = bpn
        np.add(swapped, bpn + 1, out=pages[1:])
        return pages

    def try_swap_in_now(self, vm: VM, bpn: int, around: int) -> FaultReply | None:
        """Swap in from the page cache without leaving the event loop, or None.

        Why: a 4 KiB read that hits the page cache costs ~2 µs, a hop to the thread pool and
        back ~200 µs. RWF_NOWAIT tells the two apart without ever waiting for the disk on the
        loop; reads that would wait, and every error, take the thread path.
        """
        swap, machine = self.ctx.swap, self.ctx.machine
        if swap is None or (vm.vm_id, bpn) in self.swapping_in:
            return None
        available = machine.available()
        if available < 1:
            return None
        pages = self._readahead(vm, bpn, around)
        if len(pages) > available:
            pages = pages[:available]
        slots = vm.p2m.swap_slot[pages].astype(np.int64)
        t0 = time.perf_counter()
        # Straight into the frames the pages will have (no await until they are mapped, so
        # nothing sees them used and unowned); any failure gives them back.
        frames = machine.allocator.allocate(len(pages), vm.home_node)
        try:
            read = swap.read_into(slots, machine.frames, frames, nowait=True)
        except (SwapChecksumError, OSError):
            read = False  # the thread path reads again and reports the error precisely
        if not read:
            machine.allocator.release(frames)
            return None
        self._io_in_cached.observe(time.perf_counter() - t0)
        return self._map_read(vm, pages, slots, frames)

    async def _swap_in(self, vm: VM, pages: Pages) -> FaultReply:
        ctx, swap = self.ctx, self.ctx.swap
        assert swap is not None
        slots = vm.p2m.swap_slot[pages].astype(np.int64)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            try:
                data = await loop.run_in_executor(None, swap.read_pages, slots)
            except (SwapChecksumError, OSError):
                if len(pages) == 1:
                    raise
                # A read-ahead neighbour failed: the fault needs only its own page, whose
                # own read decides (the neighbour reports its error when it is touched).
                pages, slots = pages[:1], slots[:1]
                data = await loop.run_in_executor(None, swap.read_pages, slots)
        except SwapChecksumError as exc:
            log.error("swap_checksum_mismatch", vm=vm.name, bpns=pages[:4].tolist(), error=str(exc))
            ctx.metrics.swap_errors.labels("checksum").inc()
            raise VMMemError(str(exc), ErrorCode.INTERNAL) from None
        except OSError as exc:
            ctx.metrics.swap_errors.labels("read_error").inc()
            raise VMMemError(f"swap read failed: {exc}", ErrorCode.INTERNAL) from None
        assert data is not None  # only nowait reads return None
        self._io_in.observe(time.perf_counter() - t0)
        await ctx.waits.wait_for(1)
        if not vm.alive:
            raise VMMemError("VM is gone", ErrorCode.INTERNAL)
        # Only what is still swapped in the same slot (nothing else changes a swapped page
        # while it is being read, but the VM may have gone); the faulting page comes first.
        still = (vm.p2m.state[pages] == PageState.SWAPPED) & (vm.p2m.swap_slot[pages] == slots)
        if not still[0]:
            raise VMMemError("page changed during swap-in", ErrorCode.INTERNAL)
        take = np.flatnonzero(still)
        return self._install(vm, pages[take], slots[take], data[take])

    def _install(
        self, vm: VM, pages: Pages, slots: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]
    ) -> FaultReply:
        """Map pages read back from swap (the faulting one first) and free their slots; the
        read-ahead neighbours keep theirs until they are validated (``readahead.py``)."""
        ctx, swap = self.ctx, self.ctx.swap
        assert swap is not None
        take = max(1, ctx.machine.available())
        pages, slots, data = pages[:take], slots[:take], data[:take]
        frames = ctx.machine.allocator.allocate(len(pages), vm.home_node)
        ctx.machine.frames[frames] = data
        return self._map_read(vm, pages, slots, frames)

    def _map_read(
        self, vm: VM, pages: Pages, slots: npt.NDArray[np.int64], frames: npt.NDArray[np.int64]
    ) -> FaultReply:
        """Map pages whose content is now in ``frames``; see ``_install``."""
        ctx, swap = self.ctx, self.ctx.swap
        assert swap is not None
        ctx.mapper.map_private(vm, pages, frames)
        hold = self.hold_read_ahead
        if hold is not None:  # the faulting page's slot goes; its neighbours are held
            vm.p2m.swap_slot[pages.item(0)] = NO_SLOT
            swap.release_one(slots.item(0))
            if len(pages) > 1:
                hold(vm, pages[1:])
        else:
            vm.p2m.swap_slot[pages] = NO_SLOT
            swap.release(slots)
        vm.stats.swapped_in += len(pages)
        self._pages_in.inc(len(pages))
        return ctx.mapper.reply(vm, FaultReason.SWAP_IN, pages)

    def on_vm_gone(self, vm: VM) -> None:
        self.hand.pop(vm.vm_id, None)
        self.streams.pop(vm.vm_id, None)
        self.in_flight.pop(vm.vm_id, None)
