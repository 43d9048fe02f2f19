"""The p2m's 32-bit frame and swap slot numbers (issue 10: at most 24 B of daemon metadata per
guest page): the limit the configuration enforces, the file format that says so, and work on
frames and slots far enough up that their byte offsets pass 2 GiB (frame or slot 2**19 and
above), where a byte offset computed in int32 would wrap silently.

The large hosts cost nothing: machine memory and the swap file are sparse files (only the
pages a test writes take memory or disk), since ``create_reserved`` is replaced by a plain
sparse create here; the reservation it skips is a startup safeguard, not what is tested.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from pydantic import ValidationError

from platform_daemon import machine as machine_mod
from platform_daemon import persist
from platform_daemon.p2m import FLAG_MERGED, FLAG_SHARED
from platform_daemon.persist import P2MFile, P2MHeader, StateError, StateFile
from shared.config import MAX_P2M_NUMBERS, PlatformConfig
from shared.constants import PAGE_SIZE, PageState
from shared.messages import Register
from shared.shm import MappedFile, create_mapped

from . import test_numa_migration as tnm
from . import test_page_sharing as tps
from .procs import BIN
from .test_services_swap import FakeAgent, reclaim, running_platform

MiB = 1 << 20
#: 6 GiB on two nodes: node 1 begins at frame 786,432 (3 GiB), past 2**19 (2 GiB).
BIG_HOST_MIB = 6 << 10
HIGH = 1 << 19


@pytest.fixture
def sparse_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Machine memory as a sparse file: a 6 GiB host whose untouched frames cost nothing."""

    def create_sparse(path: Path, size: int) -> MappedFile:
        return create_mapped(path, size)

    monkeypatch.setattr(machine_mod, "create_reserved", create_sparse)


# ---- the limit and the file format --------------------------------------------------------


def test_config_refuses_more_frames_or_swap_slots_than_32_bits_number(tmp_path: Path) -> None:
    """8 TiB of host memory or of swap is the most (2**31 pages each); a byte more is one
    clear error naming the setting and the reason."""
    limit = MAX_P2M_NUMBERS * PAGE_SIZE
    swap = tmp_path / "swap"
    PlatformConfig(host_memory=limit, swap_file=swap, swap_size=limit)
    with pytest.raises(ValidationError, match=r"host memory of \d+ bytes is more than .*32 bits"):
        PlatformConfig(host_memory=limit + PAGE_SIZE)
    with pytest.raises(ValidationError, match=r"swap size of \d+ bytes is more than .*32 bits"):
        PlatformConfig(swap_file=swap, swap_size=limit + PAGE_SIZE)


@pytest.mark.timeout(30)
def test_daemon_refuses_to_start_on_more_than_8_tib(short_tmp: Path, mem_dir: Path) -> None:
    """From the command line: the daemon exits at once with the reason, and creates no file."""
    proc = subprocess.run(
        [
            str(BIN / "vmmem-platform"),
            "--socket",
            str(short_tmp / "p.sock"),
            "--mem-dir",
            str(mem_dir),
            "--host-memory",
            "9TiB",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode != 0
    assert "32 bits" in proc.stderr + proc.stdout, proc.stderr
    assert list(mem_dir.iterdir()) == [] and not (short_tmp / "p.sock").exists()


@pytest.mark.timeout(30)
def test_files_of_the_previous_format_are_refused_naming_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state or p2m file written by format 2 (64-bit frames and slots) is refused, before
    its arrays are read, with one error that says what to do; format 3 files open."""
    info = Register(name="a", guest_pages=64, vcpus=1)
    header = P2MHeader(vm_id=1, generation=1, guest_pages=64, home_node=0, info=info)
    with monkeypatch.context() as m:
        m.setattr(persist, "FORMAT_VERSION", 2)
        state = StateFile.create(
            tmp_path / "old.state", host_pages=1024, nodes=1, swap_slots=0, swap_path=""
        )
        state.close(unlink=False)
        P2MFile.create(tmp_path / "old.p2m", header).close(unlink=False)
    fresh = r"this daemon reads 3 \(left by another version of the daemon: .*--fresh"
    with pytest.raises(StateError, match=rf"old\.state: state format 2, {fresh}"):
        StateFile.open(tmp_path / "old.state")
    with pytest.raises(StateError, match=rf"old\.p2m: p2m format 2, {fresh}"):
        P2MFile.open(tmp_path / "old.p2m")

    f = P2MFile.create(tmp_path / "new.p2m", header)
    f.p2m.frame[3], f.p2m.swap_slot[4] = MAX_P2M_NUMBERS - 1, MAX_P2M_NUMBERS - 1
    f.close(unlink=False)
    again = P2MFile.open(tmp_path / "new.p2m")
    assert again.p2m.frame[3] == again.p2m.swap_slot[4] == MAX_P2M_NUMBERS - 1
    assert again.p2m.frame.dtype == again.p2m.swap_slot.dtype == np.int32
    again.close(unlink=True)


# ---- per-page state the services no longer keep ---------------------------------------------


@pytest.fixture
def numa(mem_dir: Path, short_tmp: Path) -> Iterator[tnm.Harness]:
    harness = tnm.Harness(mem_dir, short_tmp, vm_rate=1e6, host_rate=1e6)
    try:
        yield harness
    finally:
        harness.close()


@pytest.mark.timeout(30)
def test_numa_migration_queues_a_page_once_with_no_per_page_array(numa: tnm.Harness) -> None:
    """NUMA migration keeps nothing per guest page: the scan checks what it finds against
    its queue. A page a later pass finds again while still queued is not queued twice (the
    queue, bounded, would fill with repeats)."""
    h = numa
    g = h.add_vm()
    h.back(g, list(range(30)), node=1)
    h.scan(g)
    h.scan(g)
    st = h.svc.vms[g.vm.vm_id]
    assert sorted(st.queue) == list(range(30))
    h.back(g, [40, 41], node=1)
    h.scan(g)
    assert sorted(st.queue) == [*range(30), 40, 41]
    arrays = [v for v in vars(st).values() if isinstance(v, np.ndarray)]
    assert arrays == []


@pytest.fixture
def small(mem_dir: Path, short_tmp: Path) -> Iterator[tps.Harness]:
    harness = tps.Harness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


def _numbered(n: int) -> npt.NDArray[np.uint8]:
    """A zero page but for its first 8 bytes: the number ``n``."""
    page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    page[:8] = np.frombuffer(np.uint64(n).tobytes(), np.uint8)
    return page


@pytest.mark.timeout(30)
def test_pages_whose_32_bit_hints_collide_never_share_a_frame(small: tps.Harness) -> None:
    """Page sharing's scan keeps 32 bits of each page's hash. These two pages differ but
    agree in those bits (found by a birthday search): they pair as candidates, and merging,
    which compares the full hash and the bytes, never lets one map the other's frame; both
    read their own bytes at every pass, and no merge counts as "shared"."""
    h = small
    a, b = _numbered(23445), _numbered(81076)
    full = [xxhash.xxh3_64_intdigest(p.tobytes()) for p in (a, b)]
    assert full[0] != full[1] and full[0] & 0xFFFFFFFF == full[1] & 0xFFFFFFFF
    vm = h.add_vm()
    h.back(vm, {0: a, 1: b} | {n: tps.content(900 + n) for n in range(2, 8)})
    handed: list[int] = []
    for _ in range(8):
        h.scan_all(vm)
        handed += h.candidates(vm)
        h.release_candidates(vm)
        assert vm.p2m.frame[0] != vm.p2m.frame[1]
        assert h.read(vm, 0) == a.tobytes() and h.read(vm, 1) == b.tobytes()
    assert set(handed) == {0, 1}, handed  # the collision made them candidates; nothing else
    assert h.merges("shared") == 0 and h.shared.refs[vm.p2m.frame[[0, 1]]].max() <= 1


# ---- frames and slots past 2 GiB ------------------------------------------------------------


@pytest.fixture
def big(
    sparse_machine: None, monkeypatch: pytest.MonkeyPatch, mem_dir: Path, short_tmp: Path
) -> Iterator[tps.Harness]:
    """test_page_sharing's harness on a sparse 6 GiB host."""
    monkeypatch.setattr(tps, "HOST_MIB", BIG_HOST_MIB)
    harness = tps.Harness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


@pytest.mark.timeout(60)
def test_page_sharing_on_frames_past_2_gib(big: tps.Harness) -> None:
    """Pages on frames past 2 GiB are hashed where they are: the duplicates merge, the
    unique pages are never candidates. (Hashed at an int32-wrapped offset, every page read
    as another frame's zeros: all became zero candidates, and no duplicate ever merged.)"""
    h = big
    vm = h.add_vm(home_node=1)
    x = tps.content(7)
    unique = {b: tps.content(700 + b) for b in range(2, 10)}
    frames = h.back(vm, {0: x, 1: x} | unique)
    assert (frames >= HIGH).all() and frames.dtype == np.int64
    handed: list[int] = []
    for _ in range(6):
        h.scan_all(vm)
        handed += h.candidates(vm)
        h.release_candidates(vm)
    assert set(handed) <= {0, 1}, handed
    assert vm.p2m.frame[0] == vm.p2m.frame[1] >= HIGH
    assert (vm.p2m.flags[[0, 1]] == FLAG_SHARED | FLAG_MERGED).all()
    assert h.read(vm, 0) == x.tobytes()
    for b, data in unique.items():
        assert vm.p2m.flags[b] == 0 and h.read(vm, b) == data.tobytes()


@pytest.mark.timeout(120)
async def test_swap_round_trip_past_2_gib_of_frames_and_slots(
    sparse_machine: None, short_tmp: Path, mem_dir: Path
) -> None:
    """A VM on node 1 of a 6 GiB host (frames past 3 GiB) swaps out to slots past 2 GiB of
    a sparse 6 GiB swap file and back: every page reads back what was written, through the
    fault replies, the gather and pwrite, the preadv and the checksums."""
    async with running_platform(
        short_tmp,
        mem_dir,
        host_mib=BIG_HOST_MIB,
        swap_size=BIG_HOST_MIB * MiB,
        numa_nodes=2,
        prefault=False,
        balloon=False,
        allow_beyond_ram=True,
    ) as server:
        assert server.swap is not None
        server.swap.allocate(HIGH + 1000)  # the low slots are taken: this VM's go past 2 GiB
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024, home_node=1)
        written = np.arange(0, 512, dtype=np.int64)
        await agent.write_pages(written)
        vm = server.vms[agent.vm_id]
        assert (vm.p2m.frame[written] >= 3 * HIGH // 2).all()
        server.memsched.set_host_limit(server.machine.allocator.used - 50)
        await reclaim(server, [agent])
        swapped = np.flatnonzero(vm.p2m.state == PageState.SWAPPED)
        assert len(swapped) >= 50
        assert (vm.p2m.swap_slot[swapped] > HIGH).all()
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        reasons = await agent.verify(written)
        assert reasons["SWAP_IN"] >= 1, reasons
        assert not (vm.p2m.state == PageState.SWAPPED).any()
        await agent.close()
