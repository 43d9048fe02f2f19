"""Platform-side services, one module each; adding one is a module plus a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.constants import ServiceType

from .base import PlatformService
from .p2m_update import P2MUpdateService
from .page_retire import PageRetireService
from .swap import SwapService

if TYPE_CHECKING:
    from ..server import PlatformServer

SERVICE_CLASSES: tuple[type[PlatformService], ...] = (
    SwapService,
    P2MUpdateService,
    PageRetireService,
)


def build_services(server: PlatformServer) -> dict[ServiceType, PlatformService]:
    """One instance of every service, keyed by its type."""
    return {cls.service: cls(server) for cls in SERVICE_CLASSES}
