"""Configuration models: CLI flags over ``VMMEM_*`` environment over an optional TOML file.

Each daemon's CLI parses its flags with argparse (for a useful ``--help``) and hands the ones
the user gave to ``load_settings``; unset flags fall through to the environment, then to the
TOML file named by ``--config`` or ``VMMEM_CONFIG``, then to the defaults here.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .constants import DEFAULT_SLOT_COUNT, MAX_FAULT_AROUND, PAGE_SIZE
from .layout import slot_capacity_for
from .sizes import parse_size

Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
#: Most frames of machine memory, and most swap slots: the daemon's p2m stores both as int32
#: (``platform_daemon/p2m.py``), so 2**31 of each (8 TiB of 4 KiB pages).
MAX_P2M_NUMBERS = 1 << 31
LogFormat = Literal["auto", "json", "console"]


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMMEM_", extra="forbid", frozen=True)

    #: Log lines as JSON or for people (auto: JSON unless stderr is a terminal).
    log_format: LogFormat = "auto"
    #: The least severe log events written.
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class PlatformConfig(_Base):
    """Settings of the platform daemon (one per host)."""

    #: The Unix socket agents and ``vmmem-ctl`` connect to.
    socket: Path = Path("/tmp/vmmem.sock")
    #: Machine memory to manage (a shared file of 4 KiB frames).
    host_memory: Size = 256 << 20
    #: NUMA nodes machine memory is split into.
    numa_nodes: int = Field(default=2, ge=1, le=64)
    #: Prometheus port on 127.0.0.1 (0: a free port; -1: no metrics).
    metrics_port: int = Field(default=9470, ge=-1, le=65535)
    #: Directory of the shared memory files (machine memory, p2ms, control regions).
    mem_dir: Path = Path("/dev/shm")
    #: Back all of machine memory with RAM at startup, as a host's memory is.
    prefault: bool = True
    #: PageList slots in each VM's control region.
    slot_count: int = Field(default=DEFAULT_SLOT_COUNT, ge=1, le=256)
    #: Pages per PageList batch, for every VM; none: scaled to each guest
    #: (``shared.layout.slot_capacity_for``: 1/32 of it, 512 to 4096).
    slot_capacity: int | None = Field(default=None, ge=1, le=1 << 16)
    #: Faults one VM may have unanswered at once.
    max_outstanding_faults: int = Field(default=256, ge=1)
    #: Largest guest a VM may register: its p2m costs 15 bytes per page of daemon memory.
    max_guest_memory: Size = 64 << 30
    #: Most neighbour pages one fault may map along with its own.
    max_fault_around: int = Field(default=16, ge=0, le=MAX_FAULT_AROUND)
    #: Most pages a swap-in reads ahead: the window starts at the fault's fault-around and
    #: doubles while the guest keeps faulting just past it (a sequential walk), up to this.
    swap_readahead_max: int = Field(default=MAX_FAULT_AROUND, ge=0, le=MAX_FAULT_AROUND)
    #: The swap file (created at start, removed at exit); none: no swap.
    swap_file: Path | None = None
    #: Size of the swap file (needs ``swap_file``).
    swap_size: Size = 0
    #: Free-memory thresholds in percent of host memory (high, soft, hard, low), after ESX.
    #: At or above high: reclaim stops.
    free_high_pct: float = Field(default=6.0, ge=0, le=100)
    #: Below this: the soft state (ballooning).
    free_soft_pct: float = Field(default=4.0, ge=0, le=100)
    #: Below this: the hard state (swapping).
    free_hard_pct: float = Field(default=2.0, ge=0, le=100)
    #: Below this: the low state (first-touch faults wait for reclaim).
    free_low_pct: float = Field(default=1.0, ge=0, le=100)
    #: How long a first-touch fault in the low state waits for reclaim before it fails.
    low_wait_seconds: float = Field(default=5.0, gt=0)
    #: Working-set sampling: pages sampled per VM each period (ESX: 100).
    sample_pages: int = Field(default=100, ge=1, le=1 << 20)
    #: Seconds per working-set sampling period (ESX: 30).
    sample_period: float = Field(default=30.0, gt=0, le=86400)
    #: Seed of the sample draws (none: random).
    sample_seed: int | None = None
    #: Page sharing scans all of a VM's memory once per this many seconds.
    share_scan_period: float = Field(default=30.0, gt=0, le=86400)
    #: NUMA migration's bound per VM, pages per second (0: no migration).
    numa_migrate_rate: float = Field(default=4096.0, ge=0, le=1 << 24)
    #: NUMA migration's bound for the whole host, pages per second.
    numa_host_migrate_rate: float = Field(default=16384.0, ge=0, le=1 << 24)
    #: 2 MB pages: 2M promotion collapses fully backed private regions into whole runs, and
    #: 2M defrag empties nearly free runs for it (off by default, as Linux's THP "madvise"
    #: mode is for most processes: large pages keep page sharing off those regions).
    hugepages: bool = False
    #: Swap read-ahead validation: read-ahead pages are held (frame and slot) until a
    #: low-priority verdict keeps or drops them; when the host needs frames (HARD or below,
    #: or a fault waiting for one) every hold ends at once, so held pages never starve it.
    hold_read_ahead: bool = True
    #: Low-priority aging: a type waiting this long moves up one priority class.
    lowprio_aging_seconds: float = Field(default=1.0, gt=0)
    #: memsched's idle memory tax (ESX'02): an idle page counts 1 / (1 - tax) times an
    #: active one in a VM's claim on memory (0: no tax).
    idle_tax: float = Field(default=0.75, ge=0, lt=1)
    #: Reclaim by ballooning first (false: swap only).
    balloon: bool = True
    #: The most of a guest's memory its balloon may hold.
    balloon_max_fraction: float = Field(default=0.65, ge=0, le=1)
    #: Seconds between memsched's balances.
    balance_period: float = Field(default=1.0, gt=0, le=3600)
    #: Discard the state a crashed daemon left on this socket instead of taking it over.
    fresh: bool = False
    #: After taking over from a crashed daemon: how long its VMs wait for their agents.
    reattach_seconds: float = Field(default=60.0, gt=0)
    #: Allow more machine memory than the machine has RAM (the host kernel would swap it).
    allow_beyond_ram: bool = False
    #: Users (besides the daemon's own) whose processes may connect to the socket.
    allow_uid: list[Annotated[int, Field(ge=0, lt=1 << 32)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PlatformConfig:
        pages = self.host_memory // PAGE_SIZE
        if pages < 512 * self.numa_nodes:
            raise ValueError(
                f"host memory of {pages} pages is too small for {self.numa_nodes} NUMA nodes "
                "(need at least 2 MiB per node)"
            )
        pcts = [self.free_high_pct, self.free_soft_pct, self.free_hard_pct, self.free_low_pct]
        if pcts != sorted(pcts, reverse=True):
            raise ValueError("free thresholds must satisfy high >= soft >= hard >= low")
        if self.swap_size and self.swap_file is None:
            raise ValueError("--swap-size needs --swap-file")
        for name, size in (("host memory", self.host_memory), ("swap size", self.swap_size)):
            if size // PAGE_SIZE > MAX_P2M_NUMBERS:
                raise ValueError(
                    f"{name} of {size} bytes is more than {MAX_P2M_NUMBERS * PAGE_SIZE} "
                    f"({MAX_P2M_NUMBERS} pages of {PAGE_SIZE} bytes): the p2m numbers frames "
                    "and swap slots in 32 bits"
                )
        return self

    @property
    def host_pages(self) -> int:
        return self.host_memory // PAGE_SIZE

    def slot_capacity_of(self, guest_pages: int) -> int:
        """Pages per slot of a guest of ``guest_pages``: the configured number, or the rule."""
        if self.slot_capacity is not None:
            return self.slot_capacity
        return slot_capacity_for(guest_pages)

    @property
    def allowed_uids(self) -> frozenset[int]:
        """The uids admitted on the socket: the daemon's own, and ``--allow-uid``."""
        return frozenset({os.getuid(), *self.allow_uid})


class AgentConfig(_Base):
    """Settings of one VMM agent (one per VM)."""

    #: The platform daemon's Unix socket.
    socket: Path = Path("/tmp/vmmem.sock")
    #: The VM's name, unique on the host.
    name: str = Field(default="vm0", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: Guest memory.
    memory: Size = 64 << 20
    #: Virtual CPUs running the guest workload.
    vcpus: int = Field(default=2, ge=1, le=256)
    #: Prometheus port on 127.0.0.1 (0: a free port; -1: no metrics).
    metrics_port: int = Field(default=0, ge=-1, le=65535)
    #: Control socket for ``vmmem-load`` (none: ``vmmem-vm-NAME.sock`` beside ``socket``).
    control_socket: Path | None = None
    #: Latency sensitivity: the higher, the tighter the low-priority time bound.
    latency_sensitivity: int = Field(default=0, ge=0)
    #: NUMA home node (-1: the daemon picks one).
    home_node: int = Field(default=-1, ge=-1)
    #: Memory shares for memsched's proportional allocation.
    shares: int = Field(default=1000, ge=1)
    #: Seed of the guest's random choices.
    seed: int = 0
    #: Seconds between polls of the pending word (the talk's "polled" half).
    poll_interval: float = Field(default=0.05, gt=0)
    #: How long the guest waits, stalled, for a platform daemon to take over after the one
    #: it had died; then the agent exits.
    reconnect_seconds: float = Field(default=30.0, gt=0)
    #: The balloon driver: pages per second it may inflate (Linux's vmw_balloon: up to 2048
    #: pages/s under guest memory pressure).
    balloon_rate: float = Field(default=2048.0, gt=0)
    #: Pages per second the balloon driver may deflate (vmw_balloon: 16384).
    balloon_deflate_rate: float = Field(default=16384.0, gt=0)
    #: The most of guest memory the balloon may hold (ESX: 65 %).
    balloon_max_fraction: float = Field(default=0.65, ge=0, le=1)
    #: Page checking: pages per second the monitor re-verifies against the guest model at
    #: low priority (0: off; vmm_agent/page_check.py).
    page_check_rate: float = Field(default=1000.0, ge=0, le=1e9)

    @property
    def guest_pages(self) -> int:
        return self.memory // PAGE_SIZE

    @property
    def control_socket_path(self) -> Path:
        """Where the load generator reaches this agent."""
        if self.control_socket is not None:
            return self.control_socket
        return self.socket.parent / f"vmmem-vm-{self.name}.sock"

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.memory < PAGE_SIZE:
            raise ValueError("guest memory must be at least one page")
        return self


S = TypeVar("S", bound=_Base)
#: The tables a TOML settings file may hold: one per daemon.
TABLES = ("platform", "vmm")


def settings_from_cli(cls: type[S], args: dict[str, Any], prog: str) -> S | None:
    """Settings from parsed CLI ``args`` (``config`` names the TOML file); on invalid input
    print why to stderr and return None."""
    args = dict(args)
    config_file = args.pop("config", None)
    try:
        return load_settings(cls, args, config_file)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"{prog}: invalid configuration:\n{exc}", file=sys.stderr)
        return None


def load_settings(cls: type[S], overrides: dict[str, Any], config_file: Path | None = None) -> S:
    """Build ``cls`` from ``overrides`` (CLI), then ``VMMEM_*``, then the TOML file."""
    path = config_file or (
        Path(os.environ["VMMEM_CONFIG"]) if "VMMEM_CONFIG" in os.environ else None
    )
    toml_values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        # A misspelt table ([vm]) would otherwise be skipped whole, its settings unused.
        if unknown := sorted(k for k, v in data.items() if isinstance(v, dict) and k not in TABLES):
            raise ValueError(
                f"{path}: unknown table [{unknown[0]}] (the tables are [platform], [vmm])"
            )
        section = "platform" if cls is PlatformConfig else "vmm"
        raw = data.get(section, data)
        toml_values = {k.replace("-", "_"): v for k, v in raw.items() if not isinstance(v, dict)}

    class _WithToml(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, toml_values))

    values = _WithToml(**{k: v for k, v in overrides.items() if v is not None})
    return cls.model_validate(values.model_dump())


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)
