"""vmmem-load's progress (issue 11, load generator): on a terminal, a live table per VM with
phase, accesses/s, faults/s and swap (rich); plain lines when the output is not a terminal,
as before. A real run each way, on a real daemon and two 16 MiB guests; the terminal is a
real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from vmm_agent.load.progress import Progress

from .procs import BIN, daemons, run_load

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_on_a_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """vmmem-load with stdout and stderr on a pseudo-terminal; its exit status and output."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [str(BIN / "vmmem-load"), *args], stdout=slave, stderr=slave, stdin=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, "vmmem-load did not finish"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal's other side closed: the process is done
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(10), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.timeout(60)
def test_live_table_on_a_terminal_plain_lines_otherwise(short_tmp: Path, mem_dir: Path) -> None:
    """On a terminal: a table with a row per VM and the rate columns. Piped: plain progress
    lines, no escape sequences, no table."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        common = ["--socket", str(d.socket), "--expect-vms", "2", "--duration", "2"]
        code, out = _run_on_a_terminal(common, timeout=40)
        assert code == 0, out
        text = ANSI.sub("", out)
        for head in ("accesses/s", "faults/s", "swap out", "swap in", "mismatches"):
            assert head in text, text
        rows = re.findall(r"[│|] (a|b) +[│|] basic +[│|] +[\d,—]+ [│|]", text)
        assert set(rows) == {"a", "b"}, text  # a row per VM, with its phase and a rate
        assert re.search(r"basic: \d+\.\d s left", text), text
        assert "verification" in text and "OK" in text  # the report follows the table
        piped = run_load(*common, timeout=40)
        assert piped.returncode == 0, piped.stderr
        assert re.search(r"^\[basic\s*\] +\d+\.\d+s left  accesses", piped.stderr, re.M)
        assert "\x1b[" not in piped.stderr + piped.stdout and "accesses/s" not in piped.stderr


@pytest.mark.timeout(5)
def test_rates_are_per_second_since_the_last_update() -> None:
    """A row's accesses/s and faults/s are the change since the previous update over the
    time between them; swap comes from the daemon's status; no status: a dash."""
    p = Progress(enabled=True, tty=False)
    first = [{"vm": "a", "phase": "x", "reads": 100, "writes": 0, "faults": 10, "mismatches": 0}]
    assert p.rows(first, None, now=10.0)[0][2:6] == ["—", "—", "—", "—"]
    later = [{"vm": "a", "phase": "x", "reads": 300, "writes": 100, "faults": 30, "mismatches": 0}]
    status = {"vms": [{"name": "a", "stats": {"swapped_out": 1234, "swapped_in": 5}}]}
    assert p.rows(later, status, now=12.0)[0] == ["a", "x", "150", "10", "1,234", "5", "0"]
