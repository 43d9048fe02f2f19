"""The soak's run: set up, interleave the scheduled events with checks, verify, stop.

The guests run one long phase each, driven through their control sockets (``run_phase``,
``progress``, ``results``, ``verify``), not through ``vmmem-load``: the load generator
counts a VM that dies as a failure, while here agents die on purpose, and each VM's figures
are read where they are made, so a failure names the VM and the incarnation.

Events run one at a time, each waiting on the state it leads to (a VM gone from ``status``,
``platform_recovered`` and every agent's ``platform_resumed`` in the logs) with a bound;
checks run between them every ``check_every`` seconds, and after every kill. The first
failure ends the scheduled part; the final verification still runs, so the report says
whether data was lost as well.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from platform_daemon.persist import state_tag
from shared.errors import VMMemError

from .plan import (
    DaemonLife,
    Event,
    Kind,
    MemorySample,
    Settings,
    judge,
    schedule,
    verification_problems,
)
from .procs import Fleet, SoakFailure, log_events, log_problems, proc_memory, wait_for
from .report import Report

#: A guest whose reads and writes do not move for this long is stuck (restarts excluded).
STALL_SECONDS = 30.0
#: Bounds on what the events wait for; generous, as the machine may be loaded.
RESTART_SECONDS = 60.0
RELEASE_SECONDS = 30.0
#: How long a run may go on past its end for its last daemon to be judged (see ``loop``).
EXTRA_SECONDS = 60.0
DISTRIBUTIONS = ("uniform", "zipf", "sequential")
#: What a process that misbehaves makes a request raise (an error reply, a dead socket, a
#: ``vmmem-ctl`` that hangs or prints no JSON): each is a failure of the soak, reported with
#: the others.
FAILURES = (SoakFailure, VMMemError, OSError, subprocess.SubprocessError, ValueError)
SHM = Path("/dev/shm")


class Soak:
    """One soak run over a ``Fleet``; ``run()`` returns its report."""

    def __init__(self, settings: Settings, fleet: Fleet) -> None:
        self.s = settings
        self.fleet = fleet
        self.rng = random.Random(settings.seed ^ 0x50AC)
        self.names = [f"vm{i}" for i in range(settings.agents)]
        self.report = Report(settings)
        self.t0 = time.monotonic()
        self.lives: list[DaemonLife] = []
        self.progress: dict[str, tuple[int, float]] = {}
        self.host_pages = 0
        self.shm_before = {p.name for p in SHM.iterdir()}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, kind: str, text: str, **data: Any) -> None:
        self.report.event(self.now(), kind, text, **data)

    def fail(self, text: str) -> None:
        self.report.failure(self.now(), text)

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self.setup()
            self.loop(deque(schedule(self.s)))
        except FAILURES as exc:
            self.fail(
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, SoakFailure) else str(exc)
            )
        if self.fleet.platform is not None and self.fleet.platform.popen.poll() is None:
            try:
                self.finish()
            except FAILURES as exc:
                self.fail(f"final verification: {exc}")
        else:
            self.fail("no final verification: the daemon is not running")
        self.stop()
        return self.report

    def setup(self) -> None:
        s = self.s
        platform = self.fleet.start_platform()
        self.lives.append(DaemonLife(platform.pid, self.now()))
        for i, name in enumerate(self.names):
            self.fleet.start_agent(name, s.guest_mib, s.vcpus, seed=s.seed * 1000 + i)
        wait_for(lambda: len(self.status()["vms"]) == s.agents, "every agent registered", 60)
        st = self.status()
        self.host_pages = st["host"]["pages"]
        self._operator("set-host-limit", f"{s.limit_mib}MiB")
        self.t0 = time.monotonic()  # the schedule counts from here
        self.lives[-1].started = self.lives[-1].ready = 0.0
        for name in self.names:
            self.start_phase(name)
        self.say(
            "start",
            f"{platform.label} pid {platform.pid}: {st['host']['pages']:,} frames "
            f"({s.host_mib} MiB), host limit {s.limit_mib} MiB, swap {s.swap_mib} MiB; "
            f"{s.agents} guests of {s.guest_mib} MiB ({s.guest_total_mib} MiB)",
        )

    def loop(self, pending: deque[Event]) -> None:
        """Until the time is up and every scheduled event has run (none is skipped, however
        late), unless something failed: each event when due, a check when due. On a loaded
        machine the events run late; the run then goes on (by ``EXTRA_SECONDS`` at most)
        until the last daemon has been watched long enough for its memory to be judged."""
        next_check = self.s.check_every
        extended = False
        while not self.report.failures:
            if self.now() >= self.s.seconds and not pending:
                if self.judgeable() or self.now() >= self.s.seconds + EXTRA_SECONDS:
                    break
                if not extended:
                    extended = True
                    self.say("extend", f"going on until {self.label_platform()} can be judged")
            if pending and pending[0].at <= self.now():
                self.do(pending.popleft())
            elif self.now() >= next_check:
                self.tick()
                next_check = self.now() + self.s.check_every
            else:  # the scheduler's wait until the next due thing; nothing is asserted here
                due = min(next_check, pending[0].at if pending else self.s.seconds)
                time.sleep(min(0.5, max(0.0, due - self.now())))

    def judgeable(self) -> bool:
        """The current daemon has a baseline sample (a warm-up after it was ready) and has
        been watched for ``min_judged_seconds`` since (the final look adds one more)."""
        base = self.lives[-1].baseline(self.s.warmup)
        return base is not None and self.now() - base.t >= self.s.min_judged_seconds

    def label_platform(self) -> str:
        assert self.fleet.platform is not None
        return f"{self.fleet.platform.label} pid {self.fleet.platform.pid}"

    def do(self, event: Event) -> None:
        self.report.counts[event.kind] += 1
        if event.kind is Kind.DAEMON_KILL:
            self.kill_daemon()
        elif event.kind is Kind.AGENT_KILL:
            self.kill_agent(self.rng.choice(self.names))
        else:
            self.retire()

    # ---- checks -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.fleet.daemon_ctl("status")

    def check(self, why: str) -> str:
        """``vmmem-ctl check`` as an operator runs it; any violation fails the soak, by name."""
        res = self.fleet.vmmem_ctl("check", "--json")
        if res.returncode not in (0, 1):
            raise SoakFailure(f"vmmem-ctl check ({why}) exited {res.returncode}: {res.stderr}")
        out = json.loads(res.stdout)
        self.report.checked(out)
        for v in out["violations"]:
            self.fail(f"check ({why}): VIOLATION {v['name']} ({v['count']}): {v['detail']}")
        skipped = out["agents_skipped"]
        note = f"; skipped {skipped}" if skipped else ""
        return f"check {'ok' if out['ok'] else 'FAILED'} in {out['seconds'] * 1000:.0f} ms{note}"

    def sample(self) -> MemorySample | None:
        """The daemon's RSS and descriptors, taken before a check connects to it."""
        assert self.fleet.platform is not None
        got = proc_memory(self.fleet.platform.pid)
        if got is None:
            return None
        sample = MemorySample(round(self.now(), 2), *got)
        self.lives[-1].samples.append(sample)
        return sample

    def tick(self) -> None:
        """A periodic look: processes alive, daemon memory, invariants, guests moving."""
        self.alive()
        sample = self.sample()
        checked = self.check("periodic")
        moving = self.watch_guests()
        st = self.status()
        self.report.swap_seen(st)
        mem = f"RSS {sample.rss_kib / 1024:.1f} MiB, {sample.fds} fds" if sample else "gone"
        self.say(
            "check",
            f"{checked}; daemon {mem}; swap {st['swap']['used']:,} used; reads {moving:,}",
        )

    def alive(self) -> None:
        for proc in [self.fleet.platform, *self.fleet.agents.values()]:
            assert proc is not None
            if proc.popen.poll() is not None:
                raise SoakFailure(
                    f"{proc.label} (pid {proc.pid}) exited with {proc.popen.returncode}: "
                    + " | ".join(log_problems(proc.log, 4))
                )

    def watch_guests(self) -> int:
        """Every guest's reads are checked as it runs: a mismatch fails the soak at once,
        and so does a guest that stopped moving. Returns the reads of all guests."""
        total = 0
        for name in self.names:
            p = self.fleet.agent_ctl(name, "progress")
            total += p["reads"]
            if p["mismatches"]:
                log = self.fleet.agent_ctl(name, "results")["mismatch_log"]
                raise SoakFailure(f"{self.label(name)}: {p['mismatches']} mismatches: {log}")
            ops, since = self.progress.get(name, (-1, self.now()))
            if p["reads"] + p["writes"] != ops:
                self.progress[name] = (p["reads"] + p["writes"], self.now())
            elif self.now() - since > STALL_SECONDS:
                raise SoakFailure(f"{self.label(name)} made no progress for {STALL_SECONDS:g} s")
        return total

    def label(self, name: str) -> str:
        return self.fleet.agents[name].label

    # ---- events -----------------------------------------------------------------------------

    def start_phase(self, name: str) -> None:
        """One phase running past the end (the soak halts it): all of guest memory, half
        writes, pinned pages; the distribution differs by VM."""
        i, inc = self.names.index(name), self.fleet.incarnations[name]
        phase = {
            "name": "soak",
            "duration": self.s.seconds - self.now() + 600,
            "working_set": 1.0,
            "distribution": DISTRIBUTIONS[i % len(DISTRIBUTIONS)],
            "write_ratio": 0.5,
            "pinned_pages": 8,
            "seed": self.s.seed * 1000 + i * 10 + inc,
        }
        self.fleet.agent_ctl(name, "run_phase", phase=phase)
        self.progress.pop(name, None)

    def kill_daemon(self) -> None:
        """SIGKILL the daemon mid-work; a new one on the same socket, memory directory and
        swap file takes over, and every agent resumes by itself."""
        old = self.fleet.platform
        assert old is not None
        self.sample()  # this daemon's last look (before a request of ours is open)
        st = self.status()
        self.report.swap_seen(st)
        in_flight = sum(vm["pages"]["in_flight"] for vm in st["vms"])
        resumed = {
            n: len(log_events(self.fleet.agents[n].log, "platform_resumed")) for n in self.names
        }
        old.sigkill()
        t_kill = self.now()
        new = self.fleet.start_platform()
        life = DaemonLife(new.pid, self.now())
        self.lives.append(life)
        recovered = wait_for(
            lambda: log_events(new.log, "platform_recovered"),
            f"{new.label} to take over",
            RESTART_SECONDS,
        )[0]
        if recovered["vms"] != self.s.agents:
            self.fail(f"{new.label} took over {recovered['vms']} VMs, not {self.s.agents}")
        took_over = self.now() - t_kill
        downtimes = [self._resumed(n, resumed[n]) for n in self.names]
        life.ready = self.now()
        self.progress.clear()  # the guests were stalled meanwhile, as promised
        self.say(
            "daemon",
            f"SIGKILL {old.label} pid {old.pid} ({st['swap']['used']:,} pages swapped, "
            f"{in_flight} in flight); {new.label} pid {new.pid} took over {recovered['vms']} "
            f"VMs in {took_over:.1f} s ({recovered['pages_undone']} pages undone); guests "
            f"resumed after {max(downtimes):.1f} s; {self.check('after the takeover')}",
            pages_in_flight=in_flight,
            takeover_seconds=round(took_over, 2),
            guest_stall_seconds=round(max(downtimes), 2),
        )

    def _resumed(self, name: str, before: int) -> float:
        """Wait for ``name``'s agent to log its next ``platform_resumed``; its downtime."""
        log = self.fleet.agents[name].log
        events = wait_for(
            lambda: (e := log_events(log, "platform_resumed"))[before:] and e,
            f"{self.label(name)} to resume",
            RESTART_SECONDS,
        )
        return float(events[before]["downtime_seconds"])

    def kill_agent(self, name: str) -> None:
        """SIGKILL one agent; the daemon must release all its VM held (the VM leaves
        ``status`` and the check right after finds no frame or slot left over), and a new
        agent process of the same name registers as a new VM."""
        old = self.fleet.agents[name]
        res = self.fleet.agent_ctl(name, "results")
        st = self.status()
        self.report.swap_seen(st)
        vm = next(v for v in st["vms"] if v["name"] == name)
        assert self.fleet.platform is not None
        log = self.fleet.platform.log
        released = len([e for e in log_events(log, "vm_released") if e["vm"] == name])
        old.sigkill()
        t_kill = self.now()
        wait_for(
            lambda: all(v["vm_id"] != vm["vm_id"] for v in self.status()["vms"]),
            f"VM {vm['vm_id']} ({old.label}) to leave status",
            RELEASE_SECONDS,
        )
        gone = self.now() - t_kill
        event = wait_for(
            lambda: [e for e in log_events(log, "vm_released") if e["vm"] == name][released:],
            f"vm_released for {old.label}",
            RELEASE_SECONDS,
        )[0]
        if event["reason"] != "killed":
            self.fail(f"{old.label} released with reason {event['reason']!r}, not 'killed'")
        checked = self.check(f"after {old.label} was released")
        self.report.incarnation(old.label, res)
        new = self.fleet.start_agent(name, self.s.guest_mib, self.s.vcpus, self.s.seed)
        fresh = wait_for(
            lambda: [v for v in self.status()["vms"] if v["name"] == name],
            f"{new.label} to register",
            RESTART_SECONDS,
        )[0]
        if fresh["vm_id"] == vm["vm_id"] or fresh["pid"] != new.pid:
            self.fail(f"{new.label} did not register as a new VM: {fresh['vm_id']}, {fresh}")
        self.start_phase(name)
        pages = vm["pages"]
        self.say(
            "agent",
            f"SIGKILL {old.label} pid {old.pid} (VM {vm['vm_id']}: {pages['exposed']:,} pages "
            f"exposed, {pages['swapped']:,} swapped; {res['reads']:,} reads checked, "
            f"{res['mismatches']} mismatches); released in {gone:.2f} s ({event['frames']:,} "
            f"frames, reason {event['reason']}); {checked}; {new.label} pid {new.pid} is VM "
            f"{fresh['vm_id']}",
            release_seconds=round(gone, 3),
        )

    def retire(self) -> None:
        """Every other retirement is ``vmmem-ctl retire --mpn`` on a random frame (free,
        mostly, under the host limit); the others pick a frame backing a guest page (the
        ``retire`` op's ``random_used``), so that both kinds happen even in a short soak."""
        if self.report.counts[Kind.RETIRE] % 2:
            picked = "any"
            mpn = self.rng.randrange(self.host_pages)
            out = json.loads(self._operator("retire", "--mpn", str(mpn)))
        else:
            picked = "used"
            out = self.fleet.daemon_ctl("retire", random_used=True, seed=self.rng.getrandbits(31))
        self.report.retired_by_kind[out["was"]] += 1
        where = f": {out['vm']} page {out['bpn']} ({out['page_state']})" if "vm" in out else ""
        how = "vmmem-ctl retire --mpn" if picked == "any" else "a frame backing a page:"
        self.say("retire", f"{how} {out['mpn']} (was {out['was']}{where})", picked=picked)

    def _operator(self, *args: str) -> str:
        res = self.fleet.vmmem_ctl(*args)
        if res.returncode != 0:
            raise SoakFailure(f"vmmem-ctl {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    # ---- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Halt the guests; the invariants once more; every page each guest wrote reads back
        (``verify``); the daemon's memory at the end."""
        names = [n for n in self.names if self.fleet.agents[n].popen.poll() is None]
        for name in set(self.names) - set(names):
            agent = self.fleet.agents[name]
            self.fail(f"{agent.label} exited with {agent.popen.returncode}: not verified")
        for name in names:
            self.fleet.agent_ctl(name, "halt")
        self.report.swap_seen(self.status())
        self.say("final", self.check("final, guests halted"))
        for name in names:
            res = self.fleet.agent_ctl(name, "results")
            v = self.fleet.agent_ctl(name, "verify", timeout=600)
            self.report.verification(self.label(name), res, v)
            for problem in verification_problems(res, v):
                self.fail(f"{self.label(name)}: {problem}")
            self.say(
                "verify",
                f"{self.label(name)}: {v['pages_verified']:,} of {res['pages_written']:,} pages "
                f"written read back in {v['seconds']:.1f} s, {v['mismatches']} mismatches, "
                f"{v['unreachable']} unreachable; {res['reads']:,} reads checked while "
                f"running, {res['fault_errors']} fault errors, {res['pin_violations']} pin "
                f"violations",
            )
        self.sample()
        self.say("final", self.check("final, after verification"))

    def shm_strays(self) -> list[str]:
        """What appeared in /dev/shm during the soak, outside its memory directory, that is
        ours: named after the daemon's state tag or a pid the soak started (others may be
        working on this machine, and their files are theirs)."""
        ours = [state_tag(self.fleet.socket)] + [str(p.pid) for p in self.fleet.started]
        pattern = re.compile(r"(?<![0-9a-f])(" + "|".join(ours) + r")(?![0-9a-f])")
        new = {p.name for p in SHM.iterdir()} - self.shm_before - {self.fleet.mem_dir.name}
        return sorted(name for name in new if pattern.search(name))

    def stop(self) -> None:
        """A clean stop: every process exits 0, nothing stays in the memory directory."""
        codes = self.fleet.stop_all()
        killed = {p.label for p in self.fleet.started} - set(codes)
        bad = {label: code for label, code in codes.items() if code != 0}
        if bad:
            self.fail(f"did not stop cleanly (exit codes): {bad}")
        left = sorted(p.name for p in self.fleet.mem_dir.iterdir())
        if left:
            self.fail(f"left in the memory directory after a clean stop: {left}")
        strays = self.shm_strays()
        if strays:
            self.fail(f"left in {SHM} after a clean stop: {strays}")
        self.say(
            "stop",
            f"{len(codes)} processes stopped ({len(killed)} killed earlier by the soak); "
            f"memory directory {'empty' if not left else 'NOT empty'}, "
            f"{'nothing' if not strays else 'files'} of ours left in {SHM}",
        )
        self.report.memory_verdicts = [judge(life, self.s) for life in self.lives]
        self.report.daemons = [asdict(life) for life in self.lives]
        if not any(v.judged for v in self.report.memory_verdicts):
            self.fail("no daemon process lived long enough to judge its memory")
        for verdict in self.report.memory_verdicts:
            if not verdict.flat:
                self.fail(f"daemon memory not flat: {verdict.text}")
        self.report.processes = [
            {"label": p.label, "pid": p.pid, "exit": p.popen.returncode} for p in self.fleet.started
        ]
        if self.report.failures:
            for proc in self.fleet.started:
                self.report.problems[proc.label] = log_problems(proc.log)
