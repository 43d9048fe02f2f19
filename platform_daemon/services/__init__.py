"""Platform-side services, one module each; adding one is a module plus a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.constants import ServiceType

from .balloon import BalloonService
from .base import PlatformService
from .defrag import DefragService
from .numa_migration import NumaMigrationService
from .p2m_update import P2MUpdateService
from .page_retire import PageRetireService
from .page_sharing import PageSharingService
from .promotion import PromotionService
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
    DefragService,
    PromotionService,
)


def build_services(ctx: ServiceContext) -> dict[ServiceType, PlatformService]:
    """One instance of every service, keyed by its type."""
    services = {cls.service: cls(ctx) for cls in SERVICE_CLASSES}
    # The second half of NUMA migration's remap: remap validation re-exposes moved pages.
    numa, validation = services[ServiceType.NUMA_MIGRATION], services[ServiceType.VALIDATION]
    assert isinstance(numa, NumaMigrationService) and isinstance(validation, ValidationService)
    numa.on_moved = validation.enqueue
    # Swap read-ahead validation (opt-in): read-ahead pages held until validated or dropped.
    swap = services[ServiceType.SWAP]
    assert isinstance(swap, SwapService)
    if ctx.config.hold_read_ahead:
        swap.hold_read_ahead = validation.readahead.hold
        swap.read_ahead_cap = validation.readahead.window_cap
    # 2M defrag and promotion remap too; promotion asks defrag for a run when none is free.
    defrag, promotion = services[ServiceType.DEFRAG_2M], services[ServiceType.PROMOTION_2M]
    assert isinstance(defrag, DefragService) and isinstance(promotion, PromotionService)
    defrag.on_moved = promotion.on_moved = validation.enqueue
    promotion.want_run = defrag.want_run
    return services
