"""Page-retire filter: none. A failing frame must be left whatever the guest is doing."""

from __future__ import annotations

from shared.constants import ServiceType

from .base import AgentService


class PageRetireFilter(AgentService):
    service = ServiceType.PAGE_RETIRE
