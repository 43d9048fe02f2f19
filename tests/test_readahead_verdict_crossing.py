"""A read-ahead verdict that crosses a pressure release and a swap batch leaves the page
mapped on both sides.

The interleaving: a VALIDATION batch is out with a read-ahead page the guest touched (the
VMM answers REFERENCED and keeps it mapped); meanwhile memory pressure ends the hold (the
page is EXPOSED) and a swap batch takes it (SELECTED). When the verdict lands the page is
SELECTED, so validation takes it for one of its remapped pages, and a verdict other than
OK or CANCELLED made that RESIDENT: "nobody maps it", while the VMM does. Swap takes
RESIDENT pages without asking the VMM, writes them out and frees the frame the guest still
reads and writes through. Uses the fake-peer harness of ``test_readahead_validation.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from platform_daemon.services.readahead import WINDOW
from shared.constants import PageState
from tests.test_readahead_validation import Harness, h  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(30)


def test_a_kept_page_selected_by_swap_when_its_verdict_lands_is_not_made_resident(
    h: Harness,  # noqa: F811
) -> None:
    ahead, _ = h.read_ahead()
    page = int(ahead[0])
    h.touch(page)  # the guest reads it: REFERENCED, kept mapped
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)  # the VMM's verdicts are written; the completion is on the wire
    assert h.validation.readahead.set_pressure(True) == len(ahead)  # holds end: EXPOSED
    h.vm.p2m.state[page] = PageState.SELECTED  # a swap batch takes it (RoundEngine._issue)
    h.complete(req)
    frame = int(h.vm.p2m.frame[page])
    assert h.exposure.frame[page] == frame  # the VMM maps it...
    assert h.vm.p2m.state[page] != PageState.RESIDENT  # ...so it is not the platform's alone
    # The pages the VMM let go (UNTOUCHED) are unmapped there: EXPOSED in the p2m (their
    # holds ended first), which is safe: a touch faults and maps the same frame.
    rest = ahead[1:]
    assert (h.exposure.frame[rest] < 0).all()
    assert (h.vm.p2m.state[rest] == PageState.EXPOSED).all()
    h.touch(page)
    assert h.violations() == []
    assert np.array_equal(h.machine.frames[frame], np.frombuffer(h.data[page], np.uint8))


def test_an_untouched_page_selected_by_swap_when_its_verdict_lands_is_the_platform_s_alone(
    h: Harness,  # noqa: F811
) -> None:
    """The same crossing, the page untouched: the VMM let it go (UNTOUCHED), so nobody maps
    it and it is RESIDENT, which swap may take without asking the VMM; its frame still
    holds its bytes, and a touch maps that frame back."""
    ahead, _ = h.read_ahead()
    page = int(ahead[0])
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)
    assert h.validation.readahead.set_pressure(True) == len(ahead)
    h.vm.p2m.state[page] = PageState.SELECTED  # a swap batch takes it (RoundEngine._issue)
    h.complete(req)
    assert h.exposure.frame[page] < 0
    assert h.vm.p2m.state[page] == PageState.RESIDENT
    frame = int(h.vm.p2m.frame[page])
    assert np.array_equal(h.machine.frames[frame], np.frombuffer(h.data[page], np.uint8))
    assert h.violations() == []
