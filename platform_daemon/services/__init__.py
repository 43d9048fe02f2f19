"""Platform-side services, one module each; adding one is a module plus a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.constants import ServiceType

from .balloon import BalloonService
from .base import PlatformService
from .numa_migration import NumaMigrationService
from .p2m_update import P2MUpdateService
from .page_retire import PageRetireService
from .page_sharing import PageSharingService
from .sampling import SamplingService
from .swap import SwapService
from .validation import ValidationService

if TYPE_CHECKING:
    from ..context import ServiceContext

SERVICE_CLASSES: tuple[type[PlatformService], ...] = (
    SwapService,
    BalloonService,
    P2MUpdateService,
    PageRetireService,
    SamplingService,
    PageSharingService,
    NumaMigrationService,
    ValidationService,
)


def build_services(ctx: ServiceContext) -> dict[ServiceType, PlatformService]:
    """One instance of every service, keyed by its type."""
    services = {cls.service: cls(ctx) for cls in SERVICE_CLASSES}
    # The second half of NUMA migration's remap: remap validation re-exposes moved pages.
    numa, validation = services[ServiceType.NUMA_MIGRATION], services[ServiceType.VALIDATION]
    assert isinstance(numa, NumaMigrationService) and isinstance(validation, ValidationService)
    numa.on_moved = validation.enqueue
    return services
