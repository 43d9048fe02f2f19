"""Machine memory that cannot be had is refused at startup, clearly; an interrupted startup
leaves nothing behind. Real daemon processes; sizes are taken from this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .procs import BIN

pytestmark = pytest.mark.e2e
GiB = 1 << 30


def platform(tmp: Path, mem_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "vmmem-platform"),
            "--socket",
            str(tmp / "p.sock"),
            "--mem-dir",
            str(mem_dir),
            "--metrics-port",
            "-1",
            "--log-format",
            "json",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.timeout(60)
def test_machine_memory_the_directory_cannot_hold_is_refused(
    short_tmp: Path, mem_dir: Path
) -> None:
    st = os.statvfs(mem_dir)
    size = st.f_bavail * st.f_frsize + GiB
    extra = ["--allow-beyond-ram"] if size > ram() else []
    proc = platform(short_tmp, mem_dir, "--host-memory", str(size), "--no-prefault", *extra)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert f"machine memory of {size} bytes does not fit in {mem_dir}" in out
    assert "Traceback" not in out
    assert list(mem_dir.iterdir()) == []


@pytest.mark.timeout(60)
def test_machine_memory_beyond_ram_needs_a_flag(short_tmp: Path, mem_dir: Path) -> None:
    size = ram() + GiB
    proc = platform(short_tmp, mem_dir, "--host-memory", str(size))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "more than this machine's RAM" in out and "--allow-beyond-ram" in out
    assert list(mem_dir.iterdir()) == []


@pytest.mark.timeout(60)
def test_sigterm_during_prefault_removes_what_startup_created(
    short_tmp: Path, mem_dir: Path
) -> None:
    """2 GiB of machine memory takes a while to reserve and prefault: a SIGTERM as soon as
    its file exists lands in startup, and startup removes what it created."""
    proc = platform(short_tmp, mem_dir, "--host-memory", "2GiB")
    deadline = time.monotonic() + 20
    while not any(p.name.endswith(".machine") for p in mem_dir.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "interrupted while starting" in out
    assert "platform_started" not in out  # it was startup that was interrupted
    assert list(mem_dir.iterdir()) == []
    assert not (short_tmp / "p.sock").exists()
