"""Agent-side services: one filter callback per service type (the talk's vmmServicesCallbacks).

Adding a service is a module here and one line in ``FILTERS``.
"""

from __future__ import annotations

from shared.constants import ServiceType

from .base import AgentService
from .p2m_update import P2MUpdateFilter
from .page_retire import PageRetireFilter
from .swap import SwapFilter

FILTERS: dict[ServiceType, type[AgentService]] = {
    ServiceType.SWAP: SwapFilter,
    ServiceType.P2M_UPDATE: P2MUpdateFilter,
    ServiceType.PAGE_RETIRE: PageRetireFilter,
}
