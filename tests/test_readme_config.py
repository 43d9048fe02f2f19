"""The README's configuration reference is what tools/config_reference.py makes of the models.

A setting added, renamed, re-defaulted or re-described in shared/config.py without running
``python -m tools.config_reference`` fails here, so the README cannot drift.
"""

from __future__ import annotations

import pytest

from shared.config import AgentConfig, PlatformConfig
from tools import config_reference as ref


@pytest.mark.timeout(20)
def test_readme_block_is_what_the_generator_writes() -> None:
    """README.md between the markers equals the generated reference, byte for byte."""
    text = ref.README.read_text()
    assert ref.rewrite(text) == text, (
        "README.md's configuration reference is out of date: run python -m tools.config_reference"
    )


@pytest.mark.timeout(20)
def test_every_setting_has_a_row_with_a_description() -> None:
    """Each field of both models is a row, and none lacks its ``#:`` description."""
    block = ref.reference()
    for model in (PlatformConfig, AgentConfig):
        rows = ref.table(model, set())
        names = [row.split("|")[1].strip().strip("`") for row in rows[2:]]
        assert sorted(names) == sorted(model.model_fields), model.__name__
        for row in rows[2:]:
            assert row.split("|")[5].strip(), f"{model.__name__}: no description in {row}"
            assert row.split("|")[1] in block
    assert '| `host_memory` | `--host-memory` | size | `"256MiB"` |' in block
    assert "| `numa_nodes` | `--numa-nodes` | integer, 1 to 64 | `2` |" in block
    assert "| `swap_file` | `--swap-file` | path or none | none |" in block


def test_rewrite_replaces_only_the_block_and_needs_its_markers() -> None:
    """Text outside the markers is kept; a README without exactly one block is refused."""
    text = f"before\n{ref.START}\nstale\n{ref.END}\nafter\n"
    new = ref.rewrite(text)
    assert new.startswith(f"before\n{ref.START}\n") and new.endswith(f"{ref.END}\nafter\n")
    assert "stale" not in new and ref.rewrite(new) == new
    for bad in ("no markers", f"{ref.END}{ref.START}", f"{ref.START}{ref.END}{ref.START}"):
        with pytest.raises(ValueError, match="config-reference"):
            ref.rewrite(bad)
