"""Page checking: the monitor re-verifies the pages it maps against the guest model.

First the checker on its own, with real parts: machine memory is a file in ``/dev/shm``
mapped as the agent maps it, the guest model and real vCPUs write the guest's content
through the real fault path, batches and balloon, over the fake daemon of ``guest_rig.py``.
Frames are then corrupted behind the guest's back (bytes written into machine memory
directly) and the checker must find them: named, counted, within the ticks one sweep takes
at the set rate. Time is virtual for the checker and the monitor queue (``FakeClock``).

Then one end-to-end test with the real daemons: a frame is corrupted through the
machine-memory file while the guest runs nothing, and the agent's counters (its progress,
its results, its Prometheus metrics) show it.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from shared.config import AgentConfig, load_settings
from shared.constants import PAGE_SIZE
from shared.exposures import Exposures
from shared.layout import ControlRegion, region_size
from shared.messages import REQUEST_FLAG_LAST
from shared.shm import MappedFile, create_mapped, frames_view
from shared.timebound import TICK_SECONDS
from shared.workload import Phase
from vmm_agent.balloon import BalloonDriver
from vmm_agent.batches import BatchProcessor
from vmm_agent.exposure import ExposureTable
from vmm_agent.fault_path import FaultPath
from vmm_agent.guest import Content, GuestMemory
from vmm_agent.guest_os import GuestOS
from vmm_agent.guest_time import GuestGate, GuestProgress
from vmm_agent.load.report import build_report, render_table
from vmm_agent.monitor import MonitorQueue
from vmm_agent.page_check import MAX_SCAN, PageChecker
from vmm_agent.rpc import PeerError
from vmm_agent.runner import WorkloadRunner
from vmm_agent.sampler import Sampler
from vmm_agent.touches import TouchLog

from .guest_rig import POISON, FakeClock, FakeDaemon
from .procs import ctl, daemons, free_port
from .test_lowprio_agent import FakeTask, half_progress_tick, low_bit, work
from .test_lowprio_agent import Rig as LowRig

PAGES = 256
BOUND = 0.008  # the default time bound: far more than any test's checks take


class CheckRig:
    """The agent's guest side on a machine-memory file, with a page checker and its queue."""

    def __init__(self, mem_dir: Path, rate: float, pages: int = PAGES) -> None:
        self.pages = pages
        self.file: MappedFile = create_mapped(mem_dir / "machine", pages * PAGE_SIZE)
        self.frames = frames_view(self.file)
        self.frames[:] = POISON  # no frame holds what the guest expects until it is given one
        self.region = ControlRegion.initialize(
            bytearray(region_size(2, 512)),
            vm_id=1,
            generation=1,
            slot_count=2,
            capacity=512,
            guest_pages=pages,
        )
        self.daemon = FakeDaemon(self.region, self.frames)  # page b lives on frame b
        self.exposure = ExposureTable(pages)
        self.guest = GuestMemory(7, pages)
        self.os = GuestOS(pages)
        self.clock = FakeClock()
        self.progress = GuestProgress(time.monotonic)
        self.faults = FaultPath(self.daemon, self.exposure, max_outstanding=16, around=0)  # type: ignore[arg-type]
        self.balloon = BalloonDriver(
            self.os,
            self.exposure,
            self.guest,
            self.faults.pending,
            self.region,
            self.progress,
            1e6,
            1e6,
            0.65,
            clock=self.clock,
        )
        self.touches = TouchLog(pages)
        self.sampler = Sampler(self.exposure, self.region, self.touches)
        self.batches = BatchProcessor(
            self.daemon,  # type: ignore[arg-type]
            self.region,
            self.exposure,
            self.sampler,
            self.balloon,
        )
        self.runner = WorkloadRunner(
            2,
            1,
            self.frames,
            self.exposure,
            self.faults,
            self.guest,
            GuestGate(),
            self.progress,
            self.touches,
            self.os,
        )
        self.checker = PageChecker(
            self.frames,
            self.exposure,
            self.guest,
            self.os,
            self.faults.pending,
            rate,
            clock=self.clock,
        )
        self.queue = MonitorQueue([self.sampler, self.checker], self.clock)

    def close(self) -> None:
        del self.frames, self.checker, self.runner, self.daemon
        self.file.close()
        self.file.unlink()

    async def fill(self, **phase: Any) -> None:
        """A real guest phase writing every page (zero, corpus and unique content)."""
        spec = {"duration": 0.3, "working_set": 1.0, "write_ratio": 1.0, **phase}
        await self.runner.start(Phase(distribution="sequential", **spec))
        await asyncio.wait(self.runner.tasks)
        await self.runner.halt()
        assert self.guest.mismatches == 0

    def inflate(self, wanted: int) -> npt.NDArray[np.int64]:
        """One BALLOON batch of ``wanted``; the pages the guest's balloon driver gave."""
        before = len(self.daemon.ballooned)
        self.batches.process(self.daemon.offer_balloon(wanted))
        return np.asarray(self.daemon.ballooned[before:], dtype=np.int64)

    def tick(self, bound: float = BOUND) -> int:
        """One low-priority tick later, a monitor turn of ``bound``; pages checked in it."""
        self.clock.now += TICK_SECONDS
        before = self.checker.checked
        self.queue.run(bound)
        return self.checker.checked - before

    def corrupt(self, bpn: int) -> int:
        """Flip bytes of the frame the monitor maps for ``bpn``, behind the guest's back."""
        frame = int(self.exposure.mapped_frame(np.array([bpn]))[0])
        assert frame >= 0
        self.frames[frame, 1000:1008] ^= 0x5A
        return frame

    def checked_bpns(self) -> list[int]:
        return [m["bpn"] for m in self.checker.mismatch_log]


@pytest.fixture
def rig(mem_dir: Path) -> Iterator[CheckRig]:
    r = CheckRig(mem_dir, rate=1000.0)
    try:
        yield r
    finally:
        r.close()


def ticks_to_sweep(rig: CheckRig) -> int:
    """Ticks one sweep of the whole guest takes at the checker's rate."""
    return math.ceil(rig.pages / (rig.checker.rate * TICK_SECONDS))


def until_found(rig: CheckRig) -> int:
    """Tick until the checker finds a mismatch, for at most one sweep; the ticks it took."""
    before = rig.checker.mismatches
    for n in range(1, ticks_to_sweep(rig) + 1):
        rig.tick()
        if rig.checker.mismatches > before:
            return n
    raise AssertionError(f"no mismatch found in {ticks_to_sweep(rig)} ticks")


# ---- finding corruption ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_corrupted_frame_is_found_named_and_counted_within_one_sweep(
    rig: CheckRig,
) -> None:
    """The guest wrote every page and reads none afterwards; one frame is corrupted in machine
    memory: within the ticks one sweep takes at the set rate (256 pages at 100 a tick) the
    checker finds it, names the page and its frame, counts it once, and the guest's own
    verification counters are untouched (the check is not a guest read)."""
    await rig.fill()
    reads, verified = rig.runner.reads(), rig.guest.verified
    frame = rig.corrupt(137)
    assert until_found(rig) <= ticks_to_sweep(rig) == 3
    assert rig.checker.mismatches == 1
    assert rig.checker.mismatch_log == [
        {"bpn": 137, "frame": frame, "version": int(rig.guest.version[137])}
    ]
    assert (rig.runner.reads(), rig.guest.verified, rig.guest.mismatches) == (reads, verified, 0)


@pytest.mark.timeout(30)
async def test_every_mapped_page_is_checked_once_per_sweep_and_clean_pages_match(
    rig: CheckRig,
) -> None:
    """Over one sweep every mapped page is checked exactly once (the cursor wraps), and
    content of every kind the guest wrote (zero, corpus, unique) matches the model."""
    await rig.fill()
    assert rig.exposure.exposed_count() == PAGES
    for _ in range(ticks_to_sweep(rig)):
        rig.tick()
    assert rig.checker.checked == 300
    assert rig.checker.sweeps == 1
    assert rig.checker.mismatches == 0
    kinds = np.bincount(rig.guest.kind, minlength=3)
    assert (kinds > 0).all(), kinds  # all three kinds of content were checked


@pytest.mark.timeout(30)
async def test_one_log_event_per_batch_with_the_count_and_the_first_bpns(rig: CheckRig) -> None:
    """Twelve corrupt pages in one batch: one structlog event (count 12, the first 8 BPNs),
    never one per page."""
    await rig.fill()
    bad = list(range(10, 130, 10))
    for bpn in bad:
        rig.corrupt(bpn)
    rig.checker.set_rate(10_000)  # 1000 pages a tick: the whole guest in one batch
    with capture_logs() as logs:
        rig.tick()
    events = [e for e in logs if e["event"] == "page_check_mismatch"]
    assert len(events) == 1, logs
    assert events[0]["count"] == 12
    assert events[0]["bpns"] == bad[:8]
    assert rig.checked_bpns() == bad


@pytest.mark.timeout(30)
async def test_a_page_never_written_is_checked_as_zero(rig: CheckRig) -> None:
    """A page the guest only read (first touch: a zero frame) is expected to be zero, as the
    model says: clean it matches, with a byte set it is found."""
    await rig.runner.start(
        Phase(distribution="sequential", duration=0.2, working_set=1.0, write_ratio=0.0)
    )
    await asyncio.wait(rig.runner.tasks)
    await rig.runner.halt()
    assert not rig.guest.held.any() and rig.exposure.exposed_count() == PAGES
    for _ in range(ticks_to_sweep(rig)):
        rig.tick()
    assert rig.checker.checked >= PAGES and rig.checker.mismatches == 0
    rig.frames[int(rig.exposure.frame[5]), 0] = 1
    until_found(rig)
    assert rig.checked_bpns() == [5]


# ---- the rate and the time bound -----------------------------------------------------------


@pytest.mark.timeout(30)
async def test_rate_caps_pages_per_tick_and_an_idle_spell_is_no_burst(rig: CheckRig) -> None:
    """At 1000 pages/s a tick checks at most 100 pages, whatever the bound; ticks without a
    round (the guest stalled) do not add up to a burst larger than one tick's worth; a rate
    changed at run time applies at the next tick; rate 0 stops checking."""
    await rig.fill()
    per_tick = [rig.tick() for _ in range(8)]
    assert max(per_tick) <= 100 and per_tick[1:] == [100] * 7
    rig.clock.now += 10 * TICK_SECONDS  # no round for a second
    assert rig.tick() == 100
    rig.checker.set_rate(250.0)
    assert [rig.tick() for _ in range(4)] == [25] * 4
    rig.checker.set_rate(0.0)
    assert not rig.checker.has_work()
    assert rig.tick() == 0


@pytest.mark.timeout(30)
async def test_pages_per_turn_are_bounded_by_the_time_the_queue_gives(rig: CheckRig) -> None:
    """The monitor queue gives the checker as many pages as fit in its share of the bound
    at the measured cost per page: at 10 µs a page, a 200 µs turn checks at most 20 pages,
    though the rate would allow 100."""
    await rig.fill()
    run = rig.checker.run

    def costly_run(units: int) -> int:  # checking costs 10 µs a page of virtual time
        done = run(units)
        rig.clock.now += done * 10e-6
        return done

    rig.checker.run = costly_run  # type: ignore[method-assign]
    rig.queue.costs["page_check"].per_unit = 10e-6  # as measured by earlier turns
    per_tick = [rig.tick(bound=200e-6) for _ in range(5)]
    assert max(per_tick) == 20 and min(per_tick) >= 19, per_tick  # 19: the cost's float dust
    # A bound with room: the rate is the limit again (the 1 ms those take earns one more).
    assert 100 <= rig.tick(bound=BOUND) <= 101


@pytest.mark.timeout(30)
async def test_checking_takes_at_most_a_tenth_of_the_bound_whatever_the_rate(
    rig: CheckRig,
) -> None:
    """A latency-sensitive VM (bound 0.5 ms) with checks costing 10 µs a page: at most 5 pages
    a tick once the cost is measured (10 % of the bound), though the rate and the queue's
    time would allow 100; over the ticks the time spent stays within the share."""
    await rig.fill()
    latency_sensitive_with_costly_checks(rig)
    per_tick = [rig.tick() for _ in range(30)]
    # The first turns guess the cost (2 µs a page) and overspend; a turn's overspending is
    # paid back from the next ticks' shares (up to one tick's worth).
    assert per_tick[0] == 25 and max(per_tick[10:]) <= 5, per_tick
    assert sum(per_tick[10:]) <= 5 * 20 + 5, per_tick
    assert sum(per_tick[10:]) >= 4 * 20, per_tick  # and it does use its share


@pytest.mark.timeout(30)
async def test_a_preempted_turn_does_not_stop_checking(rig: CheckRig) -> None:
    """One turn takes half a second of wall time (the OS ran something else meanwhile): its
    cost per page, as measured, is more than a whole tick's share. It is paid back from the
    next ticks' shares, and checking goes on: the cost estimate comes back down with the
    first normal turn, and the ticks check as many pages as before."""
    await rig.fill()
    check = rig.checker._check
    cost = [10e-6]

    def timed_check(bpns: npt.NDArray[np.int64]) -> None:
        check(bpns)
        rig.clock.now += cost[0] * len(bpns)

    rig.checker._check = timed_check  # type: ignore[method-assign]
    rig.checker.bound = lambda: 8e-3  # a share of 0.8 ms a tick: 80 pages at 10 µs
    before = [rig.tick() for _ in range(10)]
    cost[0] = 0.5 / 80  # the next turn takes 0.5 s
    rig.tick()
    cost[0] = 10e-6
    after = [rig.tick() for _ in range(10)]
    assert min(after[2:]) >= min(before[2:]) - 1, (before, after)
    assert rig.checker.per_page < 20e-6


@pytest.mark.timeout(30)
async def test_an_empty_exposure_table_rests_for_a_second(rig: CheckRig) -> None:
    """Nothing mapped (a VM that has not run yet): one sweep finds nothing, and the checker
    has no work for a second, so such a VM has idle ticks instead of a round every tick
    scanning an empty table. A page mapped meanwhile is checked after the rest."""
    rig.clock.now += TICK_SECONDS
    assert rig.checker.has_work()
    assert rig.checker.run(100) == 0
    waited = [rig.tick() for _ in range(9)]
    assert waited == [0] * 9 and not rig.checker.has_work()
    await rig.faults.ensure(3, write=False)
    rig.corrupt(3)
    assert sum(rig.tick() for _ in range(2)) == 1  # the rest ends at the 10th tick (± dust)
    assert rig.checked_bpns() == [3]


def test_bad_rates_are_refused_and_change_nothing(mem_dir: Path) -> None:
    """A negative or non-finite rate raises and leaves the rate as it was; the agent's
    setting refuses them too."""
    r = CheckRig(mem_dir, rate=500.0)
    try:
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="page check rate"):
                r.checker.set_rate(bad)
            assert r.checker.rate == 500.0
    finally:
        r.close()
    assert load_settings(AgentConfig, {}).page_check_rate == 1000.0
    assert load_settings(AgentConfig, {"page_check_rate": 0}).page_check_rate == 0.0
    with pytest.raises(ValueError, match="page_check_rate"):
        load_settings(AgentConfig, {"page_check_rate": -5})


# ---- rounds for page checking alone ---------------------------------------------------------


class BackgroundTask(FakeTask):
    """Monitor work that is always there, as page checking's (``background = True``)."""

    background = True


@pytest.mark.timeout(10)
async def test_page_checking_alone_runs_on_spare_credit_only() -> None:
    """Page checking always has work, yet never takes the credit the platform's next work
    needs: a guest progressing half the time still gets rounds for it (every other tick),
    and when a sample arrives the very next tick runs a round for it. A guest progressing
    all the time gets a round for page checking every tick."""
    rig = LowRig([])
    rig.add_task(BackgroundTask("page_check", rig.clock, 1e-6, 10**9), per_unit=1e-6)
    records = [await half_progress_tick(rig) for _ in range(8)]
    assert sum(r is not None for r in records) >= 2
    rig.link.script = [(work(flags=REQUEST_FLAG_LAST), 1e-3)]
    rig.region.pending = low_bit()  # a sample to arm
    record = await half_progress_tick(rig)
    assert record is not None and record.batches == 1
    rig.region.pending = 0
    full = [await rig.tick() for _ in range(5)]
    assert sum(r is not None for r in full) >= 4, full


# ---- what is skipped ---------------------------------------------------------------------


def latency_sensitive_with_costly_checks(rig: CheckRig) -> None:
    """A bound of 0.5 ms, and checks that cost 10 µs a page on the virtual clock."""
    check = rig.checker._check

    def costly_check(bpns: npt.NDArray[np.int64]) -> None:
        check(bpns)
        rig.clock.now += len(bpns) * 10e-6

    rig.checker._check = costly_check  # type: ignore[method-assign]
    rig.checker.bound = lambda: 0.5e-3


def sweep(rig: CheckRig) -> None:
    for _ in range(ticks_to_sweep(rig)):
        rig.tick()


@pytest.mark.timeout(30)
async def test_pages_not_mapped_are_skipped(rig: CheckRig) -> None:
    """Pages released to the platform (in flight, swapped) have no frame of the guest's: a
    frame the monitor no longer maps is never read, whatever it holds."""
    await rig.fill()
    gone = np.arange(40, 60, dtype=np.int64)
    rig.exposure.invalidate(gone)
    rig.frames[gone] = POISON  # the platform reused those frames
    sweep(rig)
    assert rig.checker.mismatches == 0
    assert rig.checker.checked >= PAGES - len(gone)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bpn", [77, 0])
async def test_a_page_with_a_fault_on_the_wire_is_skipped(rig: CheckRig, bpn: int) -> None:
    """A page with a fault in flight may be remapped by its reply: skipped until the fault is
    done, then checked. Page 0 is the first of a turn's window (the cursor is at page 0 when
    the checker starts, and each sweep starts there): it is skipped too."""
    await rig.fill()
    rig.corrupt(bpn)
    rig.faults.pending[bpn] = asyncio.get_running_loop().create_future()
    sweep(rig)
    sweep(rig)
    assert rig.checker.mismatches == 0 and rig.checker.skipped_faulting >= 2
    del rig.faults.pending[bpn]
    until_found(rig)
    assert rig.checked_bpns() == [bpn]


@pytest.mark.timeout(30)
async def test_ballooned_pages_are_skipped_even_when_mapped_again(rig: CheckRig) -> None:
    """Pages the balloon took hold nothing the guest expects; the daemon poisons their frames.
    Even mapped again (a fault-around maps them as untouched neighbours) they are not
    checked."""
    await rig.fill(working_set=0.5)  # the upper half stays free for the balloon
    rig.region.balloon_target_pages = 64
    taken = rig.inflate(64)
    assert len(taken) == 64
    rig.exposure.install(taken, taken, np.ones(len(taken), dtype=bool))  # poisoned frames
    sweep(rig)
    assert rig.checker.mismatches == 0
    assert rig.checker.skipped_ballooned >= 64


@pytest.mark.timeout(30)
async def test_a_page_hidden_by_sampling_is_checked_without_a_touch(rig: CheckRig) -> None:
    """A page the working-set sample hid is checked through the monitor's hidden mapping and
    stays hidden and watched: no sampling touch, no soft fault, no accessed bit, no touch
    stamp. Its corruption is found like any other's."""
    await rig.fill()
    sample = np.arange(0, PAGES, 4, dtype=np.int64)
    rig.region.sample_id = 1
    rig.sampler.receive(sample, np.zeros(len(sample), dtype=np.uint8))
    rig.exposure.accessed[:] = False
    assert rig.queue.run(BOUND) > 0  # arms the sample (the sampler comes first)
    assert (rig.exposure.frame[sample] < 0).all() and set(rig.exposure.hidden) == set(
        sample.tolist()
    )
    frame = rig.corrupt(8)
    state = snapshot(rig)
    until_found(rig)
    assert rig.checker.mismatch_log == [
        {"bpn": 8, "frame": frame, "version": int(rig.guest.version[8])}
    ]
    sweep(rig)
    assert rig.checker.checked_hidden >= len(sample)
    assert_unchanged(state, snapshot(rig))


# ---- no effect on the guest's accesses ----------------------------------------------------


def snapshot(rig: CheckRig) -> dict[str, Any]:
    """What a guest access would change: exposure, sampling, touch log, guest counters."""
    e = rig.exposure
    return {
        "frame": e.frame.copy(),
        "hidden": dict(e.hidden),
        "writable": e.writable.copy(),
        "accessed": e.accessed.copy(),
        "watched": e.watched.copy(),
        "stamp": rig.touches.stamp.copy(),
        "firsts": dict(rig.touches.firsts),
        "sampler": rig.sampler.status(),
        "soft_faults": rig.faults.soft_faults,
        "faults": len(rig.daemon.faults),
        "verified": rig.guest.verified,
        "os": rig.os.summary(),
        "kinds": rig.os.kind.copy(),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.mark.timeout(30)
async def test_checking_is_not_a_guest_access(rig: CheckRig) -> None:
    """Sweeps of the whole guest leave every trace of a guest access as it was: the accessed
    bits (swap's second chance), the touch log (the true working set), the sample's counts,
    the fault path, the guest's own verification counters and the guest OS."""
    await rig.fill()
    rig.exposure.accessed[:] = False
    before = snapshot(rig)
    for _ in range(3):
        sweep(rig)
    assert rig.checker.checked >= 3 * PAGES
    assert_unchanged(before, snapshot(rig))


# ---- end to end ----------------------------------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vmmem_vmm_page")
    }


def _poll(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def _mapped(socket: Path, guest_pages: int) -> npt.NDArray[np.int64]:
    chunk = asyncio.run(ctl(socket, "exposures", start=0))
    return Exposures.from_chunks(guest_pages, [chunk]).frame


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_e2e_a_frame_corrupted_in_machine_memory_is_counted_by_the_agent(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Real daemons: the guest writes its memory and stops; a byte of one mapped frame is
    flipped through the machine-memory file. The agent's page checker finds it although the
    guest never reads that page again: the agent's progress, results and Prometheus counter
    show it, named; the guest's own mismatch count stays 0. The rate is set at run time; a
    bad rate is refused and changes nothing."""
    port = free_port()
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("vm1", "--page-check-rate", "500", memory="4MiB", metrics_port=port)
        sock = d.control_socket("vm1")
        # Unique content only: no page is merged with another by page sharing, so the
        # corrupted frame backs exactly one page.
        phase = {
            "name": "fill",
            "duration": 1.0,
            "working_set": 1.0,
            "write_ratio": 1.0,
            "distribution": "sequential",
            "content": {"zero": 0.0, "duplicate": 0.0, "unique": 1.0},
        }
        asyncio.run(ctl(sock, "run_phase", phase=phase))
        _poll("phase done", lambda: not asyncio.run(ctl(sock, "progress"))["running"])
        for bad in (-1, "fast", True):
            with pytest.raises(PeerError, match="rate must be"):
                asyncio.run(ctl(sock, "set_page_check_rate", rate=bad))
        assert asyncio.run(ctl(sock, "results"))["page_check"]["rate"] == 500.0
        # 1024 pages at 20 000 pages/s: a sweep every 0.05 s of guest time.
        assert asyncio.run(ctl(sock, "set_page_check_rate", rate=20_000)) == {
            "page_check_rate": 20_000.0
        }
        _poll("a sweep", lambda: asyncio.run(ctl(sock, "results"))["page_check"]["sweeps"] >= 1)
        before = asyncio.run(ctl(sock, "progress"))
        assert before["page_check_mismatches"] == 0 and before["pages_checked"] > 0
        frames = _mapped(sock, 1024)
        bpn = 700
        assert frames[bpn] >= 0
        (machine,) = mem_dir.glob("*.machine")
        with open(machine, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
            at = int(frames[bpn]) * PAGE_SIZE + 2048
            mm[at] ^= 0xFF
        progress = _poll(
            "the mismatch",
            lambda: (p := asyncio.run(ctl(sock, "progress")))["page_check_mismatches"] and p,
        )
        assert progress["mismatches"] == 0  # the guest never read it
        assert progress["reads"] == before["reads"]
        results = asyncio.run(ctl(sock, "results"))
        assert results["page_check"]["mismatch_log"][0]["bpn"] == bpn
        assert results["page_check"]["mismatch_log"][0]["frame"] == int(frames[bpn])
        metrics = _scrape(port)
        assert metrics["vmmem_vmm_page_check_mismatches_total"] >= 1
        assert metrics["vmmem_vmm_pages_checked_total"] >= 1024
        # The load generator's report of these results: data loss, said so, though no guest
        # read (and no verification pass, here) found anything.
        status = asyncio.run(ctl(d.socket, "status"))
        no_pass = {"pages_verified": 0, "mismatches": 0, "unreachable": 0}
        report = build_report("check", 1.0, {"vm1": results}, {"vm1": no_pass}, status, [])
        assert report["outcome"] == "data_loss", report["verdict"]
        assert "page-check mismatches" in report["verdict"]
        assert report["verification"]["page_check_mismatches"] >= 1
        assert "page checking: " in render_table(report)


# ---- gaps a mutation sweep found -----------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_page_on_frame_zero_is_checked(rig: CheckRig) -> None:
    """Frame 0 is a frame like any other (here page 0 lives on it): a page mapped there is
    mapped, checked, and its corruption found."""
    await rig.fill()
    assert rig.exposure.frame[0] == 0
    assert rig.corrupt(0) == 0
    until_found(rig)
    assert rig.checker.mismatch_log == [
        {"bpn": 0, "frame": 0, "version": int(rig.guest.version[0])}
    ]


@pytest.mark.timeout(30)
async def test_a_corrupt_page_is_counted_once_per_sweep_and_again_at_the_next(
    rig: CheckRig,
) -> None:
    """The cursor stops right after the last page a turn took: the next turn starts past it,
    so the page that ended a turn is not checked again in the same sweep (a corrupt one is
    not counted twice), and every sweep after finds it again."""
    await rig.fill()
    assert rig.tick() == 100  # the cursor is past page 99
    last = rig.checker.cursor + 99  # the last page the next turn takes (100 a tick)
    rig.corrupt(last)
    assert rig.tick() == 100 and rig.checker.mismatches == 1
    assert rig.tick() == 56 + 44 and rig.checker.mismatches == 1  # wraps: the sweep ends
    assert rig.checker.sweeps == 1
    sweep(rig)
    assert rig.checker.mismatches == 2
    assert rig.checked_bpns() == [last, last]


@pytest.mark.timeout(30)
async def test_a_faster_rate_mid_sweep_checks_no_page_twice_in_one_tick(rig: CheckRig) -> None:
    """The cursor is part way round when the rate goes up to more than the guest a tick:
    the next tick checks each page once (it stops where it started), not the pages after
    the cursor twice, so a corrupt one there is counted once."""
    await rig.fill()
    rig.tick()
    rig.tick()
    start = rig.checker.cursor
    assert 0 < start < PAGES - 10
    rig.corrupt(start + 5)
    rig.checker.set_rate(10_000)  # 1000 pages a tick: the guest four times over
    assert rig.tick() == PAGES
    assert rig.checker.mismatches == 1
    assert rig.checker.cursor == start


@pytest.mark.timeout(30)
async def test_a_round_that_swept_the_whole_guest_has_no_work_left_this_tick(
    rig: CheckRig,
) -> None:
    """A high rate on a small guest: once the cursor came round in a tick the checker says
    it has no work, though tokens are left, so the low-priority loop does not run rounds
    for it that check nothing; the next tick it has work again."""
    await rig.fill()
    rig.checker.set_rate(10_000)
    assert rig.tick() == PAGES
    assert rig.checker.tokens >= 1
    assert not rig.checker.has_work()
    rig.clock.now += TICK_SECONDS
    assert rig.checker.has_work()


@pytest.mark.timeout(30)
async def test_mismatches_count_pages_not_batches(rig: CheckRig) -> None:
    """Twelve corrupt pages found in one batch are twelve mismatches (data loss is counted
    per page), and twelve more at the next sweep."""
    await rig.fill()
    for bpn in range(10, 130, 10):
        rig.corrupt(bpn)
    rig.checker.set_rate(10_000)
    rig.tick()
    assert rig.checker.mismatches == 12
    rig.tick()
    assert rig.checker.mismatches == 24
    assert rig.checker.summary()["mismatches"] == 24


@pytest.mark.timeout(30)
async def test_the_mismatch_log_keeps_the_first_hundred(rig: CheckRig) -> None:
    """Every page corrupt: all 256 are counted, but only the first 100 are remembered (the
    log is bounded however much is lost), and the summary shows the first 10."""
    await rig.fill()
    rig.frames[:] ^= 0x5A
    rig.checker.set_rate(10_000)
    rig.tick()
    rig.tick()
    assert rig.checker.mismatches == 2 * PAGES
    assert rig.checked_bpns() == list(range(100))
    assert [m["bpn"] for m in rig.checker.summary()["mismatch_log"]] == list(range(10))


@pytest.mark.timeout(30)
async def test_visible_pages_are_not_counted_as_hidden(rig: CheckRig) -> None:
    """Without a sample nothing is hidden: a sweep checks every page and counts none as
    checked through a hidden mapping (page 0, on frame 0, included)."""
    await rig.fill()
    sweep(rig)
    assert rig.checker.checked >= PAGES
    assert rig.checker.checked_hidden == 0


@pytest.mark.timeout(30)
async def test_a_mismatch_names_the_frame_mapped_and_the_page_s_version(
    rig: CheckRig,
) -> None:
    """Pages 137 and 138 moved to each other's frames (as a migration would) and 137 written
    again: a clean sweep matches (the checker hashes the frame each page is mapped on), and
    a corruption of 137 is logged with 137's frame (138) and 137's version, not 138's."""
    await rig.fill()
    g = rig.guest
    while g.version[137] <= g.version[138]:
        g.write(rig.frames, 137, 137, Content.UNIQUE, 0)
    a, b = rig.frames[137].copy(), rig.frames[138].copy()
    rig.frames[137], rig.frames[138] = b, a
    rig.exposure.install(np.array([137, 138]), np.array([138, 137]), np.ones(2, dtype=bool))
    sweep(rig)
    assert rig.checker.mismatches == 0
    assert rig.corrupt(137) == 138
    until_found(rig)
    assert rig.checker.mismatch_log == [{"bpn": 137, "frame": 138, "version": int(g.version[137])}]


@pytest.mark.timeout(30)
async def test_an_idle_spell_banks_at_most_one_ticks_share_of_the_bound(rig: CheckRig) -> None:
    """A latency-sensitive VM (bound 0.5 ms, checks at 10 µs a page: 5 pages a tick) that had
    no round for a second: the next tick still checks at most its 10 % share of one tick's
    bound, not the shares of the ticks it missed (the rate would allow 100)."""
    await rig.fill()
    latency_sensitive_with_costly_checks(rig)
    for _ in range(20):  # the cost per page is measured
        rig.tick()
    rig.clock.now += 10 * TICK_SECONDS
    assert 1 <= rig.tick() <= 5


@pytest.mark.timeout(30)
async def test_time_with_checking_off_earns_no_pages(rig: CheckRig) -> None:
    """Rate 0 for a tick, then checking is switched on: the time it was off earns nothing
    (the bucket is refilled at the old rate before the new one applies), and half a tick
    at the new rate earns half a tick's pages."""
    await rig.fill()
    rig.checker.set_rate(0.0)
    rig.clock.now += TICK_SECONDS
    rig.checker.set_rate(1000.0)
    assert not rig.checker.has_work() and rig.checker.run(1000) == 0
    rig.clock.now += TICK_SECONDS / 2
    assert rig.checker.run(1000) == 50


async def balloon_upper_quarter(rig: CheckRig) -> npt.NDArray[np.int64]:
    """The guest writes the lower half; the balloon takes 64 pages of the upper half, which
    are then mapped again (as a fault-around would): the BPNs taken."""
    await rig.fill(working_set=0.5)
    rig.region.balloon_target_pages = 64
    taken = rig.inflate(64)
    assert len(taken) == 64 and (taken >= PAGES // 2).all()
    assert not rig.exposure.mapped_in(0, PAGES)[taken].any()
    return taken


@pytest.mark.timeout(30)
async def test_ballooned_pages_are_counted_skipped_only_when_mapped(rig: CheckRig) -> None:
    """The balloon's pages are not mapped after inflation: a sweep skips none of them as
    ballooned (there is nothing to skip). Mapped again, a pass over the whole guest counts
    each of them once."""
    taken = await balloon_upper_quarter(rig)
    sweep(rig)
    assert rig.checker.skipped_ballooned == 0
    rig.exposure.install(taken, taken, np.ones(len(taken), dtype=bool))
    rig.checker.set_rate(10_000)  # a tick passes over the whole guest once
    rig.tick()
    assert rig.checker.skipped_ballooned == 64
    assert rig.checker.mismatches == 0


@pytest.mark.timeout(30)
async def test_a_turn_that_does_not_reach_the_balloon_counts_none_skipped(
    rig: CheckRig,
) -> None:
    """Checkable pages are 0..127, the balloon's mapped pages 192..255. A turn of 100 pages
    that starts low in the guest ends before 128: it passes over no ballooned page, so it
    counts none skipped; over the sweeps each ballooned page is counted once a sweep."""
    taken = await balloon_upper_quarter(rig)
    rig.exposure.install(taken, taken, np.ones(len(taken), dtype=bool))
    for _ in range(10):
        rig.tick()
        if rig.checker.cursor <= 27:  # the next 100 pages end at 127 at the latest
            break
    else:
        raise AssertionError("the cursor never came near the start")
    before = rig.checker.skipped_ballooned
    assert rig.tick() == 100 and rig.checker.cursor <= 127
    assert rig.checker.skipped_ballooned == before


@pytest.mark.timeout(30)
async def test_faults_are_counted_skipped_where_a_turn_passes_a_mapped_page(
    rig: CheckRig,
) -> None:
    """Faults in flight on page 150 (mapped) and page 160 (not mapped). The first turn checks
    pages 0..99: its look-ahead window reaches both, but the cursor stops at 100, so nothing
    is counted skipped yet. Over the rest of the sweep the mapped page is counted once; the
    unmapped one was not to be checked anyway, so it is not counted."""
    await rig.fill()
    rig.exposure.invalidate(np.array([160], dtype=np.int64))
    loop = asyncio.get_running_loop()
    rig.faults.pending[150] = loop.create_future()
    rig.faults.pending[160] = loop.create_future()
    assert rig.tick() == 100 and rig.checker.cursor == 100
    assert rig.checker.skipped_faulting == 0
    sweeps = rig.checker.sweeps
    while rig.checker.sweeps == sweeps:  # on to the end of the guest (and a little past)
        rig.tick()
    assert rig.checker.cursor < 150 and rig.checker.skipped_faulting == 1
    assert rig.checker.mismatches == 0
    del rig.faults.pending[150], rig.faults.pending[160]


@pytest.mark.timeout(30)
def test_after_a_rest_a_guest_is_swept_whole_before_resting_again() -> None:
    """A guest larger than one turn's scan (twice MAX_SCAN BPNs) with nothing mapped: two
    turns make a sweep that found nothing, so the checker rests. A page mapped during the
    rest, in the second half, is found by the second turn after the rest: one more turn
    that found nothing is not a whole sweep, so it does not start another rest."""
    pages = 2 * MAX_SCAN
    exposure = ExposureTable(pages)
    frames = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    clock = FakeClock()
    checker = PageChecker(
        frames, exposure, GuestMemory(7, pages), GuestOS(pages), set(), 1000.0, clock=clock
    )

    def tick() -> int:
        clock.now += TICK_SECONDS
        return checker.run(100) if checker.has_work() else 0

    assert tick() == 0 and checker.has_work()  # half a sweep: no rest yet
    assert tick() == 0 and not checker.has_work()  # a whole sweep: rest
    for _ in range(12):
        if checker.has_work():
            break
        clock.now += TICK_SECONDS
    else:
        raise AssertionError("the rest did not end")
    bpn = MAX_SCAN + 1000
    exposure.install(np.array([bpn]), np.array([1]), np.array([True]))
    frames[1, 0] = 1  # never written by the guest, so expected zero: a mismatch
    clock.now -= TICK_SECONDS  # tick() adds it back
    assert [tick(), tick()] == [0, 1]
    assert checker.mismatch_log == [{"bpn": bpn, "frame": 1, "version": 0}]
