"""Sizes and settings: CLI over VMMEM_* environment over the TOML file over defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.config import AgentConfig, PlatformConfig, load_settings
from shared.constants import PAGE_SIZE
from shared.sizes import format_size, parse_size

MiB = 1 << 20


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No VMMEM_* variable from the caller's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("VMMEM_"):
            monkeypatch.delenv(key)
    yield


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmmem.toml"
    path.write_text(text)
    return path


# ---- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("256MiB", 256 * MiB),
        ("1GiB", 1 << 30),
        ("1GB", 1 << 30),
        ("1g", 1 << 30),
        ("64 mb", 64 * MiB),
        (" 2TiB ", 2 << 40),
        ("3k", 3 << 10),
        ("12b", 12),
        ("1.5GiB", 3 << 29),
        ("0.5KiB", 512),
        (8192, 8192),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    """Sizes take an optional binary unit, any case, with optional spaces and fractions."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "MiB",
        "-1",
        "1e3",
        "1.5.2",
        "12XB",
        "1 2",
        "0x10",
        "ten",
        -1,
        1.5,
        None,
        True,
        "9" * 5000,
        "9" * 5000 + ".5",
    ],
)
def test_parse_size_bad_input(bad: object) -> None:
    """Anything that is not a non-negative size raises ValueError (never another exception)."""
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 1 << 70), unit=st.sampled_from(["", "b", "KiB", "MiB", "GiB", "TiB"]))
def test_parse_size_exact(n: int, unit: str) -> None:
    """Whole numbers parse exactly, however large (no float rounding)."""
    factor = {"": 1, "b": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit]
    assert parse_size(f"{n}{unit}") == n * factor


def test_parse_size_huge_is_exact() -> None:
    """A number far beyond 64 bits still parses exactly, fractions included (never inf)."""
    assert parse_size("9" * 400) == int("9" * 400)
    assert parse_size("9" * 400 + ".5k") == int("9" * 400) * 1024 + 512


@pytest.mark.parametrize("n", [0, 1, 1023, 4096, 64 * MiB, 3 << 29, 1 << 40])
def test_format_size_reads_back(n: int) -> None:
    """format_size gives a string parse_size turns back into the same number of bytes."""
    assert parse_size(format_size(n)) == n


# ---- defaults -----------------------------------------------------------------------------


def test_platform_defaults() -> None:
    """With no CLI, environment or file, the platform gets the documented defaults."""
    cfg = load_settings(PlatformConfig, {})
    assert cfg.host_memory == 256 * MiB
    assert cfg.host_pages == 256 * MiB // PAGE_SIZE
    assert cfg.numa_nodes == 2
    assert cfg.swap_file is None and cfg.swap_size == 0
    assert (cfg.free_high_pct, cfg.free_soft_pct, cfg.free_hard_pct, cfg.free_low_pct) == (
        6.0,
        4.0,
        2.0,
        1.0,
    )


def test_agent_defaults() -> None:
    """The agent's defaults, and its control socket beside the daemon socket."""
    cfg = load_settings(AgentConfig, {})
    assert cfg.name == "vm0" and cfg.guest_pages == 64 * MiB // PAGE_SIZE
    assert cfg.control_socket_path == Path("/tmp/vmmem-vm-vm0.sock")


# ---- precedence ---------------------------------------------------------------------------


def test_toml_over_defaults(tmp_path: Path) -> None:
    """Keys of the TOML file's [platform] table override defaults; dashes become underscores."""
    path = write_toml(tmp_path, '[platform]\nhost-memory = "512MiB"\nnuma_nodes = 4\n')
    cfg = load_settings(PlatformConfig, {}, path)
    assert cfg.host_memory == 512 * MiB and cfg.numa_nodes == 4


def test_env_over_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VMMEM_* variable overrides the TOML file; unset keys still come from the file."""
    path = write_toml(tmp_path, '[platform]\nhost-memory = "512MiB"\nnuma_nodes = 4\n')
    monkeypatch.setenv("VMMEM_HOST_MEMORY", "1GiB")
    cfg = load_settings(PlatformConfig, {}, path)
    assert cfg.host_memory == 1 << 30 and cfg.numa_nodes == 4


def test_cli_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI overrides beat the environment and the file; None means the flag was not given."""
    path = write_toml(tmp_path, '[platform]\nhost-memory = "512MiB"\nnuma_nodes = 4\n')
    monkeypatch.setenv("VMMEM_HOST_MEMORY", "1GiB")
    monkeypatch.setenv("VMMEM_NUMA_NODES", "3")
    cfg = load_settings(PlatformConfig, {"host_memory": "2GiB", "numa_nodes": None}, path)
    assert cfg.host_memory == 2 << 30
    assert cfg.numa_nodes == 3


def test_full_precedence_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each field takes the highest source that sets it: CLI > env > TOML > default."""
    path = write_toml(
        tmp_path, "[platform]\nslot_count = 8\nslot_capacity = 64\nmetrics_port = 1234\n"
    )
    monkeypatch.setenv("VMMEM_SLOT_CAPACITY", "128")
    monkeypatch.setenv("VMMEM_METRICS_PORT", "2345")
    cfg = load_settings(PlatformConfig, {"metrics_port": 3456}, path)
    assert cfg.metrics_port == 3456  # CLI
    assert cfg.slot_capacity == 128  # env
    assert cfg.slot_count == 8  # TOML
    assert cfg.max_fault_around == 16  # default
    assert cfg.slot_capacity_of(1 << 20) == 128  # set: every VM, whatever its size


def test_slot_capacity_unset_follows_each_guest() -> None:
    """No slot capacity configured: each VM's comes from its guest size."""
    cfg = PlatformConfig()
    assert cfg.slot_capacity is None
    assert [cfg.slot_capacity_of(p) for p in (4096, 65536, 1 << 20)] == [512, 2048, 4096]


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit path, VMMEM_CONFIG names the TOML file."""
    path = write_toml(tmp_path, "[platform]\nnuma_nodes = 5\n")
    monkeypatch.setenv("VMMEM_CONFIG", str(path))
    assert load_settings(PlatformConfig, {}).numa_nodes == 5


def test_explicit_config_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config path given by the caller (--config) wins over VMMEM_CONFIG."""
    env_file = tmp_path / "env.toml"
    env_file.write_text("[platform]\nnuma_nodes = 5\n")
    monkeypatch.setenv("VMMEM_CONFIG", str(env_file))
    path = write_toml(tmp_path, "[platform]\nnuma_nodes = 6\n")
    assert load_settings(PlatformConfig, {}, path).numa_nodes == 6


def test_sections_per_daemon(tmp_path: Path) -> None:
    """The platform reads [platform] and the agent reads [vmm] from the same file."""
    path = write_toml(
        tmp_path, '[platform]\nnuma_nodes = 3\n\n[vmm]\nname = "web"\nmemory = "32MiB"\n'
    )
    assert load_settings(PlatformConfig, {}, path).numa_nodes == 3
    agent = load_settings(AgentConfig, {}, path)
    assert agent.name == "web" and agent.memory == 32 * MiB


def test_flat_toml_without_sections(tmp_path: Path) -> None:
    """A file without tables applies its top-level keys."""
    path = write_toml(tmp_path, 'vcpus = 4\nname = "db"\n')
    agent = load_settings(AgentConfig, {}, path)
    assert agent.vcpus == 4 and agent.name == "db"


def test_env_sizes_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes and paths are parsed from environment strings."""
    monkeypatch.setenv("VMMEM_SWAP_FILE", "/tmp/swap")
    monkeypatch.setenv("VMMEM_SWAP_SIZE", "64MiB")
    cfg = load_settings(PlatformConfig, {})
    assert cfg.swap_file == Path("/tmp/swap") and cfg.swap_size == 64 * MiB


def test_unknown_toml_key_rejected(tmp_path: Path) -> None:
    """A misspelt key in the TOML file is an error, not silently ignored."""
    path = write_toml(tmp_path, "[platform]\nnuma_node = 3\n")
    with pytest.raises(ValidationError):
        load_settings(PlatformConfig, {}, path)


def test_result_is_the_plain_class() -> None:
    """load_settings returns an instance of the class asked for, frozen."""
    cfg = load_settings(PlatformConfig, {"numa_nodes": 1})
    assert type(cfg) is PlatformConfig
    with pytest.raises(ValidationError):
        cfg.numa_nodes = 2  # type: ignore[misc]


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pcts",
    [
        {"free_high_pct": 3.0},  # high < soft
        {"free_soft_pct": 1.0, "free_hard_pct": 1.5},  # soft < hard
        {"free_low_pct": 2.5},  # low > hard
    ],
)
def test_thresholds_out_of_order(pcts: dict[str, float]) -> None:
    """Free thresholds must satisfy high >= soft >= hard >= low."""
    with pytest.raises(ValidationError, match="high >= soft >= hard >= low"):
        load_settings(PlatformConfig, pcts)


def test_equal_thresholds_allowed() -> None:
    """Equal thresholds are in order."""
    cfg = load_settings(
        PlatformConfig,
        {"free_high_pct": 2, "free_soft_pct": 2, "free_hard_pct": 2, "free_low_pct": 2},
    )
    assert cfg.free_low_pct == 2


def test_threshold_out_of_range() -> None:
    """A threshold above 100 % is rejected."""
    with pytest.raises(ValidationError):
        load_settings(PlatformConfig, {"free_high_pct": 101})


def test_swap_size_without_file() -> None:
    """A swap size without a swap file is an error."""
    with pytest.raises(ValidationError, match="--swap-file"):
        load_settings(PlatformConfig, {"swap_size": "64MiB"})


def test_swap_file_with_size() -> None:
    """A swap file with a size is accepted."""
    cfg = load_settings(PlatformConfig, {"swap_size": "64MiB", "swap_file": "/tmp/s"})
    assert cfg.swap_size == 64 * MiB


@pytest.mark.parametrize(("memory", "nodes"), [("1MiB", 1), ("2MiB", 2), ("4095", 1)])
def test_host_memory_too_small(memory: str, nodes: int) -> None:
    """Host memory must give every NUMA node at least 2 MiB."""
    with pytest.raises(ValidationError, match="too small"):
        load_settings(PlatformConfig, {"host_memory": memory, "numa_nodes": nodes})


def test_host_memory_minimum_accepted() -> None:
    """Exactly 2 MiB per node is enough."""
    cfg = load_settings(PlatformConfig, {"host_memory": "4MiB", "numa_nodes": 2})
    assert cfg.host_pages == 1024


@pytest.mark.parametrize("value", ["lots", "-5MiB", 2.5])
def test_bad_size_is_a_validation_error(value: object) -> None:
    """A size that does not parse is reported as a ValidationError by the settings."""
    with pytest.raises(ValidationError):
        load_settings(PlatformConfig, {"host_memory": value})


def test_bad_size_in_toml(tmp_path: Path) -> None:
    """A float size in the TOML file is a ValidationError, not a TypeError."""
    path = write_toml(tmp_path, "[platform]\nhost-memory = 268435456.0\n")
    with pytest.raises(ValidationError):
        load_settings(PlatformConfig, {}, path)


def test_agent_memory_below_a_page() -> None:
    """Guest memory must be at least one page."""
    with pytest.raises(ValidationError, match="at least one page"):
        load_settings(AgentConfig, {"memory": "4000"})


def test_agent_bad_name() -> None:
    """A VM name outside [A-Za-z0-9_.-]{1,64} is rejected."""
    with pytest.raises(ValidationError):
        load_settings(AgentConfig, {"name": "a b"})
