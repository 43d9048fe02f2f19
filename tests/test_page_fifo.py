"""The page FIFO services queue PageLists in (``platform_daemon/page_fifo.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from platform_daemon.page_fifo import PageFifo


def test_pages_come_out_oldest_first_across_the_chunks_they_went_in() -> None:
    q = PageFifo(100)
    q.push(np.array([5, 6, 7]))
    q.push(np.array([1, 2]))
    q.push(np.array([9]))
    assert len(q) == 6
    assert q.pop(2).tolist() == [5, 6]
    assert q.pop(3).tolist() == [7, 1, 2]  # spans two chunks
    assert len(q) == 1
    assert q.to_array().tolist() == [9]
    assert q.pop(10).tolist() == [9]  # fewer than asked: what there is
    assert len(q) == 0 and q.pop(1).tolist() == [] and q.to_array().tolist() == []


def test_beyond_capacity_the_oldest_are_dropped() -> None:
    q = PageFifo(5)
    assert q.push(np.arange(3)) == 0
    assert q.push(np.arange(10, 14)) == 2  # 7 queued: the two oldest go
    assert len(q) == 5
    assert q.to_array().tolist() == [2, 10, 11, 12, 13]
    assert q.push(np.arange(20, 28)) == 8  # more than the capacity at once
    assert q.to_array().tolist() == [23, 24, 25, 26, 27]
    assert q.pop(5).tolist() == [23, 24, 25, 26, 27] and len(q) == 0


def test_a_push_keeps_a_copy_not_the_callers_array() -> None:
    q = PageFifo(10)
    pages = np.array([1, 2, 3])
    q.push(pages)
    pages[:] = 0  # the caller reuses its array
    assert q.pop(3).tolist() == [1, 2, 3]


def test_a_pop_of_part_of_a_chunk_leaves_the_rest_in_order() -> None:
    q = PageFifo(10)
    q.push(np.array([1, 2, 3, 4]))
    assert q.pop(1).tolist() == [1]
    q.push(np.array([5]))
    assert q.to_array().tolist() == [2, 3, 4, 5]
    assert q.pop(0).tolist() == [] and len(q) == 4


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PageFifo(0)


def test_a_pop_of_a_negative_count_takes_nothing() -> None:
    q = PageFifo(10)
    q.push(np.array([1, 2, 3]))
    assert q.pop(-1).tolist() == []
    assert len(q) == 3 and q.to_array().tolist() == [1, 2, 3]
