"""The swap read-ahead window: it starts at the fault's fault-around, doubles while the guest
keeps faulting just past it, up to ``swap_readahead_max``; a random fault resets it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from platform_daemon.metrics import PlatformMetrics
from platform_daemon.services.swap import SwapService
from shared.config import PlatformConfig


def _service(tmp: Path, cap: int) -> SwapService:
    config = PlatformConfig(
        socket=tmp / "p.sock", host_memory=16 << 20, metrics_port=-1, swap_readahead_max=cap
    )
    ctx: Any = SimpleNamespace(config=config, metrics=PlatformMetrics(CollectorRegistry()))
    return SwapService(ctx)


VM1: Any = SimpleNamespace(vm_id=1, guest_pages=1 << 20)
VM2: Any = SimpleNamespace(vm_id=2, guest_pages=1 << 20)


@pytest.mark.timeout(10)
def test_a_walk_doubles_the_window_up_to_the_cap(tmp_path: Path) -> None:
    svc = _service(tmp_path, 64)
    windows, bpn = [], 100
    for _ in range(5):
        w = svc._window(VM1, bpn, 16)
        windows.append(w)
        bpn += 1 + w  # the guest's next fault: the first page past the window
    assert windows == [16, 32, 64, 64, 64]


@pytest.mark.timeout(10)
def test_a_fault_off_the_stream_or_without_fault_around_resets_it(tmp_path: Path) -> None:
    svc = _service(tmp_path, 64)
    assert svc._window(VM1, 100, 16) == 16
    assert svc._window(VM1, 117, 16) == 32
    assert svc._window(VM1, 117, 16) == 32  # the same fault again: the same window
    assert svc._window(VM1, 5000, 16) == 16  # elsewhere: a new stream
    assert svc._window(VM1, 5017, 16) == 32
    assert svc._window(VM1, 5050, 0) == 0  # a random access reads its own page only
    assert svc._window(VM1, 5051, 16) == 16
    assert svc._window(VM2, 5068, 16) == 16  # streams are per VM
    assert svc._window(VM1, 5068, 16) == 32


@pytest.mark.timeout(10)
def test_the_cap_bounds_even_the_first_window(tmp_path: Path) -> None:
    svc = _service(tmp_path, 8)
    assert svc._window(VM1, 0, 16) == 8
    assert svc._window(VM1, 9, 16) == 8
    assert _service(tmp_path, 0)._window(VM1, 0, 16) == 0
