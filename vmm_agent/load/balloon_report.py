"""The balloon scenario's report: per pass and VM, what was reclaimed, how, and at what cost.

Figures come from two places, each for what it knows: the daemon's status (its per-VM
``memsched`` block: pages ballooned and swapped out, balloon size, rho, back-off; its page
counts: frames the VM holds) at the start and end of each reclaim phase and sampled during
it; the agents' results (accesses per second in each phase, refaults, balloon touches).

"Reclaimed" is kept apart from "freed": a page the balloon takes from the guest's free pool
may never have been touched, so it frees no frame; a page swapped out may be swapped back
in. ``frames_freed`` (frames held when reclaim started less frames held when it ended) is
what the host got, and the cost of each method is compared per frame freed.

The two claims the scenario is about are computed, never assumed:

- idle tax: the idle VMs gave up more memory than the busy ones (frames freed, on average
  per VM), and gave first;
- ballooning against swap: each role's throughput during reclaim, as a fraction of its own
  baseline (the settle phase just before), per 1,000 frames freed, with ballooning on (and
  how much of it the balloon took: a VM that backs off gives the rest to swap) and with
  swap only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scenarios import BALLOON_ROLES

if TYPE_CHECKING:
    from .balloon_run import PassRecord

#: Page states that hold a frame (the p2m's counts in the daemon's status).
HELD_STATES = ("exposed", "selected", "in_flight", "resident")
#: A throughput loss below this share of the baseline is within the run-to-run spread of a
#: baseline on a shared machine: no measurable cost.
NOISE = 0.05


def _held(vm: dict[str, Any]) -> int:
    pages: dict[str, int] = vm.get("pages", {})
    return sum(pages.get(state, 0) for state in HELD_STATES)


def _by_name(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {vm["name"]: vm for vm in (status or {}).get("vms", [])}


def _throughput(results: dict[str, Any], phase: str) -> float | None:
    """Accesses per second of ``phase`` in an agent's results, if it ran there."""
    for entry in results.get("phase_throughput", []):
        if entry and entry.get("phase") == phase:
            return float(entry["accesses_per_second"])
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else round(num / den, 4)


def _vm_entry(record: PassRecord, name: str) -> dict[str, Any] | None:
    start, end = _by_name(record.start).get(name), _by_name(record.end).get(name)
    settle, reclaim = record.settle.get(name), record.reclaim.get(name)
    if start is None or end is None or settle is None or reclaim is None:
        return None  # the VM left the run, or the daemon did not answer: not guessed
    m0, m1 = start["memsched"], end["memsched"]
    balloon = m1["reclaimed"]["balloon"] - m0["reclaimed"]["balloon"]
    swap = m1["reclaimed"]["swap"] - m0["reclaimed"]["swap"]
    base = _throughput(settle, f"{record.name}.settle")
    during = _throughput(reclaim, f"{record.name}.reclaim")
    samples = [(t, vms[name]) for t, vms in record.timeline if name in vms]
    backed = [t for t, m in samples if m["backed_off"]]
    given = [t for t, m in samples if _given(m) > _given(m0)]
    return {
        "role": record.roles.get(name, "busy"),
        "rho_at_start": m0["rho"],
        "stall_fraction_at_start": m0["stall_fraction"],
        "wss_pages_at_start": m0["wss_pages"],
        "held_pages": {"start": _held(start), "end": _held(end)},
        "frames_freed": _held(start) - _held(end),
        "reclaimed": {"balloon": balloon, "swap": swap},
        "swapped_in": end["stats"].get("swapped_in", 0) - start["stats"].get("swapped_in", 0),
        "balloon_pages": {
            "peak": max([m["balloon_pages"] for _, m in samples], default=m1["balloon_pages"]),
            "end": m1["balloon_pages"],
        },
        "first_reclaimed_at": given[0] if given else None,
        "accesses_per_second": {
            "settle": base,
            "reclaim": during,
            "ratio": _ratio(during, base),
        },
        "refaults": reclaim["refaults"] - settle["refaults"],
        # What the guest waited for during reclaim: swap-ins, first touches, ...
        "faults_by_reason": _delta(reclaim["faults_by_reason"], settle["faults_by_reason"]),
        "stall_seconds": round(m1["stall_seconds"] - m0["stall_seconds"], 3),
        "backed_off": bool(backed) or bool(m1["backed_off"]),
        "backed_off_at": backed[0] if backed else None,
        "backed_off_samples": len(backed),
        "balloon_touches": reclaim["guest_os"]["balloon_touches"],
        "balloon_returns": reclaim["guest_os"]["balloon_returns"],
        # Free memory the guest once used (frames still backed) when reclaim started, and
        # how many such pages its workload took again during reclaim (each cleared first:
        # a swap-in of old content if the host had swapped it out). 0 from an agent that
        # does not tell them apart (before the guest model did).
        "free_once_used_at_start": settle["guest_os"].get("free_once_used", 0),
        "reused": reclaim["guest_os"].get("reused", 0) - settle["guest_os"].get("reused", 0),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {k: n - before.get(k, 0) for k, n in after.items()}
    return {k: n for k, n in sorted(out.items()) if n}


def _given(m: dict[str, Any]) -> int:
    return int(m["reclaimed"]["balloon"] + m["reclaimed"]["swap"])


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _role_means(vms: dict[str, dict[str, Any]], role: str) -> dict[str, Any]:
    mine = [v for v in vms.values() if v["role"] == role]
    ratios = [v["accesses_per_second"]["ratio"] for v in mine]
    return {
        "vms": len(mine),
        "frames_freed": _mean([v["frames_freed"] for v in mine]),
        "reclaimed_balloon": _mean([v["reclaimed"]["balloon"] for v in mine]),
        "reclaimed_swap": _mean([v["reclaimed"]["swap"] for v in mine]),
        "throughput_ratio": _mean([r for r in ratios if r is not None]),
        "refaults": _mean([v["refaults"] for v in mine]),
        "stall_seconds": _mean([v["stall_seconds"] for v in mine]),
    }


def _pass_entry(record: PassRecord) -> dict[str, Any]:
    names = sorted(record.roles)
    entries = {name: _vm_entry(record, name) for name in names}
    vms = {name: e for name, e in entries.items() if e is not None}
    idle, busy = _role_means(vms, "idle"), _role_means(vms, "busy")
    firsts = sorted(
        (v["first_reclaimed_at"], name)
        for name, v in vms.items()
        if v["first_reclaimed_at"] is not None
    )
    holds = (
        idle["frames_freed"] is not None
        and busy["frames_freed"] is not None
        and idle["frames_freed"] > busy["frames_freed"]
    )
    return {
        "ballooning": record.name == "balloon",
        "host_limit_pages": record.limit_pages,
        "fill_seconds": record.fill_seconds,
        "warm_seconds": record.warm_seconds,
        "reclaim_seconds": record.timeline[-1][0] if record.timeline else None,
        "vms": vms,
        "missing": [name for name, e in entries.items() if e is None],
        "idle": idle,
        "busy": busy,
        "idle_tax": {
            "idle_gave_more": holds,
            "first_to_give": _first_to_give(record, vms),
            "order": [name for _, name in firsts],
        },
        "backed_off": sorted(name for name, v in vms.items() if v["backed_off"]),
        "balloons_left": record.balloons_left,
        "notes": record.notes,
        "timeline": [
            {
                "t": t,
                **{
                    name: {
                        "balloon": m["balloon_pages"],
                        "balloon_target": m["balloon_target"],
                        "swapped": m["swapped_pages"],
                        "backed_off": m["backed_off"],
                        # Why it backed off (or not): the impact the last balance saw.
                        "stall_fraction": m["stall_fraction"],
                        "refaults_per_second": m["refaults_per_second"],
                    }
                    for name, m in sorted(sample.items())
                },
            }
            for t, sample in record.timeline
        ],
    }


def _first_to_give(record: PassRecord, vms: dict[str, dict[str, Any]]) -> str | None:
    """The role that had given more pages at the first sample where any VM had given some
    (None if none did, or both roles the same)."""
    start = {vm["name"]: vm["memsched"] for vm in (record.start or {}).get("vms", [])}
    for _, sample in record.timeline:
        given = {
            name: _given(m) - _given(start[name])
            for name, m in sample.items()
            if name in vms and name in start
        }
        if any(n > 0 for n in given.values()):
            by_role = {
                role: sum(n for name, n in given.items() if vms[name]["role"] == role)
                for role in BALLOON_ROLES
            }
            top = max(by_role.values())
            leaders = [role for role, n in by_role.items() if n == top]
            return leaders[0] if len(leaders) == 1 else None
    return None


def _cost(p: dict[str, Any], role: str) -> dict[str, Any]:
    """A role's throughput lost per 1,000 frames freed from each VM, and how it gave."""
    r = p[role]
    ratio, freed = r["throughput_ratio"], r["frames_freed"]
    given = (r["reclaimed_balloon"] or 0) + (r["reclaimed_swap"] or 0)
    loss = None if ratio is None else round(1.0 - ratio, 4)
    per_1000 = None if loss is None or not freed or freed <= 0 else round(loss / freed * 1e3, 4)
    return {
        "frames_freed": freed,
        "throughput_ratio": ratio,
        "loss": loss,
        "loss_per_1000_frames": per_1000,
        "by_balloon": round((r["reclaimed_balloon"] or 0) / given, 4) if given else None,
    }


def _comparison(passes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Each role's cost with ballooning on against swap only (both passes needed).

    With ballooning on, a VM that backs off gives the rest to swap: ``by_balloon`` says how
    much of what it gave went to the balloon, so the figures compare ESX's policy (balloon
    first, back-off, swap for the rest) with swap alone. A loss within ``NOISE`` of the
    baseline either way is no measurable cost, and no verdict is drawn from it.
    """
    if "balloon" not in passes or "swap" not in passes:
        return None
    out: dict[str, Any] = {}
    for role in BALLOON_ROLES:
        on, off = _cost(passes["balloon"], role), _cost(passes["swap"], role)
        a, b = on["loss_per_1000_frames"], off["loss_per_1000_frames"]
        measurable = any(c["loss"] is not None and c["loss"] > NOISE for c in (on, off))
        out[role] = {
            "balloon_pass": on,
            "swap_only": off,
            "measurable": measurable,
            "ballooning_cheaper": a < b if measurable and a is not None and b is not None else None,
        }
    return out


def balloon_report(records: list[PassRecord]) -> dict[str, Any]:
    """The scenario's report section: each pass, then the comparison."""
    passes = {r.name: _pass_entry(r) for r in records}
    return {"passes": passes, "comparison": _comparison(passes)}


# ---- the text table ---------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def balloon_lines(section: dict[str, Any]) -> list[str]:
    """The balloon scenario's table: one block per pass, then what they show."""
    if "unavailable" in section:
        return [f"balloon: not available: {section['unavailable']}"]
    lines: list[str] = []
    head = (
        f"{'VM':<8}{'role':<6}{'rho':>8}{'balloon':>9}{'swap out':>9}{'freed':>8}"
        f"{'acc/s base':>12}{'acc/s recl':>12}{'ratio':>7}{'refaults':>9}{'stall s':>8}"
        f"{'backoff':>9}"
    )
    for name, p in section["passes"].items():
        how = "ballooning on" if p["ballooning"] else "swap only"
        lines.append(
            f"balloon scenario, pass {name!r} ({how}): host limit "
            f"{_num(p['host_limit_pages'])} pages during reclaim"
        )
        lines.append(head)
        for vm, v in sorted(p["vms"].items()):
            aps = v["accesses_per_second"]
            backoff = f"{v['backed_off_at']:.1f}s" if v["backed_off"] else "no"
            if v["backed_off"] and v["backed_off_at"] is None:
                backoff = "at end"
            lines.append(
                f"{vm:<8}{v['role']:<6}{_num(v['rho_at_start'], '.3g'):>8}"
                f"{v['reclaimed']['balloon']:>9,}{v['reclaimed']['swap']:>9,}"
                f"{v['frames_freed']:>8,}{_num(aps['settle']):>12}{_num(aps['reclaim']):>12}"
                f"{_num(aps['ratio'], '.2f'):>7}{v['refaults']:>9,}{v['stall_seconds']:>8.2f}"
                f"{backoff:>9}"
            )
        for vm in p["missing"]:
            lines.append(f"{vm:<8}no figures (left the run, or the daemon did not answer)")
        for note in p["notes"]:
            lines.append(f"  note: {note}")
        if p["balloons_left"]:
            lines.append(f"  balloons not given back in time: {p['balloons_left']}")
        idle, busy, tax = p["idle"], p["busy"], p["idle_tax"]
        verdict = "yes" if tax["idle_gave_more"] else "NO"
        lines.append(
            f"  idle VMs freed {_num(idle['frames_freed'])} frames each, busy "
            f"{_num(busy['frames_freed'])} (idle gave more: {verdict}; first to give: "
            f"{tax['first_to_give'] or '-'}); busy kept {_pct(busy['throughput_ratio'])} of "
            f"their throughput, idle {_pct(idle['throughput_ratio'])}"
        )
    for role, c in (section.get("comparison") or {}).items():
        on, off = c["balloon_pass"], c["swap_only"]
        verdict = {True: "yes", False: "NO", None: "-"}[c["ballooning_cheaper"]]
        if not c["measurable"]:
            verdict = f"no measurable cost either way (loss < {NOISE:.0%})"
        lines.append(
            f"{role} VMs, ballooning on vs swap only: {_pct(on['throughput_ratio'])} vs "
            f"{_pct(off['throughput_ratio'])} of throughput kept, {_num(on['frames_freed'])} vs "
            f"{_num(off['frames_freed'])} frames freed each ({_pct(on['by_balloon'])} of it "
            f"given by balloon); loss per 1,000 frames {_num(on['loss_per_1000_frames'], '.3f')}"
            f" vs {_num(off['loss_per_1000_frames'], '.3f')}; ballooning cheaper: {verdict}"
        )
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
