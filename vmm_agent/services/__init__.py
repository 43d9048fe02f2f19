"""Agent-side services: one filter callback per service type (the talk's vmmServicesCallbacks).

Adding a service is a module here and one line in ``FILTERS``.
"""

from __future__ import annotations

from shared.constants import ServiceType

from ..exposure import ExposureTable
from ..sampler import Sampler
from .base import AgentService
from .defrag import DefragFilter
from .numa_migration import NumaMigrationFilter
from .p2m_update import P2MUpdateFilter
from .page_retire import PageRetireFilter
from .page_sharing import PageSharingFilter
from .promotion import PromotionFilter
from .sampling import SamplingFilter
from .swap import SwapFilter
from .validation import ValidationFilter

FILTERS: dict[ServiceType, type[AgentService]] = {
    ServiceType.SWAP: SwapFilter,
    ServiceType.P2M_UPDATE: P2MUpdateFilter,
    ServiceType.PAGE_RETIRE: PageRetireFilter,
    ServiceType.PAGE_SHARING: PageSharingFilter,
    ServiceType.NUMA_MIGRATION: NumaMigrationFilter,
    ServiceType.DEFRAG_2M: DefragFilter,
    ServiceType.PROMOTION_2M: PromotionFilter,
}


def build_services(exposure: ExposureTable, sampler: Sampler) -> dict[ServiceType, AgentService]:
    """One instance per service type; sampling also needs the monitor's sampler."""
    services = {stype: cls(exposure) for stype, cls in FILTERS.items()}
    services[ServiceType.SAMPLING] = SamplingFilter(exposure, sampler)
    # Not a release: a VALIDATION batch maps pages again (a remap's second half).
    services[ServiceType.VALIDATION] = ValidationFilter(exposure)
    return services
