"""The balloon scenario end to end (issue 8): real daemons, real swap file, two idle and two
busy VMs of equal shares under a host limit lowered while they run, ballooning on, then
swap only; every page verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmm_agent.load.cli import build_parser, main, make_scenario

from .procs import daemons, load_json, run_load


def _by_role(p: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [v for v in p["vms"].values() if v["role"] == role]


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_balloon_scenario_idle_first_backoff_and_swap_only_pass(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Idle VMs give first and give more (the idle tax), in both passes; with ballooning on
    the idle VMs give by balloon, and some VM backs off (its guest is hurt: the report shows
    when); the swap-only pass reclaims by swap alone; the guests never touch a ballooned
    page, and every page verifies."""
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform(
            "--host-memory",
            "96MiB",
            "--swap-file",
            str(short_tmp / "swap"),
            "--swap-size",
            "128MiB",
        )
        for name in "abcd":  # a, c idle; b, d busy (roles by name, in turn)
            d.start_agent(name, memory="16MiB", vcpus=2)
        out = short_tmp / "r.json"
        res = run_load(
            "--socket",
            str(d.socket),
            "--scenario",
            "balloon",
            "--expect-vms",
            "4",
            "--duration",
            "12",
            "--json",
            str(out),
            "--no-progress",
            timeout=140,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        report = load_json(out)
        assert report["verification"]["mismatches"] == 0
        assert report["verification"]["unreachable"] == 0
        section = report["balloon"]
        assert list(section["passes"]) == ["balloon", "swap"]
        for name, p in section["passes"].items():
            assert not p["missing"], (name, p["missing"])
            idle, busy = p["idle"], p["busy"]
            # Idle VMs first, and more: min-funding revocation with the idle memory tax,
            # which ranks every idle VM below every busy one (rho, from sampled working sets).
            assert p["idle_tax"]["first_to_give"] == "idle", (name, p["idle_tax"])
            assert idle["frames_freed"] > busy["frames_freed"], (name, idle, busy)
            idle_rho = max(v["rho_at_start"] for v in _by_role(p, "idle"))
            assert idle_rho < min(v["rho_at_start"] for v in _by_role(p, "busy")), name
            for v in p["vms"].values():
                assert v["balloon_touches"] == 0  # never a guest access to a ballooned page
        on, off = section["passes"]["balloon"], section["passes"]["swap"]
        idle_on = _by_role(on, "idle")
        assert sum(v["reclaimed"]["balloon"] for v in idle_on) > sum(
            v["reclaimed"]["swap"] for v in idle_on
        ), idle_on
        # Back-off seen: some VM's balloon backed off during reclaim, and when is shown.
        assert on["backed_off"], on["vms"]
        backed = on["vms"][on["backed_off"][0]]
        assert backed["backed_off_at"] is not None
        assert f"{backed['backed_off_at']:.1f}s" in res.stdout
        # Swap only: nothing ballooned, idle VMs swapped.
        for v in off["vms"].values():
            assert v["reclaimed"]["balloon"] == 0 and v["balloon_pages"]["peak"] == 0, v
        for v in _by_role(off, "idle"):
            assert v["reclaimed"]["swap"] > 0, v
        assert "pass 'balloon' (ballooning on)" in res.stdout
        assert "pass 'swap' (swap only)" in res.stdout
        assert "busy VMs, ballooning on vs swap only" in res.stdout


def test_no_balloon_runs_the_swap_pass_alone() -> None:
    """``--no-balloon`` is the swap-only pass alone; with another scenario it is refused."""
    args = build_parser().parse_args(["--scenario", "balloon", "--no-balloon"])
    assert make_scenario(args).passes == ("swap",)
    both = build_parser().parse_args(["--scenario", "balloon", "--duration", "8"])
    scenario = make_scenario(both)
    assert scenario.passes == ("balloon", "swap")
    assert sum(p.duration for p in scenario.phases) == pytest.approx(8.0)


def test_no_balloon_with_another_scenario_is_one_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--scenario", "overcommit", "--no-balloon"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--no-balloon is for --scenario balloon" in err and err.count("\n") == 1
