"""Workload phases: what the load generator asks a guest to do, validated on both sides."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ContentMix(BaseModel):
    """Fractions of writes that store zeros, a page from a small corpus, or unique bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    zero: float = Field(default=0.1, ge=0, le=1)
    duplicate: float = Field(default=0.2, ge=0, le=1)
    unique: float = Field(default=0.7, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> ContentMix:
        if abs(self.zero + self.duplicate + self.unique - 1.0) > 1e-6:
            raise ValueError("content mix fractions must add up to 1")
        return self


class Phase(BaseModel):
    """One phase of a guest workload."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "phase"
    duration: float = Field(default=10.0, gt=0, le=86400, description="seconds")
    #: Working set as a fraction of guest memory, starting at ``offset`` (also a fraction).
    working_set: float = Field(default=0.5, gt=0, le=1)
    offset: float = Field(default=0.0, ge=0, lt=1)
    distribution: Literal["uniform", "zipf", "sequential"] = "uniform"
    zipf_s: float = Field(default=1.1, gt=1.0, le=4.0)
    write_ratio: float = Field(default=0.3, ge=0, le=1)
    content: ContentMix = Field(default_factory=ContentMix)
    #: vCPUs that run this phase (0: all the agent has).
    vcpus: int = Field(default=0, ge=0, le=256)
    #: Guest think time per access, microseconds.
    think_us: float = Field(default=0.0, ge=0, le=1e6)
    #: Pages pinned "in translation" at any time (a device-I/O model), and for how long.
    pinned_pages: int = Field(default=0, ge=0)
    pin_seconds: float = Field(default=0.2, gt=0, le=60)
    #: The guest's page cache: the most guest memory it may hold (a fraction), and the
    #: fraction of accesses that are reads of file blocks through it, drawn by
    #: ``distribution`` over ``cache * guest pages`` blocks. A read of a block not in memory
    #: is a refault: a simulated disk read of ``refault_ms``. The other accesses are
    #: anonymous, over ``[offset, offset + working_set)``. With ``cache_ratio`` 0 (the
    #: default) every access is anonymous, as before the page cache existed.
    cache: float = Field(default=0.0, ge=0, le=1)
    cache_ratio: float = Field(default=0.0, ge=0, le=1)
    refault_ms: float = Field(default=2.0, ge=0, le=1000)
    #: When the phase ends, the guest frees this fraction of its anonymous working set (the
    #: top of ``[offset, offset + working_set)``, the pages still anonymous) back to its free
    #: pool, as a process exiting: free memory the guest once used, its frames still backed
    #: (the host is not told). 0 (the default): nothing is freed, as before.
    anon_freed: float = Field(default=0.0, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _cache_reads_need_a_cache(self) -> Phase:
        if self.cache_ratio > 0 and self.cache <= 0:
            raise ValueError("cache_ratio > 0 needs a page cache (cache > 0)")
        return self
