"""The agent's low-priority loop: the talk's 10 Hz callback, under a time bound::

    bound = TimeBound(budget_from(latency_sensitivity), started=now)
    while (req := await platform.get_request(LOW, bound)).has_work:
        services[req.type].process(req, bound)
        await platform.complete_request(req, bound)

Rounds follow guest progress, as the talk's callback runs on guest time: every 100 ms the
agent adds the time the guest made progress since the last tick (not every running vCPU
blocked on the platform) to a credit, capped at two ticks, and runs a round only when the
credit holds a whole tick. A guest progressing half the time gets a round every other tick;
a stalled one gets none, and no flood afterwards. The agent also reports its total guest
progress in the control region: the clock of the platform's sampling periods.

A round asks the platform for its first batch while the guest still runs, then exits the
guest (the gate stops every vCPU at its next yield) and spends at most the bound on
low-priority work. The bound comes from the VM's latency sensitivity
(``shared/timebound.py``).

Two queues share the bound, interleaved: a turn of the monitor's own queue (sampling's
arming, then page checking; given at most half of what is left while the platform still has
work), then one platform batch, and so on. Each GetRequest carries the time left; the daemon
sizes the batch to fit it, so the round ends past the bound by at most the misestimate of
one batch; the agent starts a further exchange only when even its longest recent round trip
still fits. The round plans to end a *slack* before its bound: what recent rounds ran past
their plan (waits for a CPU, mostly), so that the next one still ends within the bound.
Page checking is background work, always there: a round for it alone runs only on credit to
spare (a tick more than a round needs), so it never delays the platform's.

High priority pre-empts low: the round ends as soon as a high-priority bit is set or a
high-priority round runs, and the high-priority loop is woken.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import structlog

from shared.constants import LOW_PRIORITY_MASK, Priority
from shared.layout import ControlRegion
from shared.messages import GET_FLAG_NEW_ROUND, GetRequest, Request
from shared.schedstat import RunDelay
from shared.timebound import TICK_SECONDS, TimeBound, bound_for

from .batches import BatchProcessor
from .guest_time import GuestGate, GuestProgress, ProgressMeter
from .link import Link
from .monitor import MonitorQueue
from .rounds import HighPriorityLoop

log = structlog.get_logger("vmm_agent.lowprio")
#: Guest progress a round needs (a tick's worth, less timer jitter), and the most the credit
#: keeps (no burst of rounds after a stall).
ROUND_CREDIT = 0.9 * TICK_SECONDS
MAX_CREDIT = 2 * TICK_SECONDS
#: Rounds remembered for the load generator's report.
RECORDS_KEPT = 4096
#: What one page of rounds (ctl op ``lowprio``) may take of a control reply, estimated as
#: below: the rounds kept, with their steps, are several MiB, and a frame holds 1 MiB.
ROUNDS_REPLY_BYTES = 512 << 10
#: Upper estimates of a round's JSON without its steps, and of one step's.
_ROUND_JSON_BYTES, _STEP_JSON_BYTES = 512, 320
#: Empty GetRequest round trips kept for the agent's estimate of one: the last this many,
#: and none older than RTT_MAX_AGE seconds (a long one must not block exchanges for good).
RTT_WINDOW = 32
RTT_MAX_AGE = 10.0
#: Slack: a round plans to end this far before its bound. It is the SLACK_QUANTILE of how far
#: the last SLACK_WINDOW rounds that the plan ended ran past their planned end (waits for a
#: CPU, a batch's misestimate), at most MAX_SLACK_FRACTION of the bound, and 0 until
#: SLACK_MIN_SAMPLES such rounds were seen.
SLACK_WINDOW = 64
SLACK_QUANTILE = 0.97
SLACK_MIN_SAMPLES = 8
MAX_SLACK_FRACTION = 0.5


@dataclass
class RoundRecord:
    """One low-priority round as the monitor saw it."""

    started: float  # monotonic
    bound: float
    used: float
    gap: float  # time since guest progress stopped, at the round's start
    outcome: str  # done, bound, preempted
    cpu: float  # the monitor's CPU time in the round (its own work, no waiting)
    batches: int
    pages: int
    #: Of ``used``, the time the agent's thread waited for a CPU (runnable, not running).
    run_delay: float = 0.0
    #: How far before the bound the round planned to end (``LowPriorityLoop.slack``).
    slack: float = 0.0
    #: Its steps in order, to split an overrun into its parts: ``batch`` (seq, service, pages,
    #: wall and CPU of the agent's processing), ``exchange`` (a GetRequest: sent, resumed,
    #: the agent's CPU while it waited, which is other tasks', and for a round-over answer
    #: the daemon's own time on it), ``monitor`` (wall and CPU of a monitor turn); each with
    #: ``wait``, the agent's run delay in it.
    steps: list[dict[str, float | int | str]] = field(default_factory=list)

    @property
    def overrun(self) -> float:
        return max(0.0, self.used - self.bound)


class LowPriorityLoop:
    """Runs one bounded low-priority round per tick."""

    def __init__(
        self,
        link: Link,
        region: ControlRegion,
        batches: BatchProcessor,
        monitor: MonitorQueue,
        high: HighPriorityLoop,
        gate: GuestGate,
        progress: GuestProgress,
        latency_sensitivity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.region = region
        self.batches = batches
        self.monitor = monitor
        self.high = high
        self.gate = gate
        self.progress = progress
        self.meter = ProgressMeter(progress)
        self.clock = clock
        self.latency_sensitivity = latency_sensitivity
        self.records: deque[RoundRecord] = deque(maxlen=RECORDS_KEPT)
        self.outcomes: Counter[str] = Counter()
        self.time_used = 0.0
        # Recent round trips of GetRequests answered "round over", less the daemon's own time
        # on them (it says so in the answer): what an empty exchange costs.
        self._rtts: deque[tuple[float, float]] = deque(maxlen=RTT_WINDOW)  # (when, seconds)
        # How far past its planned end each recent round ended by its plan ran (seconds).
        self._overshoots: deque[float] = deque(maxlen=SLACK_WINDOW)
        self.last_bound = bound_for(latency_sensitivity)
        self.credit = 0.0  # guest progress not yet spent on a round
        self.progress_total = 0.0  # guest progress so far, seconds
        self._last_tick = clock()
        self._run_delay = RunDelay()  # this (the event loop's) thread's wait for a CPU
        self.on_round: list[Callable[[RoundRecord], None]] = []
        #: Called with the time at every tick, stalled or not (the guest report, the
        #: balloon's deflation: ``balloon.py``).
        self.on_tick: list[Callable[[float], None]] = []

    @property
    def bound(self) -> float:
        """The full bound of one tick for this VM's latency sensitivity."""
        return bound_for(self.latency_sensitivity)

    async def run(self) -> None:
        next_tick = self.clock() + TICK_SECONDS
        while True:
            await asyncio.sleep(max(0.0, next_tick - self.clock()))
            now = self.clock()
            # A late tick is not caught up: the next one is a full period away.
            next_tick = max(next_tick + TICK_SECONDS, now + TICK_SECONDS / 2)
            await self.tick(now)

    async def tick(self, now: float) -> RoundRecord | None:
        """Account the guest's progress; run a round when it has earned one."""
        progressed = self.meter.fraction(now) * max(0.0, now - self._last_tick)
        self._last_tick = now
        self.progress_total += progressed
        self.region.guest_progress = self.progress_total
        for callback in self.on_tick:
            callback(now)
        self.credit = min(MAX_CREDIT, self.credit + progressed)
        if self.credit < ROUND_CREDIT:
            self.outcomes["stalled"] += 1
            return None
        budget = self.last_bound = self.bound
        platform_work = self.region.pending & LOW_PRIORITY_MASK
        if not (platform_work or self.monitor.has_work()):
            self.outcomes["idle"] += 1  # nothing queued on either side: no message at all
            return None
        # Only background work (page checking, always there): it runs on credit to spare,
        # so that the platform's next work (a sample to arm) finds a round's credit at once
        # instead of waiting for the guest to earn it again.
        spare = self.credit >= ROUND_CREDIT + TICK_SECONDS
        if not (platform_work or spare or self._urgent_monitor_work()):
            self.outcomes["idle"] += 1
            return None
        if self.high.pending():
            self.outcomes["preempted"] += 1
            self.high.kick()
            return None
        self.credit = max(0.0, self.credit - TICK_SECONDS)
        record = await self.round(budget)
        if record is None:  # the guest never exited: the credit is not spent
            self.credit = min(MAX_CREDIT, self.credit + TICK_SECONDS)
        return record

    async def round(self, budget: float) -> RoundRecord | None:
        """One round: monitor turns and platform batches, interleaved, within ``budget``.

        The first GetRequest goes out while the guest still runs, and the guest exits when its
        answer arrives: that round trip (on these machines mostly the time to wake two idle
        processes) overlaps guest execution instead of counting against the bound. Returns
        None when neither queue had anything (the guest never exited).
        """
        first: Request | None = None
        # The round plans to end ``slack`` before the bound: what recent rounds ran past
        # their plan (waits for a CPU, mostly) then still ends within it.
        slack = self.slack(budget)
        if self.region.pending & LOW_PRIORITY_MASK:
            # Not learned from: the vCPUs run meanwhile, on this event loop, and their work
            # would count as round trip.
            first = await self._get_request(
                int((budget - slack) * 1e6), GET_FLAG_NEW_ROUND, learn=False
            )
        if (first is None or not first.has_work) and not self.monitor.has_work():
            self.outcomes["empty"] += 1
            return None
        bound = TimeBound(budget, self.clock(), self.clock)
        plan = TimeBound(budget - slack, bound.started, self.clock)
        gap = self.progress.gap(bound.started)
        stalled_before = self.progress.stalled_total(bound.started)
        cpu0, wait0 = time.thread_time(), self._run_delay.seconds()
        self.gate.close()
        batches = pages = 0
        steps: list[dict[str, float | int | str]] = []
        platform_done, monitor_turn = first is None or not first.has_work, True
        try:
            if first is not None and first.has_work:
                batches, pages = 1, first.count
                self._process(first, steps)
                platform_done = first.last
                monitor_turn = True
            while True:
                if self.high.pending():
                    outcome = "preempted"
                    self.high.kick()
                    break
                left = plan.left()
                if left <= 0:
                    outcome = "bound"
                    break
                if platform_done and not self.monitor.has_work():
                    outcome = "done"
                    break
                if monitor_turn and self.monitor.has_work():
                    t0, c0, w0 = self.clock(), time.thread_time(), self._run_delay.seconds()
                    done = self.monitor.run(left if platform_done else left / 2)
                    steps.append(
                        {
                            "kind": "monitor",
                            "wall": self.clock() - t0,
                            "cpu": time.thread_time() - c0,
                            "wait": self._run_delay.seconds() - w0,
                            "done": done,
                        }
                    )
                    if done == 0 and platform_done:
                        outcome = "bound"  # not one unit of monitor work fits any more
                        break
                elif not platform_done:
                    if left < self.rtt():  # the next exchange would not fit
                        outcome = "bound"
                        break
                    t0, c0, w0 = self.clock(), time.thread_time(), self._run_delay.seconds()
                    req = await self._get_request(plan.left_us(), 0, learn=True)
                    steps.append(
                        {
                            "kind": "exchange",
                            "sent": t0,
                            "resumed": self.clock(),
                            "cpu": time.thread_time() - c0,
                            "wait": self._run_delay.seconds() - w0,
                            "daemon": 0.0 if req.has_work else req.count / 1e6,
                        }
                    )
                    if req.has_work:
                        batches += 1
                        pages += req.count
                        self._process(req, steps)
                    platform_done = not req.has_work or req.last
                monitor_turn = not monitor_turn
        finally:
            self.gate.open()
            if self.progress.running:  # a guest with no vCPU running is idle, not held up
                # The round held the guest up, except while it was stalled anyway.
                stalled = self.progress.stalled_total(self.clock()) - stalled_before
                self.progress.exited(max(0.0, bound.used() - stalled))
        record = RoundRecord(
            bound.started,
            bound.budget,
            bound.used(),
            gap,
            outcome,
            time.thread_time() - cpu0,
            batches,
            pages,
            self._run_delay.seconds() - wait0,
            slack,
            steps,
        )
        if outcome == "bound":  # the plan ended it: how far past the plan did it run?
            self._overshoots.append(record.used - plan.budget)
        self._record(record)
        return record

    def slack(self, budget: float) -> float:
        """How far before ``budget`` the next round plans to end: the SLACK_QUANTILE of
        the recent overshoots of rounds ended by their plan, within [0, MAX_SLACK_FRACTION
        of the budget]. A quiet host overshoots by a batch's misestimate and gets almost no
        slack; a host whose CPUs are busy makes the rounds wait and gets more."""
        if len(self._overshoots) < SLACK_MIN_SAMPLES:
            return 0.0
        ordered = sorted(self._overshoots)
        q = ordered[min(len(ordered) - 1, int(SLACK_QUANTILE * len(ordered)))]
        return min(MAX_SLACK_FRACTION * budget, max(0.0, q))

    def _process(self, req: Request, steps: list[dict[str, float | int | str]]) -> None:
        """Process one platform batch, its wall and CPU time traced."""
        t0, c0, w0 = self.clock(), time.thread_time(), self._run_delay.seconds()
        self.batches.process(req)
        steps.append(
            {
                "kind": "batch",
                "seq": req.seq,
                "service": req.service,
                "pages": req.count,
                "start": t0,
                "wall": self.clock() - t0,
                "cpu": time.thread_time() - c0,
                "wait": self._run_delay.seconds() - w0,
            }
        )

    def _urgent_monitor_work(self) -> bool:
        """Monitor work other than background tasks' (``background = True``) is queued."""
        return any(t.has_work() for t in self.monitor.tasks if not getattr(t, "background", False))

    def rtt(self) -> float:
        """The longest recent empty round trip (0 before the first): a second exchange is
        only started when even that fits, since the wake-up tail is long here."""
        old = self.clock() - RTT_MAX_AGE
        while self._rtts and self._rtts[0][0] < old:
            self._rtts.popleft()
        return max((rtt for _, rtt in self._rtts), default=0.0)

    async def _get_request(self, budget_us: int, flags: int, learn: bool) -> Request:
        t0 = self.clock()
        req: Request = await self.link.request(GetRequest(Priority.LOW, budget_us, flags))
        if learn and not req.has_work:
            now = self.clock()
            self._rtts.append((now, max(0.0, now - t0 - req.count / 1e6)))
        return req

    def _record(self, record: RoundRecord) -> None:
        self.records.append(record)
        self.outcomes[record.outcome] += 1
        self.time_used += record.used
        for callback in self.on_round:
            callback(record)

    def summary(self) -> dict[str, object]:
        """Rounds' outcomes and time used, for the load generator's report."""
        return {
            "latency_sensitivity": self.latency_sensitivity,
            "bound_seconds": self.bound,
            "time_used_seconds": self.time_used,
            "outcomes": dict(self.outcomes),
            "rtt_seconds": self.rtt(),
        }

    def rounds(
        self, after: float, limit: int = RECORDS_KEPT, budget: int = ROUNDS_REPLY_BYTES
    ) -> tuple[list[dict[str, object]], bool]:
        """The recent rounds that started after ``after`` (monotonic), in order, with their
        overruns, up to ``limit`` of them and about ``budget`` bytes of JSON (at least one);
        and whether more follow. A page at a time: all the rounds kept, with their steps, do
        not fit one control reply. Paging by start time relies on starts strictly increasing:
        one round a tick at most, ticks TICK_SECONDS apart."""
        out: list[dict[str, object]] = []
        size = 0
        for record in self.records:
            if record.started <= after:
                continue
            size += _ROUND_JSON_BYTES + _STEP_JSON_BYTES * len(record.steps)
            if len(out) == limit or (out and size > budget):
                return out, True
            out.append({**asdict(record), "overrun": record.overrun})
        return out, False
