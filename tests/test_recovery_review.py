"""Review of daemon crash recovery: cuts the operations can leave that the takeover got wrong.

Each test writes the state files exactly as a SIGKILL between two stores leaves them (as
``test_recovery.py`` does) and checks what the next daemon makes of them, or drives the
agent's link the way a dying connection does. Every test here failed before its fix, or
names a cut that is still open (see the docstring).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.p2m import P2M
from platform_daemon.persist import P2MFile, P2MHeader, StateError, StateFile, StatePaths
from platform_daemon.recovery import open_p2ms, open_state, reconcile
from platform_daemon.server import PlatformServer
from shared.config import PlatformConfig
from shared.constants import NO_FRAME, PAGE_SIZE, PageState
from shared.messages import Register
from vmm_agent.exposure import ExposureTable
from vmm_agent.fault_path import FaultPath
from vmm_agent.link import PlatformLink
from vmm_agent.rpc import RpcClient

HOST_PAGES = 2048
SLOTS = 64
ZERO = [0, 1024]
GUEST = 32
USED, FREE = int(FrameState.USED), int(FrameState.FREE)


class Host:
    """A state file and VMs' p2m files as a daemon leaves them, before reconciliation."""

    def __init__(self, tmp: Path) -> None:
        self.paths = StatePaths(tmp, "rv")
        self.state = StateFile.create(
            self.paths.state, host_pages=HOST_PAGES, nodes=2, swap_slots=SLOTS, swap_path="s"
        )
        self.state.header.zero_frames = list(ZERO)
        self.state.write_header()
        self.state.frame_state[ZERO] = USED
        self.files: list[P2MFile] = []

    def vm(self, vm_id: int) -> P2M:
        info = Register(name=f"vm{vm_id}", guest_pages=GUEST, vcpus=1, pid=1000 + vm_id)
        f = P2MFile.create(self.paths.p2m(vm_id), P2MHeader(vm_id, vm_id, GUEST, 0, info))
        self.paths.region(vm_id).write_bytes(b"r")
        self.files.append(f)
        return f.p2m

    def map(self, p2m: P2M, bpn: int, frame: int, flags: int = 0) -> None:
        p2m.frame[bpn] = frame
        p2m.state[bpn] = PageState.EXPOSED
        p2m.flags[bpn] = flags
        self.state.frame_state[frame] = USED

    def swapped(self, p2m: P2M, bpn: int, slot: int) -> None:
        p2m.state[bpn] = PageState.SWAPPED
        p2m.swap_slot[bpn] = slot
        self.state.swap_checksum[slot] = 0xC0FFEE + slot

    def close(self) -> None:
        for f in self.files:
            f.close(unlink=False)
        self.files = []
        if self.state.frame_state is not None:
            self.state.close(unlink=False)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def _config(tmp: Path, **kw: Any) -> PlatformConfig:
    base: dict[str, Any] = {
        "socket": tmp / "p.sock",
        "mem_dir": tmp,
        "host_memory": HOST_PAGES * PAGE_SIZE,
        "metrics_port": -1,
    }
    return PlatformConfig(**{**base, **kw})


class _Killed(BaseException):
    """Stands for the SIGKILL: nothing after it runs."""


class _KillOnStore:
    """An mmap stand-in that lets ``allowed`` slice stores through, then 'kills' the daemon."""

    def __init__(self, mm: Any, allowed: int) -> None:
        self._mm, self._left = mm, allowed

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._left == 0:
            raise _Killed
        self._left -= 1
        self._mm[key] = value

    def __getitem__(self, key: Any) -> Any:
        return self._mm[key]

    def __len__(self) -> int:
        return len(self._mm)


# ---- headers -----------------------------------------------------------------------------


def test_a_state_header_write_cut_after_its_first_store_is_still_readable(host: Host) -> None:
    """The state header is rewritten on every registration (two counters), host-limit change
    and zero-frame retirement. A daemon killed after the first store of such a rewrite must
    leave a header the next daemon can read (the old one or the new one), not a checksum
    mismatch that refuses the takeover of every VM on the host."""
    real = host.state.mapped.mm
    host.state.mapped.mm = _KillOnStore(real, allowed=1)  # type: ignore[assignment]
    host.state.header.next_vm_id += 1
    try:
        host.state.write_header()
    except _Killed:
        pass
    finally:
        host.state.mapped.mm = real
    host.close()
    reopened = StateFile.open(host.paths.state)  # raised "header checksum mismatch"
    try:
        assert reopened.header.zero_frames == ZERO
    finally:
        reopened.close(unlink=False)


def test_a_p2m_header_write_cut_after_its_first_store_is_still_readable(host: Host) -> None:
    """Each takeover rewrites every VM's p2m header (a new generation): the same cut there
    refused the next takeover ("header checksum mismatch") with every VM's memory in it."""
    host.vm(1)
    f = host.files[0]
    real = f.mapped.mm
    f.mapped.mm = _KillOnStore(real, allowed=1)  # type: ignore[assignment]
    f.header.generation += 1
    try:
        f.write_header()
    except _Killed:
        pass
    finally:
        f.mapped.mm = real
    host.close()
    files = open_p2ms(host.paths)
    try:
        assert [g.header.vm_id for g in files] == [1]
    finally:
        for g in files:
            g.close(unlink=False)


def test_a_registration_cut_before_its_p2m_header_does_not_refuse_the_takeover(
    host: Host,
) -> None:
    """``P2MFile.create`` maps a zero-filled file, resets the arrays, then writes the header.
    A daemon killed in between leaves a p2m file with no header, for a VM whose agent never
    got its Registered. Refusing it ("not a VMMem p2m file") refused the whole takeover: every
    other VM on the host was lost. It is a registration that never happened: removed."""
    keep = host.vm(1)
    host.map(keep, 0, 10)
    cut = host.paths.p2m(2)
    cut.write_bytes(bytes(P2MFile.size(GUEST)))  # sized, all zeros: frame 0 everywhere
    files = open_p2ms(host.paths)
    try:
        assert [f.header.vm_id for f in files] == [1]
    finally:
        for f in files:
            f.close(unlink=False)
    assert not cut.exists()


def test_fresh_on_a_live_daemons_files_is_refused_and_removes_nothing(host: Host) -> None:
    """``--fresh`` (or leftovers) on a socket whose daemon is alive but not listening yet:
    the state file's lock refuses it before anything is removed."""
    cfg = _config(host.paths.mem_dir, fresh=True)
    paths = StatePaths.for_socket(host.paths.mem_dir, cfg.socket)
    live = StateFile.create(paths.state, host_pages=HOST_PAGES, nodes=2, swap_slots=0, swap_path="")
    try:
        paths.machine.write_bytes(b"live")
        with pytest.raises(StateError, match="held by a running daemon"):
            open_state(cfg, paths)
        assert paths.state.exists() and paths.machine.exists()
    finally:
        live.close(unlink=True)
        paths.machine.unlink()


def test_state_files_that_do_not_add_up_are_refused_by_name(host: Host) -> None:
    """A state or p2m file of the wrong size, a p2m file named after another VM, a machine
    file that is gone: refused, naming the file, before anything is adopted."""
    host.vm(1)
    host.close()
    p2m = host.paths.p2m(1)
    p2m.rename(host.paths.p2m(7))
    with pytest.raises(StateError, match="header names VM 1"):
        open_p2ms(host.paths)
    host.paths.p2m(7).rename(p2m)
    with p2m.open("ab") as f:
        f.write(bytes(PAGE_SIZE))
    with pytest.raises(StateError, match="size does not match"):
        open_p2ms(host.paths)
    with host.paths.state.open("ab") as f:
        f.write(bytes(PAGE_SIZE))
    with pytest.raises(StateError, match="its header says"):
        StateFile.open(host.paths.state)


def test_a_state_whose_machine_memory_is_gone_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    paths = StatePaths.for_socket(tmp_path, cfg.socket)
    state, _ = open_state(cfg, paths)
    state.header.zero_frames = list(ZERO)
    state.write_header()
    state.close(unlink=False)
    with pytest.raises(StateError, match="is gone: the guests' memory cannot be recovered"):
        open_state(cfg, paths)
    assert paths.state.exists()
    paths.remove_all()


# ---- a daemon killed while it was starting -----------------------------------------------


def test_a_state_file_from_a_startup_cut_before_the_zero_frames_is_not_taken_over(
    tmp_path: Path,
) -> None:
    """The state file is created before machine memory (reserved and prefaulted: seconds for
    gigabytes); the zero frames are written to its header only after. A daemon SIGKILLed
    in between left a state file whose zero frames read back as NO_FRAME (-1): the next
    daemon "took it over", marked the last frame of the host as a zero frame and served read
    faults with frame -1. No VM can exist yet: it is a daemon that died while starting."""
    cfg = _config(tmp_path)
    paths = StatePaths.for_socket(tmp_path, cfg.socket)
    state, _ = open_state(cfg, paths)
    size = len(state.mapped.mm)
    state.close(unlink=False)  # killed before the zero frames were chosen
    paths.machine.write_bytes(b"half")  # machine memory being reserved
    state, recovered = open_state(cfg, paths)
    try:
        assert not recovered
        assert not paths.machine.exists()
        assert state.header.generation == 1
    finally:
        state.close(unlink=True)
    # Killed even earlier, before the state file had a header at all.
    paths.state.write_bytes(bytes(size))
    state, recovered = open_state(cfg, paths)
    assert not recovered
    state.close(unlink=True)


# ---- a VM released while the daemon died -------------------------------------------------


def test_a_vm_cut_while_its_frames_were_being_cleared_does_not_come_back_empty(
    host: Host,
) -> None:
    """``on_vm_gone`` frees the frames and slots, clears ``p2m.frame``, then ``p2m.swap_slot``,
    and only then removes the p2m file. A daemon killed after the frames were cleared left
    pages that say EXPOSED with no frame: reconcile made them ZERO and the VM came back,
    so an agent that is still alive (a clean stop killed mid-way, a protocol error) resumed
    it with its memory silently zero and its mappings on frames now free for other VMs.
    A VM cut mid-release must not be offered for resume."""
    other = host.vm(1)
    host.map(other, 0, 10)
    p = host.vm(2)
    host.map(p, 0, 20)
    host.map(p, 1, 21)
    p.state[1] = PageState.RESIDENT
    # The cut: frames released, then the p2m's frames cleared.
    host.state.frame_state[[20, 21]] = FREE
    p.frame[:] = NO_FRAME
    out = reconcile(host.state, host.files)
    assert [f.header.vm_id for f in out.files] == [1]
    assert out.vms_released == 1
    assert not host.paths.p2m(2).exists() and not host.paths.region(2).exists()
    assert out.swap_slots_in_use.tolist() == []
    assert host.state.frame_state[20] == FREE
    assert host.state.frame_state[10] == USED


def test_a_vm_cut_after_its_swap_slots_were_released_does_not_come_back(host: Host) -> None:
    """Cut earlier in ``on_vm_gone``: frames freed (reconcile recounts them), swap slots
    released, so their checksums are zero, but the p2m still names them. The VM came back
    and every read of a swapped page failed its checksum (reported as a corrupt page)."""
    p = host.vm(1)
    host.map(p, 0, 20)
    host.swapped(p, 1, 5)
    host.state.frame_state[20] = FREE
    host.state.swap_checksum[5] = 0  # SwapFile.release
    out = reconcile(host.state, host.files)
    assert out.files == []
    assert host.state.frame_state[20] == FREE
    assert out.swap_slots_in_use.tolist() == []


# ---- the agent's link --------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_a_fault_started_while_the_connection_is_closing_waits_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """When the daemon dies, the transport sees EOF and is closing one loop iteration before
    ``connection_lost`` resolves ``closed``; every running vCPU gets a step in that window
    (measured with both the standard loop and uvloop). A fault sent then fails at once,
    ``wait_up`` found the link still up, and the fault path retried without ever yielding:
    the agent hung at 100 % CPU and never resumed. A watchdog thread breaks the spin."""
    path = tmp_path / "s"
    peers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_unix_server(lambda r, w: peers.append(w), str(path))
    client = await RpcClient.connect(str(path))
    link = PlatformLink()
    link.attach(client)
    faults = FaultPath(link, ExposureTable(16), max_outstanding=4, around=0)
    rescued = threading.Event()
    vcpu = asyncio.ensure_future(faults.ensure(5, write=False))  # a vCPU ready to run

    def watchdog() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if vcpu.done() or link.client is None:
                return
            time.sleep(0.01)
        rescued.set()
        link.client = None  # breaks the spin: the next send fails and the wait blocks
        link._up.clear()

    assert client.transport is not None
    client.transport.close()  # as after EOF: closing, connection_lost still to come
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        await asyncio.sleep(0.2)
        assert not rescued.is_set(), "the fault path spun without yielding"
        assert not link.up and not vcpu.done()  # it waits for the next daemon
    finally:
        vcpu.cancel()
        for peer in peers:
            peer.close()
        server.close()
        await server.wait_closed()
    await asyncio.gather(vcpu, return_exceptions=True)
    await asyncio.sleep(0)  # the peers' transports finish closing


# ---- takeovers in process (server-side findings, not fixed here) -------------------------


class _Conn:
    """Stands for an agent's connection in ``Registry.register`` (nothing is sent)."""

    vm: Any = None

    def send(self, message: Any, request_id: int = 0) -> None:
        pass


def _daemon_config(short_tmp: Path, mem_dir: Path, **kw: Any) -> PlatformConfig:
    base: dict[str, Any] = {
        "socket": short_tmp / "p.sock",
        "mem_dir": mem_dir,
        "host_memory": 8 << 20,
        "metrics_port": -1,
        "prefault": False,
        "log_level": "warning",
    }
    return PlatformConfig(**{**base, **kw})


def _crash(server: PlatformServer) -> None:
    """What a SIGKILL leaves: every file as it is, every lock released."""
    server._close_files(unlink=False)


def _first_daemon(cfg: PlatformConfig) -> tuple[PlatformServer, Register, Any]:
    server = PlatformServer(cfg)
    info = Register(name="g", guest_pages=64, vcpus=1, pid=4242)
    registered = server.registry.register(_Conn(), info)  # type: ignore[arg-type]
    return server, info, registered


def test_a_daemon_without_swap_takes_over_its_vms(short_tmp: Path, mem_dir: Path) -> None:
    """No swap file: no slots, an empty checksum array (the release check indexed it)."""
    cfg = _daemon_config(short_tmp, mem_dir)
    server, _, registered = _first_daemon(cfg)
    vm = server.vms[registered.vm_id]
    server.faults.try_resolve(vm, 3, True, 0)
    _crash(server)
    second = PlatformServer(cfg)
    try:
        assert second.recovered
        assert second.vms[registered.vm_id].detached
        assert second.vms[registered.vm_id].p2m.state[3] == PageState.EXPOSED
    finally:
        second._close_files(unlink=True)


def test_a_vm_survives_two_takeovers_before_its_agent_is_back(
    short_tmp: Path, mem_dir: Path
) -> None:
    """``_take_over`` writes the VM's new generation into its p2m header at once and keeps
    the old one as what the agent must present. A daemon that dies again before the agent
    resumed (a crash loop; an agent still in its 250 ms backoff) leaves the header with a
    generation the agent was never given: the next daemon asks the agent for it, refuses
    its resume ("did not take it over"), and the VM is lost with its memory."""
    cfg = _daemon_config(short_tmp, mem_dir)
    server, info, registered = _first_daemon(cfg)
    _crash(server)
    _crash(PlatformServer(cfg))  # taken over, and killed again before the agent came back
    third = PlatformServer(cfg)
    try:
        resume = info.model_copy(
            update={"resume_vm_id": registered.vm_id, "resume_generation": registered.generation}
        )
        third.registry.register(_Conn(), resume)  # type: ignore[arg-type]
    finally:
        third._close_files(unlink=True)


async def test_a_failing_frame_stays_failing_when_the_takeover_is_cut_while_retiring_it(
    short_tmp: Path, mem_dir: Path
) -> None:
    """``startup`` clears ``failing[mpn]`` and then calls ``retire_frame(mpn)`` (which
    refuses a frame already failing). Killed between the two stores, the mark is gone from
    the state file: the next daemon hands the failing frame out again."""
    cfg = _daemon_config(short_tmp, mem_dir)
    server, _, registered = _first_daemon(cfg)
    vm = server.vms[registered.vm_id]
    reply = server.faults.try_resolve(vm, 3, True, 0)
    mpn = int(reply.mpns[0])
    server.retire_frame(mpn)  # a private page's frame: marked failing, the page queued
    assert server.machine.failing[mpn]
    _crash(server)
    second = PlatformServer(cfg)

    def killed(mpn: int, again: bool = False) -> dict[str, Any]:
        raise _Killed

    second.retire_frame = killed  # type: ignore[method-assign]
    try:
        with pytest.raises(_Killed):
            await second.startup()
        assert second.state.failing[mpn], "the failing mark was lost"
    finally:
        await second.shutdown()


async def test_a_takeover_whose_startup_fails_keeps_the_crashed_daemons_files(
    short_tmp: Path, mem_dir: Path
) -> None:
    """``serve`` runs ``shutdown`` when ``startup`` fails, and shutdown releases every VM
    and removes every file. A daemon that took over and then could not start (its metrics
    port taken by another process, a socket path refused) destroyed the crashed daemon's
    VMs, which a second attempt with a free port would have recovered."""
    import socket as socket_mod

    server, _, registered = _first_daemon(_daemon_config(short_tmp, mem_dir))
    _crash(server)
    with socket_mod.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = _daemon_config(short_tmp, mem_dir, metrics_port=busy.getsockname()[1])
        second = PlatformServer(cfg)
        assert second.recovered
        with pytest.raises(OSError):
            await second.serve()
    paths = StatePaths.for_socket(mem_dir, cfg.socket)
    try:
        assert paths.state.exists() and paths.p2m(registered.vm_id).exists()
    finally:
        paths.remove_all()


# ---- an agent frozen through the takeover (end to end) -----------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_an_agent_frozen_through_the_takeover_keeps_its_memory_until_it_runs_again(
    short_tmp: Path, mem_dir: Path
) -> None:
    """An agent SIGSTOPped while its daemon is killed and replaced (a debugger, a host under
    pressure) still maps its frames writable: on SIGCONT its vCPUs run a few steps on those
    mappings before they notice the daemon changed. So the new daemon keeps the VM of a
    running agent past ``--reattach-seconds`` (it says so), and another VM started
    meanwhile never gets its frames; on SIGCONT the agent resumes (or exits, if its own
    reconnect window ran out), and neither VM's memory is damaged. (Found by review: the
    frozen agent used to be released, and wrote into the next VM's pages.)"""
    import json
    import signal as sig

    from .procs import ctl, daemons

    def progress(name: str) -> dict[str, Any]:
        return asyncio.run(ctl(d.control_socket(name), "progress"))  # type: ignore[no-any-return]

    def wait(pred: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def logged(name: str, event: str) -> bool:
        text = (short_tmp / f"{name}.log").read_text()
        return any(json.loads(x).get("event") == event for x in text.splitlines() if event in x)

    phase = {"name": "p", "duration": 60.0, "working_set": 1.0, "write_ratio": 0.5}
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "48MiB")
        a = d.start_agent("a", memory="16MiB", vcpus=2)
        asyncio.run(ctl(d.control_socket("a"), "run_phase", phase=phase))
        wait(lambda: progress("a")["exposed"] >= 3500, "a's guest to map its memory")
        a.send_signal(sig.SIGSTOP)
        assert d.platform is not None
        d.platform.send_signal(sig.SIGKILL)
        d.platform.wait(10)
        d.start_platform("--host-memory", "48MiB", "--reattach-seconds", "1", log="platform2")
        wait(lambda: logged("platform2", "vm_kept_agent_running"), "a kept: its agent runs")
        d.start_agent("b", memory="16MiB", vcpus=2)
        fill = {**phase, "distribution": "sequential", "write_ratio": 1.0}
        asyncio.run(ctl(d.control_socket("b"), "run_phase", phase=fill))
        wait(lambda: progress("b")["touched"] >= 4096, "b to write all its pages")
        assert not logged("platform2", "vm_released"), "a frozen agent's VM was released"
        a.send_signal(sig.SIGCONT)
        wait(lambda: a.poll() is not None or logged("a", "platform_resumed"), "a to resume or exit")
        asyncio.run(ctl(d.control_socket("b"), "halt"))
        v = asyncio.run(ctl(d.control_socket("b"), "verify"))
        assert v["mismatches"] == 0, v
        if a.poll() is None:  # resumed: its memory is whole too
            asyncio.run(ctl(d.control_socket("a"), "halt"))
            v = asyncio.run(ctl(d.control_socket("a"), "verify"))
            assert v["mismatches"] == 0 and v["unreachable"] == 0, v
        else:
            del d.agents["a"]
            wait(lambda: logged("platform2", "vm_not_resumed"), "a released once it exited")


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_vm_whose_agent_exited_is_released_without_waiting_for_the_window(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Killed while no daemon ran, an agent never comes back: the new daemon releases its VM
    as soon as it sees the process gone, not after ``--reattach-seconds`` (here 300)."""
    import json
    import signal as sig

    from .procs import daemons

    def released() -> list[dict[str, Any]]:
        text = (short_tmp / "platform2.log").read_text()
        return [e for x in text.splitlines() if (e := json.loads(x))["event"] == "vm_not_resumed"]

    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "32MiB")
        a = d.start_agent("a", memory="16MiB")
        assert d.platform is not None
        d.platform.send_signal(sig.SIGKILL)
        d.platform.wait(10)
        a.send_signal(sig.SIGKILL)
        a.wait(10)
        del d.agents["a"]
        d.start_platform("--host-memory", "32MiB", "--reattach-seconds", "300", log="platform2")
        deadline = time.monotonic() + 30
        while not released():
            assert time.monotonic() < deadline, "the dead agent's VM was not released"
            time.sleep(0.05)
        assert released()[0]["agent"] == "exited"
