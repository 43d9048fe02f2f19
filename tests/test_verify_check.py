"""The agent's verify reads every page the guest wrote and checks it: the pages already
exposed in one step (``GuestMemory.check_many``), the others one by one after their fault."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from shared.constants import NO_FRAME
from tests.guest_rig import Rig
from vmm_agent.runner import VERIFY_CHUNK

pytestmark = pytest.mark.timeout(30)


def test_check_many_counts_and_names_each_mismatch() -> None:
    """``check_many`` hashes every page it is given: a changed byte in any of them is a
    mismatch, counted and logged with its page and frame, like ``check``."""
    rig = Rig(pages=64)
    guest, frames = rig.guest, rig.frames
    bpns = np.arange(0, 40, dtype=np.int64)
    for bpn in bpns.tolist():
        guest.write(frames, 63 - bpn, bpn, kind=2, pick=0)  # page b in frame 63 - b
    mpns = 63 - bpns
    assert guest.check_many(frames, mpns, bpns) == 0
    frames[63 - 17, 5] ^= 1
    frames[63 - 39, 4095] ^= 0x80
    assert guest.check_many(frames, mpns, bpns) == 2
    assert guest.mismatches == 2 and guest.verified == 80
    assert [(e["bpn"], e["frame"]) for e in guest.mismatch_log] == [(17, 46), (39, 24)]


@pytest.mark.timeout(30)
async def test_verify_finds_a_changed_page_exposed_or_faulted_in() -> None:
    """After a write phase, one exposed page and one page the VMM no longer maps have
    their bytes changed: verify reads every written page and reports both mismatches."""
    rig = Rig(pages=128)
    await rig.run(duration=0.2, working_set=0.5, write_ratio=1.0)
    written = rig.guest.written_pages()
    assert len(written) > 8
    exposed, unmapped = int(written[1]), int(written[-2])
    rig.frames[int(rig.exposure.frame[exposed]), 7] ^= 0xFF
    rig.frames[int(rig.exposure.frame[unmapped]), 9] ^= 0xFF
    rig.faults.unmap(unmapped)  # the fake daemon still backs it: its fault maps it back
    assert rig.exposure.frame[unmapped] == NO_FRAME
    result = await rig.runner.verify()
    assert result["pages_verified"] == len(written)
    assert result["mismatches"] == 2 and result["unreachable"] == 0
    assert sorted(e["bpn"] for e in rig.guest.mismatch_log) == sorted([exposed, unmapped])


async def _written_and_released(around: int = 0) -> tuple[Rig, Any]:
    """A guest that wrote more than two verify chunks' pages, none of them exposed now:
    verify must fault every one back in (``around``: the fake daemon's fault-around)."""
    rig = Rig(pages=2048)
    rig.daemon.around = around
    await rig.run(duration=0.3, working_set=1.0, write_ratio=1.0)
    written = rig.guest.written_pages()
    assert len(written) > 2 * VERIFY_CHUNK
    for bpn in written.tolist():
        rig.faults.unmap(bpn)
    return rig, written


@pytest.mark.timeout(30)
async def test_verify_sends_the_next_chunks_faults_before_checking_this_one() -> None:
    """Verify's faults for a chunk go out before the chunk before it is waited for and
    checked (the daemon serves them meanwhile, as Linux's asynchronous read-ahead), and
    every page still reads back."""
    # The daemon's fault-around, as a swap-in's read-ahead.
    rig, written = await _written_and_released(around=64)
    seen: list[tuple[int, int]] = []  # (page faulted, pages checked so far)
    request = rig.daemon.request

    async def recording(msg: Any) -> Any:
        seen.append((msg.bpn, rig.guest.verified))
        return await request(msg)

    rig.daemon.request = recording  # type: ignore[method-assign]
    before = rig.guest.verified
    result = await rig.runner.verify()
    assert result["mismatches"] == 0 and result["pages_verified"] == len(written)
    second = int(written[VERIFY_CHUNK])  # the first page of the second chunk
    checked = next(v for b, v in seen if b >= second) - before
    assert checked == 0, f"the second chunk's first fault went out after {checked} checks"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("at", [1, 4, 5, 8])
async def test_verify_cancelled_at_any_fault_leaves_no_fault_behind(at: int) -> None:
    """Cancelled from inside its ``at``-th fault (while the first chunk's faults are being
    sent, once they are out, while the next chunk's are being sent, once both are out),
    verify leaves no task running."""
    rig, _ = await _written_and_released()
    rig.daemon.hold = asyncio.Event()  # faults wait in the daemon
    n = len(rig.daemon.faults)
    request = rig.daemon.request
    verify: asyncio.Future[Any] | None = None

    async def cancelling(msg: Any) -> Any:
        if len(rig.daemon.faults) + 1 - n == at:
            assert verify is not None
            verify.cancel()
        return await request(msg)

    rig.daemon.request = cancelling  # type: ignore[method-assign]
    verify = asyncio.ensure_future(rig.runner.verify())
    with pytest.raises(asyncio.CancelledError):
        await verify
    for _ in range(10):
        await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == [], others
