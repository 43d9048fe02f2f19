"""Platform-side services, one module each; adding one is a module plus a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.constants import ServiceType

from .balloon import BalloonService
from .base import PlatformService
from .p2m_update import P2MUpdateService
from .page_retire import PageRetireService
from .page_sharing import PageSharingService
from .sampling import SamplingService
from .swap import SwapService

if TYPE_CHECKING:
    from ..context import ServiceContext

SERVICE_CLASSES: tuple[type[PlatformService], ...] = (
    SwapService,
    BalloonService,
    P2MUpdateService,
    PageRetireService,
    SamplingService,
    PageSharingService,
)


def build_services(ctx: ServiceContext) -> dict[ServiceType, PlatformService]:
    """One instance of every service, keyed by its type."""
    return {cls.service: cls(ctx) for cls in SERVICE_CLASSES}
