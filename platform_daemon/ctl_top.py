"""``vmmem-ctl top``: a refreshing memory view, in the manner of esxtop's memory screen.

Each screen comes from two ``status`` samples: figures are the newer sample's, rates (per
second) the difference of the two over the time between them. It fits an 80-column terminal
over SSH: plain ANSI redraw (no curses, no dependency), every line cut to the width, names
truncated, numbers compacted (``12.3k``, ``4.1M``) so that no figure can widen a column.

The rendering is plain functions of two samples, so that the rates and the layout are
tested without a daemon; ``run_top`` is the thin loop around them.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from shared.constants import FaultReason
from shared.sizes import format_size

#: The widest screen drawn, whatever the terminal says (the issue: usable on 80 columns).
MAX_WIDTH = 80
#: Page states that hold a frame (a page mid swap-out still has its frame).
RESIDENT_STATES = ("exposed", "selected", "in_flight", "resident")
#: Short headings of the fault reasons, in FaultReason order.
REASON_HEADINGS = {
    "first_touch": "FIRST",
    "swap_in": "SWAPIN",
    "cancel": "CANCEL",
    "complete": "CMPLT",
    "remap": "REMAP",
    "cow": "COW",
    "mapped": "MAPPED",
}
REASONS = [r.name.lower() for r in FaultReason]
NAME_WIDTH = 9
COL = 6  # every numeric column: six characters, one space before each
#: Sort keys of ``--sort``: a column of the VM table (descending), or ``name`` (ascending).
SORT_KEYS = ("name", "guest", "resident", "swapped", "shared", "wss", "faults", *REASONS)
CLEAR = "\x1b[H\x1b[2J"


class DaemonLost(Exception):
    """The daemon stopped answering ``status`` (gone, or not speaking the protocol)."""


@dataclass(frozen=True)
class Sample:
    """One ``status`` reply and the monotonic time it was taken."""

    at: float
    status: dict[str, Any]


@dataclass(frozen=True)
class VmFigures:
    """One VM's figures in one sample (pages; the working set None until measured)."""

    key: tuple[int, str]
    name: str
    guest: int
    resident: int
    swapped: int
    shared: int
    wss: int | None
    faults: dict[str, int]

    @classmethod
    def of(cls, vm: dict[str, Any]) -> VmFigures:
        pages = vm.get("pages", {})
        by_reason = vm.get("faults_by_reason")
        if by_reason is None:  # a daemon from before per-reason counts: the total only
            by_reason = {"first_touch": vm.get("stats", {}).get("faults", 0)}
        return cls(
            key=(vm["vm_id"], vm["name"]),
            name=vm["name"],
            guest=vm["guest_pages"],
            resident=sum(pages.get(s, 0) for s in RESIDENT_STATES),
            swapped=pages.get("swapped", 0),
            shared=vm.get("sharing", {}).get("shared_pages", 0),
            wss=vm.get("sampling", {}).get("estimate_pages"),
            faults={r: int(by_reason.get(r, 0)) for r in REASONS},
        )


@dataclass(frozen=True)
class VmRow:
    """A VM's figures and rates per second (None: no earlier sample of this VM to compare)."""

    now: VmFigures
    resident_rate: float | None
    swapped_rate: float | None
    shared_rate: float | None
    wss_rate: float | None
    fault_rates: dict[str, float] | None

    @property
    def fault_rate(self) -> float | None:
        return None if self.fault_rates is None else sum(self.fault_rates.values())


def _delta(new: int | None, old: int | None, seconds: float) -> float | None:
    if new is None or old is None or seconds <= 0:
        return None
    return (new - old) / seconds


def vm_rows(prev: Sample | None, cur: Sample) -> list[VmRow]:
    """Each VM of ``cur`` with its rates since ``prev``.

    A VM is the same only with the same id and name (a new VM may reuse an id). A fault
    counter that went down means the VM's counters restarted: no rate, rather than a
    negative one.
    """
    before = {} if prev is None else {f.key: f for f in map(VmFigures.of, prev.status["vms"])}
    seconds = 0.0 if prev is None else cur.at - prev.at
    rows = []
    for vm in cur.status["vms"]:
        now = VmFigures.of(vm)
        old = before.get(now.key)
        if old is None or seconds <= 0:
            rows.append(VmRow(now, None, None, None, None, None))
            continue
        faults: dict[str, float] | None = {
            r: (now.faults[r] - old.faults[r]) / seconds for r in REASONS
        }
        if any(now.faults[r] < old.faults[r] for r in REASONS):
            faults = None
        rows.append(
            VmRow(
                now,
                _delta(now.resident, old.resident, seconds),
                _delta(now.swapped, old.swapped, seconds),
                _delta(now.shared, old.shared, seconds),
                _delta(now.wss, old.wss, seconds),
                faults,
            )
        )
    return rows


def compact(value: float | None, width: int = COL) -> str:
    """``value`` in at most ``width`` characters: ``-`` for None, ``12345``, ``12.3k``, ``4M``."""
    if value is None:
        return "-"
    if abs(value) < 10 ** (width - 1) and (value == int(value) or abs(value) >= 100):
        text = f"{value:.0f}"
    elif abs(value) < 100:
        text = f"{value:.1f}"
    else:
        text = ""
    if text and len(text) <= width:
        return text
    for scale, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"), (1e15, "P")):
        if abs(value) / scale >= 999.5:  # would round to 1000 or more: the next unit
            continue
        for digits in (1, 0):
            text = f"{value / scale:.{digits}f}{suffix}"
            if len(text) <= width:
                return text
    return f"{value:.0e}"[:width]


def _name(name: str) -> str:
    """The name in its column, cut with ``~`` when too long."""
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "~"


def _row(name: str, cells: Sequence[str]) -> str:
    return f"{name:<{NAME_WIDTH}}" + "".join(f" {c:>{COL}}" for c in cells)


def sort_rows(rows: list[VmRow], key: str) -> list[VmRow]:
    """Rows by ``key``: names ascending, any figure descending (unknown last, then by name)."""
    if key == "name":
        return sorted(rows, key=lambda r: (r.now.name, r.now.key))
    value: Callable[[VmRow], float | None]
    if key in REASONS:
        value = lambda r: None if r.fault_rates is None else r.fault_rates[key]  # noqa: E731
    elif key == "faults":
        value = lambda r: r.fault_rate  # noqa: E731
    else:
        value = lambda r: getattr(r.now, key)  # noqa: E731
    by_name = sorted(rows, key=lambda r: (r.now.name, r.now.key))
    known = [r for r in by_name if value(r) is not None]
    unknown = [r for r in by_name if value(r) is None]
    return sorted(known, key=lambda r: -(value(r) or 0)) + unknown


def host_lines(prev: Sample | None, cur: Sample) -> list[str]:
    """The host's free state, frames, limit and swap; uptime and the sampling interval."""
    st = cur.status
    h = st["host"]
    page = h["page_size"]
    seconds = None if prev is None else cur.at - prev.at
    interval = "-" if seconds is None else f"{seconds:.1f}s"
    lines = [
        f"vmmem top  {time.strftime('%H:%M:%S')}  up {_uptime(st.get('uptime_seconds', 0))}"
        f"  interval {interval}  {len(st['vms'])} VMs",
    ]
    sw = st.get("swap")
    swap = "no swap"
    if sw:
        share = f" ({sw['used'] / sw['slots']:.0%})" if sw["slots"] else ""
        full = " FULL" if sw.get("full") else ""
        swap = f"swap used {compact(sw['used'])}/{compact(sw['slots'])} slots{share}{full}"
    lines.append(
        f"host state {h['free_state'].upper()}, limit {format_size(h['limit_pages'] * page)}; "
        + swap
    )
    lines.append(
        f"frames {compact(h['pages'])}: free {compact(h['free'])}, used {compact(h['used'])},"
        f" retired {compact(h['retired'])}"
    )
    return lines


def _uptime(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m"


def render(
    prev: Sample | None, cur: Sample, sort: str = "faults", width: int = MAX_WIDTH, rows: int = 0
) -> list[str]:
    """One screen: host lines, the VM table, the fault-rate table; no line over ``width``.

    ``rows`` > 0 limits each table to that many VMs (a terminal's height), saying how many
    are left out.
    """
    width = min(width, MAX_WIDTH)
    vms = sort_rows(vm_rows(prev, cur), sort)
    shown, hidden = (vms[:rows], len(vms) - rows) if 0 < rows < len(vms) else (vms, 0)
    lines = host_lines(prev, cur)
    lines.append("")
    heads = ("GUEST", "RES", "RES/s", "SWAP", "SWP/s", "SHARED", "SHR/s", "WSS", "WSS/s", "FLT/s")
    lines.append(_row("VM pages", heads))
    for r in shown:
        f = r.now
        cells = (f.guest, f.resident, r.resident_rate, f.swapped, r.swapped_rate, f.shared)
        rest = (r.shared_rate, f.wss, r.wss_rate, r.fault_rate)
        lines.append(_row(_name(f.name), [compact(v) for v in (*cells, *rest)]))
    if hidden:
        lines.append(f"... {hidden} more VMs (a taller terminal shows them)")
    lines.append("")
    lines.append(_row("faults/s", [REASON_HEADINGS.get(r, r[:COL].upper()) for r in REASONS]))
    for r in shown:
        rates = r.fault_rates or {}
        lines.append(_row(_name(r.now.name), [compact(rates.get(x)) for x in REASONS]))
    if not vms:
        lines.append("no VMs registered")
    return [line[:width] for line in lines]


def run_top(
    sample: Callable[[], dict[str, Any]],
    *,
    interval: float,
    once: bool,
    sort: str,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print screens until interrupted (``once``: one screen, its rates over ``interval``).

    On a terminal each screen replaces the last (ANSI home and clear) and the VM tables are
    cut to its height; elsewhere screens follow each other, whole, for a log or a pipe.
    """
    tty = out.isatty()
    prev: Sample | None = None
    if once and interval > 0:
        prev = Sample(clock(), sample())
        sleep(interval)
    while True:
        cur = Sample(clock(), sample())
        size = shutil.get_terminal_size((MAX_WIDTH, 24))
        # Two tables of the same VMs under five lines of header and headings.
        rows = max(1, (size.lines - 9) // 2) if tty and not once else 0
        screen = render(prev, cur, sort, size.columns if tty else MAX_WIDTH, rows)
        if tty and not once:
            out.write(CLEAR)
        out.write("\n".join(screen) + "\n")
        out.flush()
        if once:
            return
        if not tty:
            out.write("\n")
        prev = cur
        sleep(interval)
