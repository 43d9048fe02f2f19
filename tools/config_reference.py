"""Write the README's configuration reference from the settings models, so it cannot drift.

Each setting of ``PlatformConfig`` and ``AgentConfig`` (shared/config.py) becomes one table
row: its TOML key, its flag (when the daemon's command line has one), type and bounds,
default, and description. Types, bounds and defaults come from the pydantic models; the
descriptions from the ``#:`` comments above each field, read with ``ast`` (pydantic does
not keep comments). ``tests/test_readme_config.py`` fails when README.md's block differs.

    python -m tools.config_reference          # rewrite the block in README.md
    python -m tools.config_reference --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import ast
import sys
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic.fields import FieldInfo

from platform_daemon.cli import build_parser as platform_parser
from shared import config
from shared.config import AgentConfig, PlatformConfig, _Base
from shared.sizes import format_size
from vmm_agent.cli import build_parser as agent_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "path"}


def field_comments(source: str) -> dict[str, dict[str, str]]:
    """Per class, per field: the ``#:`` comment lines right above it, joined."""
    lines = source.splitlines()
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above: list[str] = []
                i = stmt.lineno - 2  # the line above, 0-based
                while i >= 0 and lines[i].strip().startswith("#:"):
                    above.insert(0, lines[i].strip()[2:].strip())
                    i -= 1
                fields[stmt.target.id] = " ".join(above)
    return out


def describe_type(info: FieldInfo, annotation_text: str) -> str:
    """``integer, 1..64``, ``size``, ``path or none``, ``one of `a`, `b```."""
    ann = info.annotation
    optional = False
    args = typing.get_args(ann)
    if type(None) in args:
        optional = True
        ann = next(a for a in args if a is not type(None))
    if annotation_text == "Size":
        text = "size"
    elif typing.get_origin(ann) is typing.Literal:
        text = "one of " + ", ".join(f"`{v}`" for v in typing.get_args(ann))
    elif typing.get_origin(ann) is list:
        inner = typing.get_args(typing.get_args(ann)[0])[:1] or typing.get_args(ann)
        text = f"list of {TYPE_NAMES.get(inner[0], str(inner[0]))}s"
    else:
        text = TYPE_NAMES.get(ann, str(ann))  # type: ignore[arg-type]
    bounds = _bounds(info) if annotation_text != "Size" else ""
    return text + (f", {bounds}" if bounds else "") + (" or none" if optional else "")


def _bounds(info: FieldInfo) -> str:
    lo = hi = ""
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = f"{_number(m.ge)}"
        elif isinstance(m, at.Gt):
            lo = f">{_number(m.gt)}"
        elif isinstance(m, at.Le):
            hi = f"{_number(m.le)}"
        elif isinstance(m, at.Lt):
            hi = f"<{_number(m.lt)}"
    if lo and hi:
        return f"{lo} to {hi}"
    if lo:
        return lo if lo.startswith(">") else f">={lo}"
    return hi if not hi or hi.startswith("<") else f"<={hi}"


def _number(v: Any) -> str:
    if isinstance(v, int) and v >= 1 << 16 and (v & (v - 1)) == 0:
        return f"2^{v.bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def default_value(info: FieldInfo, annotation_text: str) -> str:
    """The default as it would be written in the TOML file."""
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if annotation_text == "Size" and value:
        return f'`"{format_size(value)}"`'
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    return f"`{value!r}`" if not isinstance(value, float) else f"`{value:g}`"


def table(model: type[_Base], flags: set[str]) -> list[str]:
    """One Markdown row per field of ``model``: its own fields first, then the shared ones."""
    source = Path(config.__file__).read_text()
    comments = field_comments(source)
    tree = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    order = [model.__name__, "_Base"]
    rows = [
        "| key | flag | type | default | description |",
        "|---|---|---|---|---|",
    ]
    for cls in order:
        for stmt in tree[cls].body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            info = model.model_fields[name]
            ann = ast.get_source_segment(source, stmt.annotation) or ""
            flag = "--" + name.replace("_", "-")
            cells = [
                f"`{name}`",
                f"`{flag}`" if flag in flags else "-",
                describe_type(info, ann),
                default_value(info, ann),
                comments[cls].get(name, "").replace("``", "`").replace("|", "\\|"),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def reference() -> str:
    """The generated block (without its markers)."""
    lines = [
        "<!-- generated by `python -m tools.config_reference` from shared/config.py:"
        " edit the models, then run it -->",
        "",
        "Each setting is a TOML key (in the file named by `--config` or `VMMEM_CONFIG`), an",
        "environment variable (`VMMEM_` and the key in capitals: `VMMEM_HOST_MEMORY`) and,",
        "where a flag is named, a command-line flag; a flag wins over the environment, the",
        "environment over the file. Sizes accept `4096`, `64MiB`, `1GiB`.",
        "",
        "### `vmmem-platform`: table `[platform]`",
        "",
        *table(PlatformConfig, _flags(platform_parser())),
        "",
        "### `vmmem-vmm`: table `[vmm]`",
        "",
        *table(AgentConfig, _flags(agent_parser())),
    ]
    return "\n".join(lines)


def rewrite(text: str) -> str:
    """``text`` with the block between the markers replaced by the generated reference."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs exactly one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{reference()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = p.parse_args(argv)
    text = README.read_text()
    new = rewrite(text)
    if args.check:
        if new != text:
            print(
                "README.md: the configuration reference is out of date; run "
                "python -m tools.config_reference",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
