"""What the agent's metadata costs per guest page, apart from the simulated guest.

For the scale benchmark (control op ``footprint``). The VMM's own metadata is what the
monitor would keep (the exposure table, the fault path, the sampler's touch log, the rounds,
the balloon driver, page checking); the guest model (expected contents, the guest OS's page
lists, the vCPUs' access streams) stands in for the guest and for the test oracle, and is
reported apart. Guest memory itself (the machine frames) is not metadata.

The walk counts NumPy arrays only. The exposure table's hidden mappings are a dict (a few
hundred entries: the current sample), so they are added as the Python objects they are,
as part ``hidden``: moving them out of the arrays must not hide their cost.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from shared.footprint import array_bytes
from shared.shm import MappedFile

from .guest import GuestMemory
from .guest_os import GuestOS
from .runner import WorkloadRunner

if TYPE_CHECKING:
    from .agent import Agent

VMM_PARTS = (
    "exposure",
    "faults",
    "touches",
    "sampler",
    "batches",
    "rounds",
    "lowprio",
    "monitor",
    "page_check",
    "balloon",
    "region",
)
GUEST_PARTS = ("guest", "guest_os", "runner")


def footprint(agent: Agent) -> dict[str, Any]:
    """Bytes of the VMM's metadata (by part) and of the guest model, per guest page too."""
    pages = agent.config.guest_pages
    guest_types = (GuestMemory, GuestOS, WorkloadRunner)
    skip = (type(agent), MappedFile)
    frames = [agent.frames]
    parts = {
        name: array_bytes([getattr(agent, name)], (*skip, *guest_types), exclude=frames)
        for name in VMM_PARTS
        if getattr(agent, name, None) is not None
    }
    vmm = array_bytes([getattr(agent, n) for n in parts], (*skip, *guest_types), exclude=frames)
    everything = array_bytes(
        [getattr(agent, n, None) for n in (*VMM_PARTS, *GUEST_PARTS)], skip, exclude=frames
    )
    guest = everything - vmm
    parts["hidden"] = hidden_bytes(agent.exposure.hidden)
    vmm += parts["hidden"]
    return {
        "guest_pages": pages,
        "vmm_bytes": vmm,
        "vmm_bytes_per_page": round(vmm / pages, 2),
        "vmm_by_part": parts,
        "guest_model_bytes": guest,
        "guest_model_bytes_per_page": round(guest / pages, 2),
    }


def hidden_bytes(hidden: dict[int, tuple[int, bool]]) -> int:
    """Bytes of the hidden mappings' dict: the table, each key, value tuple and frame number
    (``True``/``False`` are shared singletons)."""
    entries = sum(
        sys.getsizeof(bpn) + sys.getsizeof(entry) + sys.getsizeof(entry[0])
        for bpn, entry in hidden.items()
    )
    return sys.getsizeof(hidden) + entries
