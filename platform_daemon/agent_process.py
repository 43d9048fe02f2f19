"""Is a VM's agent process still running? Asked of /proc, by pid and start time.

Why the start time: a pid is reused once its process is gone, and the daemon keeps a VM's
pid across its own crash. A process is the same one only if it started at the same clock
tick (field 22 of /proc/PID/stat). A zombie has released its memory: it runs no more.
"""

from __future__ import annotations

from pathlib import Path

#: A start time that was not known (no /proc, or the agent's pid not visible).
UNKNOWN = 0


def start_time(pid: int) -> int:
    """Clock ticks after boot at which ``pid`` started; UNKNOWN if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return UNKNOWN
    # The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return UNKNOWN if fields[0] == "Z" else int(fields[19])


def still_running(pid: int, started: int) -> bool | None:
    """True while the process that started at ``started`` runs; None when that cannot be
    known (its start time was never read)."""
    if started == UNKNOWN:
        return None
    return start_time(pid) == started
