"""What a soak of a given length does and when, and what "flat memory" means (no I/O here)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MiB = 1 << 20


class Kind(StrEnum):
    """The scheduled events (checks run between them, every ``check_every`` seconds)."""

    DAEMON_KILL = "daemon_kill"
    AGENT_KILL = "agent_kill"
    RETIRE = "retire"


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the workload started
    kind: Kind


@dataclass(frozen=True)
class Settings:
    """One soak's shape. Sizes follow from the guests: machine memory holds them all, the
    host limit is half of it (so about half of every guest's memory is swapped at any time)
    and swap holds all of it twice over."""

    seconds: float
    agents: int = 3
    guest_mib: int = 16
    vcpus: int = 2
    seed: int = 0
    check_every: float = 3.0
    #: Events per minute. The counts are rounded, but each event happens at least once.
    daemon_kills_per_minute: float = 0.6
    agent_kills_per_minute: float = 1.0
    retirements_per_minute: float = 4.0
    #: How much the daemon's RSS may grow from its warm-up to its end (per daemon process).
    rss_tolerance_mib: float = 8.0
    #: A daemon process whose life after warm-up is shorter than this is not judged.
    min_judged_seconds: float = 5.0

    @property
    def guest_total_mib(self) -> int:
        return self.agents * self.guest_mib

    @property
    def host_mib(self) -> int:
        return max(64, self.guest_total_mib)

    @property
    def limit_mib(self) -> int:
        return self.guest_total_mib // 2

    @property
    def swap_mib(self) -> int:
        return 2 * self.guest_total_mib

    @property
    def warmup(self) -> float:
        """Seconds a daemon serves before its baseline RSS is taken: its first swap-outs,
        merges and histograms allocate for good; a leak is growth after that."""
        return min(15.0, self.seconds / 6)

    def count(self, kind: Kind) -> int:
        per_minute = {
            Kind.DAEMON_KILL: self.daemon_kills_per_minute,
            Kind.AGENT_KILL: self.agent_kills_per_minute,
            Kind.RETIRE: self.retirements_per_minute,
        }[kind]
        least = 3 if kind is Kind.RETIRE else 1  # a free and a used frame at least
        return max(least, round(per_minute * self.seconds / 60))


def schedule(settings: Settings) -> list[Event]:
    """When each event happens: ``count(kind)`` of each kind, with some jitter (seeded), none
    in the first warm-up (the overcommit builds up first) nor in the last tenth (the final
    verification follows).

    The daemon is killed in the first half and agents in the second: the last daemon then
    serves the whole second half, through every agent kill and restart, so that its memory
    is judged over the longest stretch and over the churn a leak would show in (a VM's
    mappings, descriptors and p2m file coming and going). Retirements are spread over the
    whole run. Each kill is in the middle of its slot, so that a restart settles first."""
    rng = random.Random(settings.seed)
    start, half, end = settings.warmup, settings.seconds / 2, settings.seconds * 0.9
    events = [
        *_spread(rng, Kind.DAEMON_KILL, settings.count(Kind.DAEMON_KILL), start, half, 0.3, 0.7),
        *_spread(rng, Kind.AGENT_KILL, settings.count(Kind.AGENT_KILL), half, end, 0.3, 0.7),
        *_spread(rng, Kind.RETIRE, settings.count(Kind.RETIRE), start, end, 0.0, 1.0),
    ]
    return sorted(events, key=lambda e: e.at)


def _spread(
    rng: random.Random, kind: Kind, n: int, start: float, end: float, lo: float, hi: float
) -> list[Event]:
    """``n`` events in ``n`` equal slots of [start, end], each at a random fraction in
    [lo, hi] of its slot."""
    slot = (end - start) / n
    return [Event(round(start + slot * (i + rng.uniform(lo, hi)), 2), kind) for i in range(n)]


@dataclass
class MemorySample:
    """One look at a daemon process: ``/proc/PID/status`` and ``/proc/PID/fd``."""

    t: float  # seconds since the soak started
    rss_kib: int
    anon_kib: int
    fds: int


@dataclass
class DaemonLife:
    """One daemon process from start to kill (or the end), and its samples."""

    pid: int
    started: float
    ready: float | None = None  # serving, with every agent registered or resumed
    samples: list[MemorySample] = field(default_factory=list)

    def baseline(self, warmup: float) -> MemorySample | None:
        """The first sample a warm-up after it was ready."""
        if self.ready is None:
            return None
        return next((s for s in self.samples if s.t >= self.ready + warmup), None)


@dataclass(frozen=True)
class MemoryVerdict:
    pid: int
    judged: bool
    flat: bool
    text: str
    baseline: MemorySample | None = None
    end: MemorySample | None = None


def judge(life: DaemonLife, settings: Settings) -> MemoryVerdict:
    """Flat means: the last sample's RSS is within ``rss_tolerance_mib`` of the baseline's
    (the first sample after warm-up), and it holds no more descriptors at the end than then.
    Too short a life after warm-up is not judged (and said so)."""
    base = life.baseline(settings.warmup)
    last = life.samples[-1] if life.samples else None
    if base is None or last is None or last.t - base.t < settings.min_judged_seconds:
        lived = (last.t - life.started) if last else 0.0
        return MemoryVerdict(
            life.pid,
            False,
            True,
            f"pid {life.pid}: lived {lived:.0f} s, "
            f"too short to judge (warm-up {settings.warmup:.0f} s)",
        )
    grew_mib = (last.rss_kib - base.rss_kib) / 1024
    anon_mib = (last.anon_kib - base.anon_kib) / 1024
    flat = grew_mib <= settings.rss_tolerance_mib and last.fds <= base.fds
    peak = max(s.rss_kib for s in life.samples if s.t >= base.t) / 1024
    text = (
        f"pid {life.pid}: RSS {base.rss_kib / 1024:.1f} MiB at {base.t:.0f} s -> "
        f"{last.rss_kib / 1024:.1f} MiB at {last.t:.0f} s ({grew_mib:+.1f} MiB, anonymous "
        f"{anon_mib:+.1f} MiB, peak {peak:.1f} MiB; tolerance +{settings.rss_tolerance_mib:g} "
        f"MiB); descriptors {base.fds} -> {last.fds}"
    )
    return MemoryVerdict(life.pid, True, flat, text, base, last)


def verification_problems(results: dict[str, Any], verify: dict[str, Any]) -> list[str]:
    """What is wrong with one guest at the end, from its agent's ``results`` and ``verify``:
    every page it wrote reads back, and nothing went wrong while it ran."""
    problems = []
    if verify["mismatches"] or results["mismatches"]:
        problems.append(
            f"{verify['mismatches']} mismatches in verification, {results['mismatches']} while "
            f"running: {results.get('mismatch_log', [])}"
        )
    if verify["unreachable"]:
        problems.append(
            f"{verify['unreachable']} pages unreachable: {verify['unreachable_by_error']}"
        )
    if verify["pages_verified"] != results["pages_written"]:
        problems.append(
            f"{verify['pages_verified']} pages verified of {results['pages_written']} written"
        )
    if results["fault_errors"]:
        problems.append(f"{results['fault_errors']} faults failed")
    if results["pin_violations"]:
        problems.append(f"{results['pin_violations']} pinned pages moved")
    return problems
