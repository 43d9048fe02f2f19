"""The soak (issue 7 §9): the driver ``make soak`` runs, short, with every event at least once.

The end-to-end tests run ``python -m tools.soak`` as ``make soak`` does, in a session of its
own. Whatever ends a test (a failed assert, its timeout), the soak is stopped the way an
operator would stop it (SIGTERM: it stops its daemons and removes its files), then, if that
did not do, every process of its session is SIGKILLed and its directories removed. The
soak's schedule and its verdicts (memory, verification) are plain functions, tested without
processes.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tools.soak.plan import (
    DaemonLife,
    Kind,
    MemorySample,
    Settings,
    judge,
    schedule,
    verification_problems,
)

from .procs import ROOT

USED = {"used", "zero_frame", "shared_frame", "in_transit"}


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies are not counted: they hold nothing)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, _pgrp, session = text.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_until(pred: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Run:
    """A soak process, the directories it said it uses, and what it printed so far."""

    proc: subprocess.Popen[str]
    dirs: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def read_until(self, text: str) -> None:
        """Read its timeline until a line containing ``text`` (it prints as it goes)."""
        assert self.proc.stdout is not None
        while not self.lines or text not in self.lines[-1]:
            self.lines.append(self.proc.stdout.readline())
            assert self.lines[-1], "".join(self.lines)

    def finish(self, timeout: float) -> tuple[str, str]:
        stdout, stderr = self.proc.communicate(timeout=timeout)
        return "".join(self.lines) + stdout, stderr


@contextmanager
def soak(*args: str) -> Iterator[Run]:
    """``python -m tools.soak ARGS`` in its own session; stopped and cleaned up, whatever
    happens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.soak", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run = Run(proc)
    try:
        assert proc.stdout is not None
        run.lines.append(proc.stdout.readline())  # "soak: ... files in TMP and MEM_DIR"
        if " files in " in run.lines[0]:
            run.dirs = [Path(p.strip()) for p in run.lines[0].split(" files in ")[1].split(" and ")]
        yield run
    finally:
        if proc.poll() is None:  # the test failed or timed out first
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in session_members(proc.pid):  # what the soak could not stop
            os.kill(pid, signal.SIGKILL)
        for path in run.dirs:
            shutil.rmtree(path, ignore_errors=True)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def assert_nothing_left(run: Run, report: dict[str, Any] | None) -> None:
    """Every process the soak started is gone, and so are its directories."""
    assert session_members(run.proc.pid) == []
    assert run.dirs, run.lines
    for path in run.dirs:
        assert not path.exists(), path
    if report is not None:
        assert report["processes"], "the report lists the processes started"
        for p in report["processes"]:
            with pytest.raises(ProcessLookupError):
                os.kill(p["pid"], 0)
        assert sorted(report["files"]) == sorted(map(str, run.dirs))


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_a_short_soak_does_everything_once_and_passes(short_tmp: Path) -> None:
    """30 s (about 40 s in all) with three 16 MiB guests on a 24 MiB limit with swap: a
    daemon SIGKILL and takeover in the first half, an agent SIGKILL and restart in the
    second, three frames retired (a random one with vmmem-ctl, one backing a page), pages
    swapped out and in, a check every 2 s and after each kill, every page verified at the
    end, the last daemon's memory judged flat, a clean stop, nothing left behind."""
    out = short_tmp / "soak.json"
    with soak("--seconds", "30", "--seed", "1", "--check-every", "2", "--json", str(out)) as run:
        stdout, stderr = run.finish(timeout=120)
        assert "Traceback" not in stderr, stderr
        assert run.proc.returncode == 0, stdout + stderr
        assert stdout.rstrip().endswith("RESULT: PASS"), stdout
        report = json.loads(out.read_text())
        assert_nothing_left(run, report)
    assert report["passed"] and report["failures"] == []
    timeline = report["timeline"]
    # Every event once at least, the daemon kill before the agent kill.
    events = report["events"]
    assert events[Kind.DAEMON_KILL] == 1 and events[Kind.AGENT_KILL] == 1, events
    assert events[Kind.RETIRE] >= 3, events
    (restart,) = [e for e in timeline if e["kind"] == "daemon"]
    (kill,) = [e for e in timeline if e["kind"] == "agent"]
    assert restart["t"] < kill["t"]
    # The takeover: the guests stalled and carried on; reported with its figures.
    assert restart["takeover_seconds"] > 0 and restart["guest_stall_seconds"] > 0
    assert "took over 3 VMs" in restart["text"] and "check ok" in restart["text"], restart
    # The killed agent's VM was released at once and checked right after.
    assert "reason killed" in kill["text"] and "check ok" in kill["text"], kill
    assert len(report["killed_agents"]) == 1
    picked = [e["picked"] for e in timeline if e["kind"] == "retire"]
    assert {"any", "used"} <= set(picked), picked
    assert USED & set(report["retired_by_kind"]), report["retired_by_kind"]
    # Overcommit: pages went to swap and came back.
    swap = report["swap"]
    assert swap["peak"] > 0 and swap["outs"] > 0 and swap["ins"] > 0, swap
    # Checks: periodic ones (every 2 s, less often on a loaded machine: each waits for the
    # one before), one after each kill, two at the end; all passed.
    checks = report["checks"]
    periodic = sum(e["kind"] == "check" for e in timeline)
    assert periodic >= 2, timeline
    assert checks["run"] == periodic + 4 and checks["ok"] == checks["run"], checks
    assert checks["violations"] == {}
    # Every page every live guest wrote read back, none wrong.
    labels = [vm["vm"] for vm in report["verified"]]
    assert sorted(label.split("#")[0] for label in labels) == ["vm0", "vm1", "vm2"], labels
    assert sum(label.endswith("#2") for label in labels) == 1, labels  # the restarted one
    for vm in report["verified"]:
        v = vm["verify"]
        assert v["mismatches"] == 0 and v["unreachable"] == 0, vm
        assert v["pages_verified"] == vm["pages_written"] > 0, vm
        assert vm["reads"] > 0 and vm["mismatches"] == 0, vm
    # Two daemon processes; the last one, which served the agent kill, judged flat.
    assert len(report["daemons"]) == 2
    assert report["memory"][-1]["judged"], report["memory"]
    assert all(m["flat"] for m in report["memory"]), report["memory"]
    assert "memory directory empty, nothing of ours left in /dev/shm" in stdout


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_soak_that_finds_data_corrupted_fails_naming_it_and_cleans_up(
    short_tmp: Path,
) -> None:
    """Machine memory overwritten behind the guests' backs (as a failing DIMM would):
    the guests' read checks see it, the soak fails at once naming the VM and the
    mismatches, the final verification still runs and reports them, exit 1, and nothing
    is left behind."""
    out = short_tmp / "soak.json"
    with soak("--seconds", "30", "--json", str(out)) as run:
        run.read_until("check ok")  # the soak is under way, and all was well
        mem_dir = run.dirs[1]
        machine = max(mem_dir.iterdir(), key=lambda p: p.stat().st_size)
        with open(machine, "r+b") as f:
            f.write(b"\xa5" * machine.stat().st_size)
        stdout, stderr = run.finish(timeout=100)
        assert "Traceback" not in stderr, stderr
        assert run.proc.returncode == 1, stdout + stderr
        assert stdout.rstrip().endswith("RESULT: FAIL"), stdout
        report = json.loads(out.read_text())
        assert_nothing_left(run, report)
    failures = report["failures"]
    # Seen while the guests ran (their read checks), then again by the final verification.
    assert any(": vm" in f and " mismatches: " in f for f in failures), failures
    assert any(": vm" in f and " mismatches in verification" in f for f in failures), failures
    assert any(vm["verify"]["mismatches"] > 0 for vm in report["verified"]), report["verified"]


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_soak_stopped_with_sigterm_stops_everything_and_removes_its_files() -> None:
    """What the tests' clean-up (and an operator's Ctrl-C or kill) relies on: SIGTERM to the
    soak alone, mid-run, and it stops every process it started and removes its directories
    before it exits (130)."""
    with soak("--seconds", "60") as run:
        run.read_until("check ok")
        assert len(session_members(run.proc.pid)) >= 5  # the soak, a daemon, three agents
        run.proc.send_signal(signal.SIGTERM)
        stdout, stderr = run.finish(timeout=60)
        assert run.proc.returncode == 130, stdout + stderr
        assert "interrupted; stopping everything it started" in stderr
        assert "Traceback" not in stderr, stderr
        assert_nothing_left(run, None)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--minutes", "0"], "--minutes/--seconds"),
        (["--seconds", "5"], "--minutes/--seconds"),
        (["--agents", "0"], "--agents"),
        (["--memory", "2"], "--memory"),
        (["--check-every", "0"], "--check-every"),
        (["--rss-tolerance", "0"], "--rss-tolerance"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    """Refused before anything is started or created (exit 2, no traceback)."""
    res = subprocess.run(
        [sys.executable, "-m", "tools.soak", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert res.returncode == 2, res
    assert res.stdout == ""
    assert res.stderr.startswith(f"soak: {flag}:") and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("seconds", [20.0, 30.0, 300.0, 3600.0])
def test_the_schedule_has_every_event_inside_the_run(seconds: float) -> None:
    """Each kind at least once, none in the warm-up or the last tenth; daemon kills in the
    first half, agent kills in the second (the last daemon is judged over them)."""
    settings = Settings(seconds=seconds, seed=7)
    events = schedule(settings)
    assert events == schedule(settings)  # the seed decides
    assert events != schedule(Settings(seconds=seconds, seed=8))
    for kind in Kind:
        n = sum(e.kind is kind for e in events)
        assert n == settings.count(kind) >= (3 if kind is Kind.RETIRE else 1)
    assert all(settings.warmup <= e.at <= 0.9 * seconds for e in events)
    assert all(e.at < seconds / 2 for e in events if e.kind is Kind.DAEMON_KILL)
    assert all(e.at > seconds / 2 for e in events if e.kind is Kind.AGENT_KILL)
    kills = [e.at for e in events if e.kind is not Kind.RETIRE]
    assert all(b > a for a, b in itertools.pairwise(kills))
    if seconds == 300.0:  # ``make soak MINUTES=5``
        assert settings.count(Kind.DAEMON_KILL) == 3 and settings.count(Kind.AGENT_KILL) == 5
        assert settings.count(Kind.RETIRE) == 20


def life(*samples: tuple[float, float, int]) -> DaemonLife:
    """A daemon ready at 0 s with samples (t, RSS MiB, descriptors)."""
    out = DaemonLife(pid=1, started=0.0, ready=0.0)
    out.samples = [
        MemorySample(t, int(mib * 1024), int(mib * 1024) - 90_000, fds) for t, mib, fds in samples
    ]
    return out


def test_flat_memory_is_judged_per_daemon_from_warm_up_to_the_end() -> None:
    settings = Settings(seconds=300.0, rss_tolerance_mib=8.0)  # warm-up 15 s
    # The warm-up's growth (100 -> 120) does not count; +7.5 after it is within tolerance,
    # and so is a peak in between that came back down.
    flat = judge(life((3, 100, 27), (16, 120, 27), (100, 140, 29), (200, 127.5, 27)), settings)
    assert flat.judged and flat.flat and "+7.5 MiB" in flat.text, flat
    assert "peak 140.0 MiB" in flat.text and "descriptors 27 -> 27" in flat.text
    assert flat.baseline is not None and flat.baseline.t == 16
    exactly = judge(life((16, 120, 27), (200, 128, 27)), settings)
    assert exactly.flat, exactly
    grew = judge(life((16, 120, 27), (200, 128.5, 27)), settings)
    assert grew.judged and not grew.flat and "+8.5 MiB" in grew.text, grew
    leaked_fd = judge(life((16, 120, 27), (200, 120, 28)), settings)
    assert leaked_fd.judged and not leaked_fd.flat and "descriptors 27 -> 28" in leaked_fd.text
    fewer_fds = judge(life((16, 120, 28), (200, 120, 27)), settings)
    assert fewer_fds.flat
    short = judge(life((3, 100, 27), (16, 120, 27), (19, 200, 40)), settings)
    assert not short.judged and short.flat and "too short" in short.text
    never_ready = DaemonLife(pid=2, started=0.0, samples=[MemorySample(30, 1, 1, 1)])
    assert not judge(never_ready, settings).judged


def test_verification_problems_name_each_shortfall() -> None:
    results = {"mismatches": 0, "pages_written": 10, "fault_errors": 0, "pin_violations": 0}
    verify = {"mismatches": 0, "unreachable": 0, "pages_verified": 10}
    assert verification_problems(results, verify) == []
    (one,) = verification_problems(results, {**verify, "mismatches": 1})
    assert "1 mismatches in verification" in one
    (while_running,) = verification_problems({**results, "mismatches": 2}, verify)
    assert "2 while running" in while_running
    bad = verification_problems(
        {**results, "fault_errors": 2, "pin_violations": 1},
        {
            **verify,
            "mismatches": 1,
            "unreachable": 3,
            "pages_verified": 6,
            "unreachable_by_error": {"internal": 3},
        },
    )
    assert len(bad) == 5 and "3 pages unreachable" in bad[1] and "6 pages verified" in bad[2]
    assert "2 faults failed" in bad[3] and "1 pinned pages moved" in bad[4]
