"""Sampling: the batch hands over the period's sample; nothing is released to the platform.

The verdicts are the sampler's (pinned pages are BUSY and count as touched); arming the
rest is monitor-side work, done later within the time bound by the monitor queue.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.constants import ServiceType

from ..exposure import ExposureTable
from ..sampler import Sampler
from .base import AgentService

_NONE = np.empty(0, dtype=np.int64)


class SamplingFilter(AgentService):
    service = ServiceType.SAMPLING

    def __init__(self, exposure: ExposureTable, sampler: Sampler) -> None:
        super().__init__(exposure)
        self.sampler = sampler

    def process(
        self, bpns: npt.NDArray[Any], mpns: npt.NDArray[np.int64], status: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.int64]:
        self.sampler.receive(bpns.astype(np.int64), status)
        return _NONE  # no page leaves the monitor
