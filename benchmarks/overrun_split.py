"""Where a low-priority round's overrun goes: the agent's steps joined with the daemon's trace.

Both processes stamp with CLOCK_MONOTONIC (``time.monotonic`` in the agent,
``time.perf_counter`` in the daemon: the same clock on Linux), so an exchange's wall time
splits into the way to the daemon and its wait there (``to_daemon``: from the agent's send to
the daemon starting on the GetRequest, less its work on the CompleteRequest before it), the
daemon's work (``daemon``: completing the previous batch and choosing this one) and the way
back (``back``: the reply's way and the agent's wake-up). Each part has a CPU time beside its
wall time where one is measured: the agent's processing and monitor turns, the daemon's work.
Wall beyond CPU in the agent's or daemon's own work is time their thread was not running:
waiting for a CPU (or, in the daemon, for the GIL).

Used by ``benchmarks/lowprio.py`` part (g); pure functions over the JSON the ctl ops return.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.constants import ServiceType

#: Rounds over the bound by more than this fraction of it are split apart.
SPLIT_ABOVE = 0.10


def _q(xs: Sequence[float], q: float) -> float:
    return float(np.quantile(xs, q)) if len(xs) else float("nan")


def split_round(rnd: dict[str, Any], trace: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One round's wall time in parts (seconds), its CPU time, and its last batch."""
    parts = dict.fromkeys(
        (
            "batch_cpu",
            "batch_wait",
            "monitor_cpu",
            "monitor_wait",
            "to_daemon",
            "daemon_cpu",
            "daemon_wait",
            "back",
            "other_agent_tasks",
        ),
        0.0,
    )
    last: dict[str, Any] | None = None
    steps = rnd.get("steps", [])
    prev_seq: int | None = None
    daemon_wait = 0.0  # the daemon thread's run delay inside this round's exchanges
    for i, step in enumerate(steps):
        kind = step["kind"]
        if kind == "batch":
            parts["batch_cpu"] += step["cpu"]
            parts["batch_wait"] += max(0.0, step["wall"] - step["cpu"])
            entry = trace.get(int(step["seq"]), {})
            last = {
                "service": ServiceType(int(step["service"])).name.lower(),
                "pages": step["pages"],
                "predicted": entry.get("predicted"),
                "measured": entry.get("processing"),
                "time_left": entry.get("time_left"),
                "cost_samples": entry.get("cost_samples"),
                "first": entry.get("first"),
                "agent_wall": step["wall"],
                "agent_cpu": step["cpu"],
            }
            prev_seq = int(step["seq"])
        elif kind == "monitor":
            parts["monitor_cpu"] += step["cpu"]
            parts["monitor_wait"] += max(0.0, step["wall"] - step["cpu"])
        elif kind == "exchange":
            wall = step["resumed"] - step["sent"]
            parts["other_agent_tasks"] += min(step["cpu"], wall)
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            entry = trace.get(int(nxt["seq"])) if nxt and nxt["kind"] == "batch" else None
            prev = trace.get(prev_seq) if prev_seq is not None else None
            d_wall = d_cpu = 0.0
            if (
                prev is not None
                and "complete_start" in prev
                and prev["complete_start"] >= step["sent"]
            ):
                d_wall += prev["complete_end"] - prev["complete_start"]
                d_cpu += prev["complete_cpu"]
            if entry is not None and "get_start" in entry:
                to = entry["get_start"] - step["sent"] - d_wall
                d_wall += entry["get_end"] - entry["get_start"]
                d_cpu += entry["get_cpu"]
                back = step["resumed"] - entry["get_end"]
            else:  # the round-over answer: only the daemon's own time is known
                d_wall += step["daemon"]
                d_cpu += step["daemon"]  # not measured apart: counted as work
                to, back = (wall - d_wall) / 2, (wall - d_wall) / 2
            if entry is not None and prev is not None and "run_delay_start" in entry:
                # The daemon's CPU wait from its reply to the previous batch to its start on
                # this one (it may have served others meanwhile: an upper bound), and in it.
                since = entry["run_delay_start"] - prev["run_delay_start"] - prev["get_wait"]
                daemon_wait += min(wall, max(0.0, since) + entry["get_wait"])
            parts["to_daemon"] += max(0.0, to)
            parts["daemon_cpu"] += min(d_cpu, d_wall)
            parts["daemon_wait"] += max(0.0, d_wall - d_cpu)
            parts["back"] += max(0.0, back)
    cpu = parts["batch_cpu"] + parts["monitor_cpu"] + parts["daemon_cpu"]
    waits = {"agent": rnd.get("run_delay", 0.0), "daemon": daemon_wait}
    return {"parts": parts, "cpu": cpu, "last": last, "cpu_wait": waits}


def summarize(
    rounds: list[dict[str, Any]], traces: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Over the rounds (each with ``vm``): the overrun's parts, the CPU-time overrun, and for
    rounds over by more than SPLIT_ABOVE, which type's batch ran last and how well it was
    predicted."""
    by_vm = {vm: {int(e["seq"]): e for e in entries} for vm, entries in traces.items()}
    cpu_over: list[float] = []
    net_over: list[float] = []
    over: list[dict[str, Any]] = []
    for rnd in rounds:
        split = split_round(rnd, by_vm.get(rnd["vm"], {}))
        cpu_over.append(max(0.0, split["cpu"] - rnd["bound"]) / rnd["bound"])
        waited = split["cpu_wait"]["agent"] + split["cpu_wait"]["daemon"]
        net_over.append(max(0.0, rnd["used"] - waited - rnd["bound"]) / rnd["bound"])
        if rnd["overrun"] > SPLIT_ABOVE * rnd["bound"]:
            seqs = [int(st["seq"]) for st in rnd.get("steps", []) if st["kind"] == "batch"]
            batches = [by_vm.get(rnd["vm"], {}).get(q, {"seq": q}) for q in seqs]
            over.append({**split, "round": rnd, "batches": batches})
    out: dict[str, Any] = {
        "per_type": per_type(traces),
        "rounds": len(rounds),
        "cpu_time_overrun_p99_fraction": _q(cpu_over, 0.99),
        "cpu_time_overrun_p50_fraction": _q(cpu_over, 0.5),
        # Wall time less both threads' waits for a CPU: the overrun on CPUs of their own.
        "overrun_less_cpu_wait_p99_fraction": _q(net_over, 0.99),
        "overrun_less_cpu_wait_p50_fraction": _q(net_over, 0.5),
        "over_rounds": len(over),
        "over_detail": over,  # for the JSON: each round over, its steps and batches
    }
    if not over:
        return out
    # The parts, summed over the rounds over, each as a share of their time used.
    used = sum(o["round"]["used"] for o in over)
    names = over[0]["parts"].keys()
    out["share_of_used"] = {k: sum(o["parts"][k] for o in over) / used for k in names}
    out["median_parts_fraction_of_bound"] = {
        k: _q([o["parts"][k] / o["round"]["bound"] for o in over], 0.5) for k in names
    }
    out["cpu_wait_share_of_used"] = {
        side: sum(o["cpu_wait"][side] for o in over) / used for side in ("agent", "daemon")
    }
    out["cpu_wait_share_of_overrun"] = sum(
        min(o["round"]["overrun"], o["cpu_wait"]["agent"] + o["cpu_wait"]["daemon"]) for o in over
    ) / sum(o["round"]["overrun"] for o in over)
    lasts = [o["last"] for o in over if o["last"] is not None]
    out["last_type"] = dict(Counter(x["service"] for x in lasts))
    ratio = [x["measured"] / x["predicted"] for x in lasts if x["measured"] and x["predicted"]]
    past = [
        (x["measured"] - x["time_left"]) / o["round"]["bound"]
        for o in over
        if (x := o["last"]) is not None and x["measured"] is not None and x["time_left"] is not None
    ]
    out["last_measured_over_predicted_p50_p90"] = [_q(ratio, 0.5), _q(ratio, 0.9)]
    out["last_measured_past_time_left_p50_p90_fraction"] = [_q(past, 0.5), _q(past, 0.9)]
    out["last_unfitted"] = sum(1 for x in lasts if x["cost_samples"] == 0)
    out["last_predicted_over_time_left"] = sum(
        1
        for x in lasts
        if x["predicted"] is not None
        and x["time_left"] is not None
        and x["predicted"] > x["time_left"]
    )
    out["last_agent_wall_over_cpu_p50"] = _q(
        [x["agent_wall"] / x["agent_cpu"] for x in lasts if x["agent_cpu"] > 0], 0.5
    )
    return out


def per_type(traces: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Over every traced batch, per type: the daemon's CPU on the GetRequest that chose it
    and on its completion (p50, p99, ms), and measured / predicted work (p50, p99)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for entries in traces.values():
        for e in entries:
            if "complete_cpu" in e and "get_cpu" in e:
                by.setdefault(str(e["service"]), []).append(e)
    out: dict[str, dict[str, float]] = {}
    for name, es in sorted(by.items()):
        get = [e["get_cpu"] * 1e3 for e in es]
        done = [e["complete_cpu"] * 1e3 for e in es]
        ratio = [e["processing"] / e["predicted"] for e in es if e.get("predicted")]
        out[name] = {
            "batches": len(es),
            "get_cpu_ms_p50": _q(get, 0.5),
            "get_cpu_ms_p99": _q(get, 0.99),
            "complete_cpu_ms_p99": _q(done, 0.99),
            "measured_over_predicted_p50": _q(ratio, 0.5),
            "measured_over_predicted_p99": _q(ratio, 0.99),
        }
    return out


def print_split(s: dict[str, Any]) -> None:
    for name, t in s.get("per_type", {}).items():
        print(
            f"  daemon, {name} ({t['batches']} batches): GetRequest CPU p50/p99 "
            f"{t['get_cpu_ms_p50']:.2f}/{t['get_cpu_ms_p99']:.2f} ms, completion CPU p99 "
            f"{t['complete_cpu_ms_p99']:.2f} ms; measured/predicted work p50/p99 "
            f"{t['measured_over_predicted_p50']:.2f}/{t['measured_over_predicted_p99']:.2f}"
        )
    print(
        f"  CPU-time overrun (agent work + monitor + daemon work, no waiting) p50/p99 "
        f"{s['cpu_time_overrun_p50_fraction']:.1%}/{s['cpu_time_overrun_p99_fraction']:.1%}; "
        f"{s['over_rounds']} of {s['rounds']} rounds over by more than {SPLIT_ABOVE:.0%}"
    )
    print(
        f"  overrun less the agent's and daemon's waits for a CPU (schedstat run delay) p50/p99 "
        f"{s['overrun_less_cpu_wait_p50_fraction']:.1%}/"
        f"{s['overrun_less_cpu_wait_p99_fraction']:.1%} of the bound"
    )
    if "share_of_used" not in s:
        return
    w = s["cpu_wait_share_of_used"]
    print(
        f"  rounds over: waiting for a CPU is {w['agent']:.0%} (agent) + {w['daemon']:.0%} "
        f"(daemon) of their time used, and covers {s['cpu_wait_share_of_overrun']:.0%} of "
        "their overrun"
    )
    share = ", ".join(f"{k} {v:.0%}" for k, v in s["share_of_used"].items())
    print(f"  their time used: {share}")
    med = ", ".join(
        f"{k} {v:.0%}" for k, v in s["median_parts_fraction_of_bound"].items() if v >= 0.005
    )
    print(f"  median part as a fraction of the bound: {med}")
    a, b = s["last_measured_over_predicted_p50_p90"]
    c, e = s["last_measured_past_time_left_p50_p90_fraction"]
    print(
        f"  last batch's type {s['last_type']}; measured/predicted p50/p90 {a:.2f}/{b:.2f}; "
        f"measured past the time left p50/p90 {c:.0%}/{e:.0%} of the bound; unfitted "
        f"{s['last_unfitted']}, predicted over the time left {s['last_predicted_over_time_left']}; "
        f"agent wall/CPU p50 {s['last_agent_wall_over_cpu_p50']:.2f}"
    )
