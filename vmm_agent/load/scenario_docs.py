"""The field tables of docs/scenarios.md, generated from the scenario file's models.

Types, defaults and bounds come from the pydantic models themselves; the descriptions from
the models' ``description`` or, for ``shared.workload`` (whose fields are described in
comments), from ``PHASE_HELP`` here: a Phase field without one fails the generator, so a new
field cannot go undocumented. ``python -m vmm_agent.load.scenario_docs docs/scenarios.md``
rewrites the tables between their markers; a test checks the file is up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shared.workload import ContentMix, Phase

from .scenario_file import LowPrioSettings, ScenarioFile

PHASE_HELP = {
    "name": "the phase's name in progress lines and the report",
    "duration": "seconds",
    "working_set": "fraction of guest memory the anonymous accesses cover, from `offset`",
    "offset": "where the working set starts, a fraction of guest memory",
    "distribution": "how accesses pick pages in the working set",
    "zipf_s": "the zipf distribution's exponent (a larger one: a hotter head)",
    "write_ratio": "fraction of accesses that write",
    "content": "what writes store: the `[phases.content]` table below",
    "vcpus": "vCPUs that run the phase (0: all the agent has)",
    "think_us": "guest think time per access, microseconds",
    "pinned_pages": "pages pinned in translation at any time (a device-I/O model)",
    "pin_seconds": "how long a page stays pinned",
    "cache": "the guest page cache's most memory, a fraction of guest memory",
    "cache_ratio": "fraction of accesses that read file blocks through the page cache",
    "refault_ms": "a page-cache miss's simulated disk read, ms",
    "anon_freed": "fraction of the anonymous working set the guest frees when the phase ends",
    "seed": "the random seed of the phase's accesses",
}
CONTENT_HELP = {
    "zero": "fraction of writes that store a zero page",
    "duplicate": "fraction of writes that store a page from a small corpus (shareable)",
    "unique": "fraction of writes that store unique bytes",
}
#: The tables: their marker name, model, and where their descriptions come from.
TABLES: list[tuple[str, type[BaseModel], dict[str, str] | None]] = [
    ("top", ScenarioFile, None),
    ("lowprio", LowPrioSettings, None),
    ("phase", Phase, PHASE_HELP),
    ("content", ContentMix, CONTENT_HELP),
]


def _type(annotation: Any) -> str:
    """A field's type in TOML's words."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        named = [_type(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (optional)" if type(None) in args else "")
    if origin is list:
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return "array of tables"
        return f"array of {_type(inner)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
        return "(table)" if isinstance(value, BaseModel) else f"`{value!r}`"
    if info.default is PydanticUndefined:
        return "required"
    return "none" if info.default is None else f"`{info.default!r}`"


def _bounds(info: FieldInfo) -> str:
    parts = []
    for m in info.metadata:
        for kind, sign in ((Gt, ">"), (Ge, ">="), (Lt, "<"), (Le, "<=")):
            if isinstance(m, kind):
                parts.append(f"{sign} {getattr(m, kind.__name__.lower())}")
    return ", ".join(parts)


def table(model: type[BaseModel], help_text: dict[str, str] | None) -> str:
    """A Markdown table of ``model``'s fields: name, type, default, bounds, meaning."""
    rows = ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        meaning = info.description if help_text is None else help_text[name]
        if not meaning:
            raise KeyError(f"{model.__name__}.{name} has no description")
        kind = _type(info.annotation)
        rows.append(f"| `{name}` | {kind} | {_default(info)} | {_bounds(info)} | {meaning} |")
    return "\n".join(rows)


def update(text: str) -> str:
    """``text`` with every generated table replaced by the models' current one."""
    for marker, model, help_text in TABLES:
        begin, end = f"<!-- fields:{marker} -->", f"<!-- /fields:{marker} -->"
        head, sep, rest = text.partition(begin)
        _, sep2, tail = rest.partition(end)
        if not sep or not sep2:
            raise ValueError(f"no {begin} ... {end} in the document")
        text = f"{head}{begin}\n{table(model, help_text)}\n{end}{tail}"
    return text


def main(argv: list[str]) -> int:
    """Rewrite the tables of the Markdown file ``argv[0]``."""
    if len(argv) != 1:
        print("usage: python -m vmm_agent.load.scenario_docs docs/scenarios.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(update(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
