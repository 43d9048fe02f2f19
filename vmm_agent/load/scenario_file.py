"""Scenario files: a scenario as TOML (``vmmem-load --scenario-file FILE``).

A file holds what a built-in scenario is made of (scenarios.Scenario): its phases, each a
``shared.workload.Phase`` (the model the agent validates too), and the host settings it
needs. ``kind`` says which built-in scenario's runner and report sections the file uses:
``basic`` and ``overcommit`` run the phases in order; ``sharing``, ``latency`` and
``sampling`` also add their report section; ``balloon``, ``numa`` and ``hugepages`` have
their own runner, which expects their phases.

The built-in scenarios ship as files in ``scenarios/``, written from the code at the
default flags (``python -m vmm_agent.load.scenario_file scenarios``); a test checks that
each file loads to what the code builds, so they cannot drift. ``--scenario NAME`` still
builds from the code (it scales to ``--duration`` and takes the scenario's own flags).
"""

from __future__ import annotations

import math
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.sizes import parse_size
from shared.workload import Phase

from .scenarios import BALLOON_PASSES, SCENARIOS, Scenario

Kind = Literal[
    "basic", "overcommit", "sharing", "latency", "sampling", "balloon", "numa", "hugepages"
]
#: Phases each runner with its own phase layout expects.
PHASE_COUNTS = {"numa": 2, "hugepages": 3}


class LowPrioSettings(BaseModel):
    """Daemon settings for the run (``set_lowprio``), restored afterwards; the daemon checks
    them again with the same bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_period: float | None = Field(
        default=None, gt=0, le=86400, description="seconds of guest time per sampling period"
    )
    sample_pages: int | None = Field(
        default=None, ge=1, le=1 << 20, description="pages per working-set sample"
    )
    share_scan_period: float | None = Field(
        default=None, gt=0, le=86400, description="seconds between page-sharing scans of a VM"
    )
    numa_migrate_rate: float | None = Field(
        default=None, ge=0, le=1 << 24, description="pages per second NUMA migration may move"
    )


class ScenarioFile(BaseModel):
    """A scenario file's top level."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the scenario's name in the report (letters, digits, _ . -)",
    )
    kind: Kind = Field(
        default="basic",
        description="the built-in scenario whose runner and report sections are used",
    )
    description: str = Field(default="", description="free text for people")
    host_limit: str | None = Field(
        default=None,
        description="memory the host may use during the run, e.g. 128MiB (--host-limit "
        "overrides it)",
    )
    lowprio: LowPrioSettings = Field(
        default_factory=LowPrioSettings, description="daemon settings for the run"
    )
    latency: list[int] = Field(
        default_factory=list,
        description="latency sensitivities given to the VMs in turn (kind latency)",
    )
    passes: list[Literal["balloon", "swap"]] = Field(
        default_factory=list, description="the balloon runner's passes (kind balloon)"
    )
    phases: list[Phase] = Field(min_length=1, description="the phases, run in order")

    @field_validator("host_limit")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and parse_size(value) <= 0:
            raise ValueError("must be more than 0 bytes")
        return value

    @field_validator("latency")
    @classmethod
    def _sensitivities(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError("sensitivities are >= 0")
        return value

    def check_kind(self) -> None:
        """What a runner needs of its phases (ValueError naming the field)."""
        want = PHASE_COUNTS.get(self.kind)
        if want is not None and len(self.phases) != want:
            raise ValueError(f"phases: kind {self.kind} runs exactly {want} phases")
        if self.kind == "balloon" and not self.passes:
            raise ValueError(f"passes: kind balloon needs passes, some of {BALLOON_PASSES}")
        if self.passes and self.kind != "balloon":
            raise ValueError("passes: only kind balloon has passes")

    def scenario(self, duration: float | None = None, host_limit: str | None = None) -> Scenario:
        """The Scenario to run; ``duration`` scales the phases to that total."""
        phases = list(self.phases)
        if duration is not None:
            scale = duration / sum(p.duration for p in phases)
            phases = [
                Phase.model_validate({**p.model_dump(), "duration": p.duration * scale})
                for p in phases
            ]
        return Scenario(
            self.kind,
            phases,
            host_limit=host_limit or self.host_limit,
            lowprio=self.lowprio.model_dump(exclude_none=True),
            latency=tuple(self.latency),
            passes=tuple(self.passes),
            title=self.name,
        )


class ScenarioFileError(Exception):
    """A scenario file that cannot be used; the message names the file and the field."""


def load(path: Path) -> ScenarioFile:
    """The validated file, or ScenarioFileError with one line naming the field."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioFileError(f"{path}: not TOML: {exc}") from None
    try:
        parsed = ScenarioFile.model_validate(data)
        parsed.check_kind()
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        where = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
        ).lstrip(".")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise ScenarioFileError(f"{path}: {where or 'file'}: {msg}{more}") from None
    except ValueError as exc:
        raise ScenarioFileError(f"{path}: {exc}") from None
    return parsed


def from_scenario(scenario: Scenario, description: str = "") -> ScenarioFile:
    """The file that describes ``scenario``."""
    return ScenarioFile(
        name=scenario.title or scenario.name,
        kind=scenario.name,  # a built-in name: checked by pydantic
        description=description,
        host_limit=scenario.host_limit,
        lowprio=LowPrioSettings.model_validate(scenario.lowprio),
        latency=list(scenario.latency),
        passes=list(scenario.passes),
        phases=scenario.phases,
    )


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"no TOML for {v}")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _pairs(d: dict[str, Any]) -> list[str]:
    return [f"{k} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict)]


def to_toml(sf: ScenarioFile) -> str:
    """The file's TOML: the settings that differ from the defaults (a phase always says its
    name and duration), in the models' field order."""
    top = sf.model_dump(exclude_defaults=True, exclude={"phases", "lowprio"})
    lines = ["# A vmmem-load scenario file: see docs/scenarios.md.", *_pairs(top)]
    lowprio = sf.lowprio.model_dump(exclude_none=True)
    if lowprio:
        lines += ["", "[lowprio]", *_pairs(lowprio)]
    for phase in sf.phases:
        d = phase.model_dump(exclude_defaults=True)
        d = {"name": phase.name, "duration": phase.duration, **d}
        lines += ["", "[[phases]]", *_pairs(d)]
        if "content" in d:
            lines += ["[phases.content]", *_pairs(phase.content.model_dump())]
    return "\n".join(lines) + "\n"


def builtin_files() -> dict[str, str]:
    """Each built-in scenario's file name and TOML, at the default flags."""
    from .cli import build_parser, make_scenario  # the CLI's defaults are the scenarios'

    files = {}
    for name in SCENARIOS:
        args = build_parser().parse_args(["--scenario", name])
        sf = from_scenario(make_scenario(args), f"the built-in scenario {name}, default flags")
        files[f"{name}.toml"] = to_toml(sf)
    return files


def main(argv: list[str]) -> int:
    """``python -m vmm_agent.load.scenario_file DIR``: write the built-in scenario files."""
    if len(argv) != 1:
        print("usage: python -m vmm_agent.load.scenario_file DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(exist_ok=True)
    for name, text in builtin_files().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
