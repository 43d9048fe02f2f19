"""``shared/distinct.py`` gives what ``np.unique`` gives."""

from __future__ import annotations

import numpy as np
import pytest

from shared.distinct import (
    difference,
    distinct,
    distinct_counts,
    first_occurrences,
    has_repeats,
)

CASES = [
    np.array([], dtype=np.int64),
    np.array([7], dtype=np.int64),
    np.array([3, 1, 3, 2, 1, 3], dtype=np.int64),
    np.arange(10, 0, -1, dtype=np.int64),
    np.array([-1, -1, 0, 5], dtype=np.int32),
    np.random.default_rng(3).integers(0, 50, 400),
]


@pytest.mark.parametrize("values", CASES, ids=range(len(CASES)))
def test_the_same_as_np_unique(values: np.ndarray) -> None:
    assert distinct(values).tolist() == np.unique(values).tolist()
    assert distinct(values).dtype == values.dtype
    got, counts = distinct_counts(values)
    want, want_counts = np.unique(values, return_counts=True)
    assert got.tolist() == want.tolist() and counts.tolist() == want_counts.tolist()
    assert has_repeats(values) == (len(np.unique(values)) != len(values))
    want_first = np.sort(np.unique(values, return_index=True)[1])
    assert first_occurrences(values).tolist() == want_first.tolist()


def test_a_list_and_a_2d_array_are_taken_flat() -> None:
    assert distinct([4, 4, 1]).tolist() == [1, 4]
    assert distinct(np.array([[2, 1], [2, 0]])).tolist() == [0, 1, 2]
    assert has_repeats([1, 2, 1]) and not has_repeats([1, 2, 3])


@pytest.mark.parametrize("values", CASES, ids=range(len(CASES)))
def test_difference_is_np_setdiff1d(values: np.ndarray) -> None:
    for without in (values[: len(values) // 2], np.array([], dtype=np.int64), [3, 7, 49]):
        assert difference(values, without).tolist() == np.setdiff1d(values, without).tolist()
