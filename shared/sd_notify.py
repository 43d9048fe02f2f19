"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per message.

A unit with ``Type=notify`` sets ``NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``); the service sends ``READY=1`` when it serves, ``STOPPING=1`` when it begins to
stop, and, when the unit sets ``WatchdogSec=``, ``WATCHDOG=1`` at least every
``WATCHDOG_USEC`` microseconds. Outside systemd ``NOTIFY_SOCKET`` is unset and every call here
does nothing, so the daemons call it unconditionally.

This is the one module of ``shared`` that does I/O; only the daemons' servers use it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends state lines to the service manager named by ``NOTIFY_SOCKET``, if any."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (a no-op one if none)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        # WATCHDOG_PID, when set, names the process meant: a child that inherited the
        # environment must not ping on its parent's behalf.
        pid = env.get("WATCHDOG_PID")
        if pid in (None, str(os.getpid())):
            try:
                usec = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half the timeout, as sd_watchdog_enabled(3)
        advises, so one late ping is not a missed one."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if sent.

        A manager that went away must not take the daemon down with it: errors are
        swallowed and reported by the return value only."""
        if self.address is None:
            return False
        addr = self.address
        # An abstract socket name starts with NUL; systemd writes it with '@'.
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), target)
        except OSError:
            return False
        return True
