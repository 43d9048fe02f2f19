"""The numa scenario's run: a VM starts with most of its memory on the wrong node, because
another VM filled its home node and then left; NUMA migration brings it home.

The run starts that other VM itself: a short-lived agent (``vmmem-vmm``, one vCPU, its
control socket and log in a private temporary directory) homed on the first VM's home node
and as large as that node's free memory. It writes all of its memory (the node is full),
then the scenario's VMs write theirs (their first touches fall to the other nodes), then
the filler is stopped (SIGTERM: it says goodbye and the daemon frees its frames) and the
VMs run on while the daemon's status is sampled every quarter second: each VM's local
fraction over time, and the time from the filler's exit to 95 % local. The filler is
always stopped and its files removed, whatever happens; without one (no room for it, it
would not start) the phases still run and the report says why there is no figure.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.constants import PAGE_SIZE
from shared.workload import Phase

from .driver import LoadRun
from .links import AgentLink, Clock

#: How often the migration phase samples the daemon's status.
SAMPLE_PERIOD = 0.25
#: The local fraction the report times (the issue's 95 %).
TARGET_FRACTION = 0.95
#: Bounds on the filler: registering, writing its memory, leaving.
FILLER_START = 30.0
FILLER_FILL = 60.0
FILLER_STOP = 15.0
FILLER_NAME = "numa-filler"


@dataclass
class NumaRecord:
    """What the run collected, for ``numa_report``."""

    node: int = -1
    filler_pages: int = 0
    filler_written: int = 0
    left_at: float | None = None  # seconds into the run when the filler was gone
    start: dict[str, Any] | None = None  # daemon status when the filler left
    end: dict[str, Any] | None = None
    timeline: list[tuple[float, dict[str, float | None]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Filler:
    """The VM that fills the home node and leaves: an agent process this run owns."""

    def __init__(self, socket: str, node: int, pages: int) -> None:
        self.socket, self.node, self.pages = socket, node, pages
        self.dir = Path(tempfile.mkdtemp(prefix="vmmem-numa-"))
        self.control = self.dir / "filler.ctl"
        self.log = self.dir / "filler.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.link: AgentLink | None = None

    async def start(self, load: LoadRun) -> str | None:
        """Start it and wait for its registration; None, or why it did not come up."""
        cmd = [
            sys.executable,
            "-m",
            "vmm_agent.cli",
            "--socket",
            self.socket,
            "--name",
            FILLER_NAME,
            "--memory",
            str(self.pages * PAGE_SIZE),
            "--vcpus",
            "1",
            "--home-node",
            str(self.node),
            "--metrics-port",
            "-1",
            "--control-socket",
            str(self.control),
            "--log-format",
            "json",
        ]
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        deadline = time.monotonic() + FILLER_START
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                return f"the filler exited with status {self.proc.returncode}: {self._tail()}"
            vms = await load.daemon.call("list_vms")
            if vms is not None and any(v["name"] == FILLER_NAME for v in vms["vms"]):
                self.link = AgentLink(FILLER_NAME, str(self.control), self.proc.pid, 30.0, Clock())
                await self.link.connect()
                return None if self.link.active else self.link.reason
            await asyncio.sleep(0.1)
        return f"the filler did not register within {FILLER_START:g} s"

    async def fill(self, phase: Phase) -> int:
        """Write every page of its memory (bounded); returns the pages written."""
        link = self.link
        assert link is not None
        if await link.call("run_phase", phase.name, phase=phase.model_dump()) is None:
            return 0
        deadline = time.monotonic() + FILLER_FILL
        written = 0
        while time.monotonic() < deadline:
            res = await link.call("results", phase.name)
            if res is None:
                break
            written = int(res["pages_written"])
            if written >= self.pages:
                break
            await asyncio.sleep(0.1)
        await link.call("halt", phase.name)
        return written

    async def stop(self, load: LoadRun) -> str | None:
        """SIGTERM, wait for the exit (SIGKILL past the bound) and for the daemon to let
        it go; None, or what went wrong."""
        if self.link is not None:
            self.link.close()
        proc, why = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), FILLER_STOP)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                why = f"the filler did not exit within {FILLER_STOP:g} s of SIGTERM"
        deadline = time.monotonic() + FILLER_STOP
        while time.monotonic() < deadline:
            vms = await load.daemon.call("list_vms")
            if vms is None or all(v["name"] != FILLER_NAME for v in vms["vms"]):
                break
            await asyncio.sleep(0.05)
        return why

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-400:].strip()
        except OSError:
            return ""


class NumaRun:
    """Runs the numa scenario on a prepared LoadRun."""

    def __init__(self, load: LoadRun) -> None:
        self.load = load
        self.record = NumaRecord()

    async def run(self) -> None:
        load, rec = self.load, self.record
        fill, migrate = load.scenario.phases
        started = time.monotonic()
        load.schedule_injections()
        filler = await self._filler(fill)
        try:
            if not await load.run_phase(fill):
                return
            rec.start = await load.daemon.call("status")
            if filler is not None:
                if (why := await filler.stop(load)) is not None:
                    rec.notes.append(why)
                rec.left_at = round(time.monotonic() - started, 3)
            t0 = time.monotonic()
            self._sample(rec.start, 0.0)

            async def sample() -> None:
                self._sample(await load.daemon.call("status"), time.monotonic() - t0)

            await load.run_phase(migrate, every=sample, period=SAMPLE_PERIOD)
            rec.end = load.out.snapshots[-1]["status"] if load.out.snapshots else None
        finally:
            if filler is not None:
                await filler.stop(load)
                filler.remove()
            load.progress.done()
            load.out.extra["numa"] = numa_report(rec, [a.name for a in load.agents.values()])

    async def _filler(self, fill: Phase) -> Filler | None:
        """Start the filler on the first VM's home node and let it fill the node."""
        load, rec = self.load, self.record
        status = await load.daemon.call("status")
        names = sorted(a.name for a in load.active())
        if status is None or not names:
            rec.notes.append("no VM to run on, or the daemon did not answer")
            return None
        vms = {v["name"]: v for v in status["vms"]}
        if names[0] not in vms:
            rec.notes.append(f"VM {names[0]} is not in the daemon's status")
            return None
        rec.node = node = int(vms[names[0]]["home_node"])
        free = [int(n["free"]) for n in status["host"]["nodes"]]
        need = sum(int(vms[n]["guest_pages"]) for n in names if n in vms)
        if free[node] < 64 or sum(free) - free[node] < need:
            rec.notes.append(
                f"no room for the scenario: node {node} has {free[node]} free frames, the "
                f"other nodes {sum(free) - free[node]} for {need} guest pages"
            )
            return None
        rec.filler_pages = free[node]
        filler = Filler(load.daemon.path, node, free[node])
        why = await filler.start(load)
        if why is None:
            phase = fill.model_copy(update={"name": "numa.fill-home", "duration": FILLER_FILL})
            rec.filler_written = await filler.fill(phase)
            return filler
        rec.notes.append(why)
        await filler.stop(load)
        filler.remove()
        return None

    def _sample(self, status: dict[str, Any] | None, at: float) -> None:
        if status is None:
            return
        self.record.timeline.append(
            (
                round(at, 3),
                {vm["name"]: vm["numa"]["local_fraction"] for vm in status["vms"]},
            )
        )


def numa_report(rec: NumaRecord, names: list[str]) -> dict[str, Any]:
    """Per VM: local fraction at the start and the end, over time, the time to 95 % local,
    what migration did; the filler; notes. ``unavailable`` when there was no filler."""
    if rec.start is None or rec.left_at is None:
        return {"unavailable": "; ".join(rec.notes) or "the scenario did not get to migrate"}
    start = {vm["name"]: vm for vm in rec.start["vms"]}
    end = {vm["name"]: vm for vm in (rec.end or rec.start)["vms"]}
    vms: dict[str, Any] = {}
    for name in names:
        if name not in start or name not in end:
            continue
        reached = next(
            (t for t, fr in rec.timeline if (fr.get(name) or 0.0) >= TARGET_FRACTION), None
        )
        moved = end[name]["numa"]["migrated_pages"] - start[name]["numa"]["migrated_pages"]
        vms[name] = {
            "home_node": start[name]["numa"]["home_node"],
            "local_fraction_start": start[name]["numa"]["local_fraction"],
            "local_fraction_end": end[name]["numa"]["local_fraction"],
            "remote_pages_start": start[name]["numa"]["remote_pages"],
            "remote_pages_end": end[name]["numa"]["remote_pages"],
            "seconds_to_95": reached,
            "migrated_pages": moved,
            "pages_per_second": round(moved / reached, 1) if reached else None,
            "revalidated_pages": end[name]["numa"]["validated_pages"]
            - start[name]["numa"]["validated_pages"],
            "fault_completions": end[name]["numa"]["fault_completions"],
            "timeline": [[t, fr.get(name)] for t, fr in rec.timeline],
        }
    notes = list(rec.notes)
    for name, vm in vms.items():
        if (vm["local_fraction_start"] or 0.0) >= TARGET_FRACTION:
            notes.append(
                f"{name} was already {_pct(vm['local_fraction_start'])} local when the filler "
                "left: its memory was backed before the filler came (use a fresh VM)"
            )
    lowprio = (rec.end or rec.start)["lowprio"]
    return {
        "node": rec.node,
        "filler_pages": rec.filler_pages,
        "filler_pages_written": rec.filler_written,
        "filler_left_at_seconds": rec.left_at,
        "migrate_rate": lowprio.get("numa_migrate_rate"),
        "host_migrate_rate": lowprio.get("numa_host_migrate_rate"),
        "sample_period_seconds": SAMPLE_PERIOD,
        "vms": vms,
        "notes": notes,
    }


def numa_lines(section: dict[str, Any]) -> list[str]:
    """The report table's lines for the numa section."""
    if "unavailable" in section:
        return [f"numa: no figure ({section['unavailable']})"]
    lines = [
        f"numa: a filler VM of {section['filler_pages']:,} pages filled node "
        f"{section['node']} and left; migration at most {section['migrate_rate']:,.0f} "
        f"pages/s per VM, {section['host_migrate_rate']:,.0f} for the host"
    ]
    for name, vm in section["vms"].items():
        reached = vm["seconds_to_95"]
        when = "not reached" if reached is None else f"after {reached:.2f} s"
        lines.append(
            f"  {name}: home node {vm['home_node']}, local {_pct(vm['local_fraction_start'])} "
            f"-> {_pct(vm['local_fraction_end'])}; 95 % local {when}; migrated "
            f"{vm['migrated_pages']:,} pages, revalidated {vm['revalidated_pages']:,}"
        )
        points = vm["timeline"][:: max(1, len(vm["timeline"]) // 12)]
        lines.append("    local over time: " + "  ".join(f"{t:.1f}s {_pct(f)}" for t, f in points))
    lines.extend(f"  note: {n}" for n in section["notes"])
    return lines


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"
