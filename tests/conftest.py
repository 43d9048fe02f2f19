"""Shared fixtures: a short temporary directory for sockets, and no leftover processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths are limited to ~108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vm", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mem_dir(short_tmp: Path) -> Path:
    """Where a test daemon puts its shared-memory files (tmpfs, so the test can list them)."""
    path = Path("/dev/shm") / f"vmmem-test-{os.getpid()}-{short_tmp.name}"
    path.mkdir()
    yield path  # type: ignore[misc]
    shutil.rmtree(path, ignore_errors=True)
