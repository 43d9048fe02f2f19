"""Live progress of a run: a table per VM on a terminal (rich), plain lines otherwise.

On a terminal, one row per VM, redrawn in place: the phase, time left, accesses and faults
per second (since the previous update), pages swapped out and in, mismatches. When stderr
is not a terminal (a log, CI), a line every ``PLAIN_PERIOD`` seconds with the totals, as
before: a log must not fill with redraws.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

#: Seconds between two plain progress lines.
PLAIN_PERIOD = 5.0


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "—"


class Progress:
    """The progress display (``enabled`` False: nothing at all)."""

    def __init__(self, enabled: bool, tty: bool | None = None) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.last = 0.0
        self._live: Live | None = None
        #: Per VM: (time, accesses, faults) at the previous update, for the rates.
        self._prev: dict[str, tuple[float, int, int]] = {}

    def show(
        self,
        phase: str,
        left: float,
        progress: list[dict[str, Any]],
        status: dict[str, Any] | None = None,
    ) -> None:
        """An update: the agents' ``progress`` answers, the daemon's last ``status``."""
        if not self.enabled:
            return
        if self.tty:
            self._redraw(phase, left, progress, status)
            return
        now = time.monotonic()
        if now - self.last < PLAIN_PERIOD:
            return
        self.last = now
        ops = sum(p["reads"] + p["writes"] for p in progress)
        faults = sum(p["faults"] for p in progress)
        mism = sum(p["mismatches"] for p in progress)
        line = (
            f"[{phase:<9}] {left:5.1f}s left  accesses {ops:>11,}  faults {faults:>9,}  "
            f"mismatches {mism}  VMs {len(progress)}"
        )
        print(line, file=sys.stderr, flush=True)

    def rows(
        self, progress: list[dict[str, Any]], status: dict[str, Any] | None, now: float
    ) -> list[list[str]]:
        """One row per VM: name, phase, accesses/s, faults/s, swap out, swap in, mismatches."""
        stats = {vm["name"]: vm.get("stats", {}) for vm in (status or {}).get("vms", [])}
        rows = []
        for p in sorted(progress, key=lambda p: str(p["vm"])):
            name, ops, faults = str(p["vm"]), p["reads"] + p["writes"], p["faults"]
            t0, ops0, faults0 = self._prev.get(name, (now, ops, faults))
            self._prev[name] = (now, ops, faults)
            dt = now - t0
            st = stats.get(name)
            rows.append(
                [
                    name,
                    str(p.get("phase") or "—"),
                    _rate(ops - ops0, dt),
                    _rate(faults - faults0, dt),
                    "—" if st is None else f"{st.get('swapped_out', 0):,}",
                    "—" if st is None else f"{st.get('swapped_in', 0):,}",
                    f"{p['mismatches']:,}",
                ]
            )
        return rows

    def _redraw(
        self, phase: str, left: float, progress: list[dict[str, Any]], status: dict[str, Any] | None
    ) -> None:
        table = Table(title=f"{phase}: {left:.1f} s left", title_justify="left")
        for i, head in enumerate(
            ["VM", "phase", "accesses/s", "faults/s", "swap out", "swap in", "mismatches"]
        ):
            table.add_column(head, justify="left" if i < 2 else "right")
        for row in self.rows(progress, status, time.monotonic()):
            table.add_row(*row)
        if self._live is None:
            self._live = Live(
                table, console=Console(stderr=True), auto_refresh=False, transient=False
            )
            self._live.start()
        else:
            self._live.update(table)
        self._live.refresh()

    def done(self) -> None:
        """The phases are over: leave the last table on screen."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._prev.clear()
