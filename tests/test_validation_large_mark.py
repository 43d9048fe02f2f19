"""The daemon's LARGE mark in VALIDATION batches (issue 9): the agent maps a region large only
when the daemon marked every page of it the batch carries, and all 512 are in place in order.

The end-to-end reproduction (a region the daemon split without a batch) is
``tests/test_page_life_moves.py::test_a_split_the_agent_never_saw``; these pin the rule the
agent applies to a batch, and the slot's wire form of the mark.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from shared.constants import PAGES_PER_2M, PageStatus, ServiceType
from shared.errors import LayoutError
from shared.layout import ControlRegion, region_size
from vmm_agent.exposure import ExposureTable
from vmm_agent.services.validation import ValidationFilter

R = PAGES_PER_2M
RUN = 4 * R  # region r's run starts at frame RUN + r * R (aligned)


def promoted(regions: int) -> tuple[ExposureTable, ValidationFilter]:
    """An agent whose ``regions`` regions were all released to 2M promotion."""
    table = ExposureTable(regions * R)
    table.released_by[:] = ServiceType.PROMOTION_2M
    return table, ValidationFilter(table)


def validate(
    f: ValidationFilter, bpns: npt.NDArray[np.int64], marked: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """One VALIDATION batch installing ``bpns`` on their run, LARGE where ``marked``."""
    status = np.where(marked, np.uint8(PageStatus.LARGE), np.uint8(PageStatus.OK))
    f.process(bpns.astype(np.uint64), RUN + bpns, status)
    return status


@pytest.mark.timeout(10)
def test_a_region_marked_large_in_one_batch_is_mapped_large() -> None:
    table, f = promoted(1)
    status = validate(f, np.arange(R), np.ones(R, dtype=bool))
    assert (status == PageStatus.OK).all()  # the mark is overwritten by the verdict
    assert table.large.tolist() == [True]


@pytest.mark.timeout(10)
def test_unmarked_pages_keep_a_region_small_even_on_its_run_in_order() -> None:
    """Region 0 unmarked (the daemon split it), region 1 with one unmarked page: neither is
    large although both lie on their runs in order; region 2, all marked, is."""
    table, f = promoted(3)
    marked = np.ones(3 * R, dtype=bool)
    marked[:R] = False
    marked[R + 7] = False
    validate(f, np.arange(3 * R), marked)
    assert table.large.tolist() == [False, False, True]
    assert (table.frame == RUN + np.arange(3 * R)).all()  # all installed all the same


@pytest.mark.timeout(10)
def test_a_region_split_between_its_two_batches_stays_small() -> None:
    """The first half comes marked, the daemon splits the region (a page of the second half,
    not mapped, swapped out without a batch and back on its frame), the second half comes
    unmarked: the region is complete and in order, but not large. (The daemon's flag is set
    only by a collapse, which releases every page first: a later batch cannot mark what an
    earlier one did not.)"""
    table, f = promoted(1)
    half = np.arange(R // 2)
    validate(f, half, np.ones(len(half), dtype=bool))
    assert not table.large.any()  # half the region is not installed yet
    validate(f, half + R // 2, np.zeros(len(half), dtype=bool))
    assert not table.large.any()
    assert (table.frame == RUN + np.arange(R)).all()


@pytest.mark.timeout(10)
def test_a_batch_mixing_read_ahead_pages_with_a_marked_region_maps_the_region_large() -> None:
    """Validation's selection puts remapped pages first and read-ahead pages after them, so
    one batch can hold a promoted region (marked LARGE) and swap's read-ahead pages of
    another region: each part gets its own verdicts (the marks narrowed to the remapped
    part), the region is mapped large, the untouched read-ahead page is let go."""
    table, f = promoted(2)
    ahead = np.array([R + 3, R + 9], dtype=np.int64)  # mapped by swap-in replies
    table.released_by[ahead] = ServiceType.SWAP
    table.install(ahead, 100 + ahead, np.ones(2, dtype=bool))
    table.accessed[ahead[0]] = True  # the guest touched one of them
    bpns = np.concatenate((np.arange(R), ahead))
    status = np.full(len(bpns), PageStatus.OK, dtype=np.uint8)
    status[:R] = PageStatus.LARGE
    f.process(bpns.astype(np.uint64), np.concatenate((RUN + np.arange(R), 100 + ahead)), status)
    assert (status[:R] == PageStatus.OK).all()
    assert status[R:].tolist() == [PageStatus.REFERENCED, PageStatus.UNTOUCHED]
    assert table.large.tolist() == [True, False]
    assert table.mapped_frame(ahead).tolist() == [100 + ahead[0], -1]


@pytest.mark.timeout(10)
def test_the_slot_carries_the_daemons_marks_and_checks_their_length() -> None:
    cap = 8
    buf = bytearray(region_size(1, cap))
    region = ControlRegion.initialize(
        buf, vm_id=1, generation=1, slot_count=1, capacity=cap, guest_pages=64
    )
    marks = np.array([PageStatus.LARGE, PageStatus.OK, PageStatus.LARGE], dtype=np.uint8)
    region.slot(0).fill(ServiceType.VALIDATION, 1, np.arange(3), np.arange(3), marks)
    _, status, _ = ControlRegion(buf).slot(0).batch(3)
    assert status.tolist() == marks.tolist()
    with pytest.raises(LayoutError):
        region.slot(0).fill(ServiceType.VALIDATION, 2, np.arange(3), np.arange(3), marks[:2])
    assert ControlRegion(buf).slot(0).read_header()[3] == 1  # the failed fill changed nothing
