"""Only the owner gets in: no window at socket creation, peer credentials, foreign paths.

Other users are real: as root, a forked child becomes ``nobody`` (uid 65534) with
``os.setuid`` and connects like any local user would. The window at creation is observed
from inside the process that creates the socket: an audit hook (``sys.addaudithook``) looks at
the socket file at every audited step after ``bind()`` (the ``chmod`` of the old code is one),
so a moment where another user could connect is seen deterministically, not by luck.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.codec import Codec
from shared.config import AgentConfig
from shared.errors import ErrorCode
from shared.messages import CtlReply, CtlRequest, Error
from tests.procs import BIN, Daemons, ctl, daemons
from tests.test_services_swap import running_platform
from vmm_agent.agent import Agent

NOBODY = 65534
pytestmark = pytest.mark.skipif(
    os.getuid() != 0, reason="acting as another user (setuid to nobody) needs root"
)


# ---- another user, for real ----------------------------------------------------------------


def as_user(uid: int, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``action`` in a forked child that has become ``uid`` (groups dropped); return the
    dict it returned, plus the child's pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = action()
        except BaseException as exc:  # reported to the parent, which fails the test
            out = {"error": repr(exc)}
        try:
            os.write(w, json.dumps({**out, "pid": os.getpid()}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result
    return result


def ctl_request(path: Path, op: str, **args: Any) -> Callable[[], dict[str, Any]]:
    """An action: connect to ``path``, send one CtlRequest, report what came back."""

    def action() -> dict[str, Any]:
        codec = Codec()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            try:
                s.connect(str(path))
            except PermissionError:
                return {"connected": False}
            s.sendall(codec.send(CtlRequest(op=op, args=args), 1))
            while (env := codec.next_event()) is None:
                data = s.recv(65536)
                if not data:
                    return {"connected": True, "reply": None}
                codec.receive_data(data)
            assert isinstance(env.message, Error | CtlReply), env
            reply = {"type": type(env.message).__name__, **env.message.model_dump()}
            if isinstance(env.message, CtlReply):  # served: the connection stays open
                return {"connected": True, "reply": reply, "closed": False}
            try:
                closed = s.recv(65536) == b""
            except TimeoutError:
                closed = False
            return {"connected": True, "reply": reply, "closed": closed}

    return action


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def wait_for_event(path: Path, event: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (found := log_events(path, event)):
        assert time.monotonic() < deadline, f"no {event} in {path.name}"
        time.sleep(0.02)
    return found


def assert_refused(result: dict[str, Any]) -> None:
    """The peer connected, got one Error saying why, and was disconnected."""
    assert result["connected"], result
    reply = result["reply"]
    assert reply is not None and reply["type"] == "Error", result
    assert reply["code"] == ErrorCode.BAD_REQUEST
    assert "permission denied" in reply["message"] and f"uid {NOBODY}" in reply["message"]
    assert result["closed"], result


# ---- the window at creation ------------------------------------------------------------------


def others_can_connect(path: Path) -> bool:
    """Could a user other than the owner (and root) connect to the socket at ``path`` now?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or not st.st_mode & 0o002:  # connect() needs write
        return False
    return all(os.stat(d).st_mode & 0o001 for d in path.parents)  # and search on the way


def accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class SocketWatch:
    """Looks at some socket paths at every audit event of this process while armed: whether
    another user could connect, and how the paths come to exist (bound there, or renamed
    there from a socket that already listens)."""

    installed: SocketWatch | None = None

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.windows: list[tuple[str, str, str]] = []
        self.bound_in_place: list[str] = []
        self.renamed_unready: list[str] = []
        self.armed = False
        self._busy = False

    @classmethod
    def get(cls) -> SocketWatch:
        # An audit hook cannot be removed: one per test process, disarmed between tests.
        if cls.installed is None:
            cls.installed = cls()
            sys.addaudithook(cls.installed._hook)
        return cls.installed

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or self._busy:
            return
        self._busy = True
        try:
            watched = [str(p) for p in self.paths]
            if event == "socket.bind" and str(args[1]) in watched:
                self.bound_in_place.append(str(args[1]))
            renamed = event == "os.rename" and str(args[1]) in watched
            if renamed and not accepts_connections(str(args[0])):
                self.renamed_unready.append(str(args[1]))
            for p in self.paths:
                if others_can_connect(p):
                    self.windows.append((event, str(p), oct(os.stat(p).st_mode)))
        finally:
            self._busy = False

    @contextmanager
    def watching(self, *paths: Path) -> Iterator[SocketWatch]:
        """Arm the watch on ``paths`` under ``umask 000`` (the worst an operator can set)."""
        self.paths, self.windows = list(paths), []
        self.bound_in_place, self.renamed_unready = [], []
        old = os.umask(0)
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False
            os.umask(old)


@pytest.mark.timeout(30)
async def test_no_moment_where_another_user_can_connect_to_a_new_socket(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Under umask 000, in a directory anyone may enter, neither the daemon's socket nor an
    agent's control socket is ever connectable by another user: at every step after bind()
    the socket file already has mode 0600 (the old bind-then-chmod left it 0777 until the
    chmod). And neither path exists before it accepts connections: each is renamed into
    place from a socket that already listens, never bound there (a client that waits for
    the path, as tests/procs.py does, could be refused between bind and listen)."""
    short_tmp.chmod(0o755)
    platform_sock, control_sock = short_tmp / "p.sock", short_tmp / "a.ctl"
    with SocketWatch.get().watching(platform_sock, control_sock) as watch:
        async with running_platform(short_tmp, mem_dir) as server:
            assert stat.S_IMODE(os.stat(platform_sock).st_mode) == 0o600
            config = AgentConfig(
                socket=server.config.socket,
                name="vm1",
                memory=1 << 20,
                vcpus=1,
                metrics_port=-1,
                control_socket=control_sock,
                log_level="warning",
            )
            agent = Agent(config)
            await agent.startup()
            try:
                assert stat.S_IMODE(os.stat(control_sock).st_mode) == 0o600
            finally:
                await agent.shutdown()
    assert watch.windows == []
    assert watch.bound_in_place == []
    assert watch.renamed_unready == []


# ---- peer credentials ------------------------------------------------------------------------


def host_limit(d: Daemons) -> int:
    status = asyncio.run(ctl(d.socket, "status"))
    return int(status["host"]["limit_pages"])


@pytest.mark.timeout(60)
def test_another_user_is_refused_by_uid_even_through_an_open_socket(
    short_tmp: Path, mem_dir: Path
) -> None:
    """With the socket left at its 0600, another user cannot even connect. Made 0666 by hand,
    the daemon still checks the peer's uid (SO_PEERCRED): nobody's set_host_limit is refused
    with an Error, the connection closed, the limit unchanged, and the daemon logs the peer's
    pid and uid. The daemon's own user is served as before."""
    short_tmp.chmod(0o755)
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "16MiB")
        before = host_limit(d)
        assert not as_user(NOBODY, ctl_request(d.socket, "set_host_limit", size="8MiB"))[
            "connected"
        ]
        d.socket.chmod(0o666)
        result = as_user(NOBODY, ctl_request(d.socket, "set_host_limit", size="8MiB"))
        assert_refused(result)
        assert host_limit(d) == before
        [refused] = wait_for_event(d.logs[0], "peer_refused")
        assert (refused["peer_uid"], refused["peer_pid"]) == (NOBODY, result["pid"])
        assert refused["allowed_uids"] == [0]


@pytest.mark.timeout(60)
def test_allow_uid_admits_that_user(short_tmp: Path, mem_dir: Path) -> None:
    """``--allow-uid 65534`` makes the socket 0666 and lets nobody's processes in; a user not
    listed is still refused by uid."""
    short_tmp.chmod(0o755)
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "16MiB", "--allow-uid", str(NOBODY))
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666
        result = as_user(NOBODY, ctl_request(d.socket, "set_host_limit", size="8MiB"))
        assert result["reply"]["type"] == "CtlReply" and result["reply"]["ok"], result
        assert host_limit(d) == 2048
        other = as_user(NOBODY - 1, ctl_request(d.socket, "status"))
        assert other["reply"]["type"] == "Error" and other["closed"], other
        assert log_events(d.logs[0], "peer_refused")[0]["peer_uid"] == NOBODY - 1


@pytest.mark.timeout(60)
def test_an_agent_control_socket_refuses_another_user(short_tmp: Path, mem_dir: Path) -> None:
    """An agent's control socket checks the peer's uid too: made 0666 by hand, nobody's
    request is refused and logged with pid and uid, while the owner's requests still work."""
    short_tmp.chmod(0o755)
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "16MiB")
        d.start_agent("vm1", memory="1MiB", vcpus=1)
        control = d.control_socket("vm1")
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        control.chmod(0o666)
        result = as_user(NOBODY, ctl_request(control, "progress"))
        assert_refused(result)
        [refused] = wait_for_event(d.logs[1], "peer_refused")
        assert (refused["peer_uid"], refused["peer_pid"]) == (NOBODY, result["pid"])
        assert "reads" in asyncio.run(ctl(control, "progress"))


# ---- paths another user controls ------------------------------------------------------------


def _foreign_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # nobody listens: a stale socket, but not ours
    os.chown(path, NOBODY, NOBODY)


def _foreign_file(path: Path) -> None:
    path.write_text("not a socket")
    os.chown(path, NOBODY, NOBODY)


def _foreign_directory(path: Path) -> None:
    os.chown(path.parent, NOBODY, NOBODY)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("make", "owner_of"),
    [(_foreign_socket, "path"), (_foreign_file, "path"), (_foreign_directory, "directory")],
)
def test_the_daemon_refuses_a_socket_path_another_user_owns(
    short_tmp: Path, mem_dir: Path, make: Callable[[Path], None], owner_of: str
) -> None:
    """A socket path (or its directory) owned by another user is refused at startup with a
    message naming the owner; the path is left as it was and nothing stays in the memory
    directory."""
    sock_dir = short_tmp / "run"
    sock_dir.mkdir(mode=0o755)
    path = sock_dir / "p.sock"
    make(path)
    before = os.lstat(path) if path.exists() else None
    proc = subprocess.run(
        [
            str(BIN / "vmmem-platform"),
            *("--socket", str(path), "--mem-dir", str(mem_dir), "--metrics-port", "-1"),
            *("--host-memory", "16MiB", "--log-format", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"socket {owner_of}" in proc.stderr and f"uid {NOBODY} (nobody)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if before is not None:
        after = os.lstat(path)
        assert (after.st_ino, after.st_uid) == (before.st_ino, before.st_uid)
    assert list(mem_dir.iterdir()) == []
    shutil.rmtree(sock_dir)
