"""Scenario files (issue 11, load generator): ``vmmem-load --scenario-file FILE`` runs a
scenario written as TOML, validated by the models the built-in scenarios are made of; the
built-in ones ship in ``scenarios/`` and cannot drift from the code; docs/scenarios.md's
field tables are the models'; a bad file is one line naming the field, exit 2."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from vmm_agent.load import scenario_docs, scenario_file
from vmm_agent.load.cli import build_parser, main, make_scenario
from vmm_agent.load.scenarios import SCENARIOS

from .procs import daemons, load_json, run_load

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", SCENARIOS)
def test_builtin_file_is_what_the_code_builds(name: str) -> None:
    """scenarios/NAME.toml loads to exactly the scenario ``--scenario NAME`` builds at the
    default flags, and is byte for byte what the generator writes."""
    path = ROOT / "scenarios" / f"{name}.toml"
    built = make_scenario(build_parser().parse_args(["--scenario", name]))
    loaded = scenario_file.load(path).scenario()
    assert loaded.phases == built.phases
    for attr in ("name", "host_limit", "lowprio", "latency", "passes"):
        assert getattr(loaded, attr) == getattr(built, attr), attr
    assert path.read_text() == scenario_file.builtin_files()[f"{name}.toml"], (
        "regenerate: python -m vmm_agent.load.scenario_file scenarios"
    )


@pytest.mark.timeout(10)
def test_every_builtin_has_a_file_and_a_kind() -> None:
    """One file per built-in scenario, no other; every built-in is a valid ``kind``."""
    assert sorted(p.stem for p in (ROOT / "scenarios").glob("*.toml")) == sorted(SCENARIOS)
    assert set(typing.get_args(scenario_file.Kind)) == set(SCENARIOS)


@pytest.mark.timeout(10)
def test_docs_field_tables_are_up_to_date() -> None:
    """docs/scenarios.md's tables are what the models generate today."""
    doc = ROOT / "docs" / "scenarios.md"
    text = doc.read_text()
    assert scenario_docs.update(text) == text, (
        "regenerate: python -m vmm_agent.load.scenario_docs docs/scenarios.md"
    )
    for model in (scenario_file.ScenarioFile, scenario_file.LowPrioSettings):
        for field in model.model_fields:
            assert f"| `{field}` |" in text


GOOD_PHASE = '[[phases]]\nname = "p"\nduration = 1.0\n'


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read"),
        ('name = "x"\n[[phases]\n', "not TOML"),
        ('name = "x"\n', "phases: Field required"),
        ('name = "x"\nspeed = 3\n' + GOOD_PHASE, "speed: Extra inputs are not permitted"),
        (
            'name = "x"\n' + GOOD_PHASE + GOOD_PHASE + "write_ratio = 2\n",
            "phases[1].write_ratio: Input should be less than or equal to 1",
        ),
        (
            'name = "x"\n' + GOOD_PHASE + "[phases.content]\nzero = 0.5\nunique = 0.9\n",
            "phases[0].content: content mix fractions must add up to 1",
        ),
        ('name = "x"\nkind = "fast"\n' + GOOD_PHASE, "kind: Input should be 'basic'"),
        ('name = "x"\nkind = "numa"\n' + GOOD_PHASE, "phases: kind numa runs exactly 2 phases"),
        ('name = "x"\nhost_limit = "lots"\n' + GOOD_PHASE, "host_limit: "),
        ('name = "x"\n[lowprio]\nsample_pages = 0\n' + GOOD_PHASE, "lowprio.sample_pages: "),
        ('name = "a b"\n' + GOOD_PHASE, "name: String should match pattern"),
    ],
)
def test_bad_file_is_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, message: str
) -> None:
    """Each bad file: exit 2 before connecting to anything, one line on stderr with the file
    and the field, nothing on stdout."""
    path = tmp_path / "bad.toml"
    if text is not None:
        path.write_text(text)
    socket = tmp_path / "none.sock"  # no daemon: a run would fail differently
    assert main(["--socket", str(socket), "--scenario-file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"vmmem-load: {path}: "), err
    assert message in err, err


@pytest.mark.timeout(10)
def test_scenario_and_scenario_file_exclude_each_other(tmp_path: Path) -> None:
    """``--scenario`` with ``--scenario-file``: one line, exit 2."""
    res = run_load("--scenario", "basic", "--scenario-file", str(tmp_path / "x.toml"), timeout=10)
    assert res.returncode == 2 and "not allowed with argument" in res.stderr, res.stderr


CUSTOM = """\
name = "two-step"
description = "write half of memory, then read it back"

[[phases]]
name = "write"
duration = 4.0
working_set = 0.5
distribution = "sequential"
write_ratio = 1.0

[[phases]]
name = "read"
duration = 2.0
working_set = 0.5
write_ratio = 0.0
"""


@pytest.mark.timeout(40)
def test_file_driven_run_end_to_end(short_tmp: Path, mem_dir: Path) -> None:
    """A custom scenario file run on a real daemon and two 16 MiB guests: its phases in
    order, scaled to --duration, the report under the file's name, every page verified."""
    path = short_tmp / "two-step.toml"
    path.write_text(CUSTOM)
    with daemons(short_tmp, mem_dir) as d:
        d.start_platform("--host-memory", "64MiB")
        d.start_agent("a", memory="16MiB")
        d.start_agent("b", memory="16MiB")
        out = short_tmp / "r.json"
        res = run_load(
            "--socket", str(d.socket), "--expect-vms", "2", "--scenario-file", str(path),
            "--duration", "1.5", "--json", str(out), "--no-progress", timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
    report = load_json(out)
    assert report["scenario"] == "two-step" and report["ok"], report["verdict"]
    assert [p["name"] for p in report["phases"]] == ["write", "read"]
    # 4 s and 2 s scaled to 1.5 s in total: the phases the run was given.
    scaled = scenario_file.load(path).scenario(duration=1.5)
    assert [p.duration for p in scaled.phases] == [1.0, 0.5]
    assert "scenario two-step" in res.stdout
    for vm in report["vms"].values():
        # The write phase wrote half of the 4,096 pages, sequentially; all read back.
        assert vm["pages_written"] > 0
        assert vm["verification"]["pages_verified"] == vm["pages_written"]
