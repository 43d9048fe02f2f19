"""Distinct values of an integer array, by a sort: what ``np.unique`` gives, much cheaper.

NumPy 2.x's ``np.unique`` builds a hash table first; for the page and frame numbers of a
batch it costs ten to twenty times a sort (2,048 distinct int64: 122 µs against 10 µs;
16,384: 1.17 ms against 59 µs; NumPy 2.4.6 on this machine, 2026-12-03). Batches go
through several such calls each (a queue's pops, a region count, a repeated-page check),
so the hot paths use these instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def _first_of_each(ordered: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Per entry of a sorted array: it differs from the one before (the first of its run)."""
    first = np.empty(len(ordered), dtype=bool)
    if len(ordered):
        first[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return first


def distinct(values: npt.ArrayLike) -> npt.NDArray[Any]:
    """The distinct values, ascending (``np.unique(values)`` for a flat array)."""
    ordered = np.sort(np.asarray(values).reshape(-1))
    return ordered[_first_of_each(ordered)]


def distinct_counts(values: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The distinct values, ascending, and how often each occurs
    (``np.unique(values, return_counts=True)``)."""
    ordered = np.sort(np.asarray(values).reshape(-1))
    starts = np.flatnonzero(_first_of_each(ordered))
    counts = np.diff(np.append(starts, len(ordered))).astype(np.int64)
    return ordered[starts], counts


def has_repeats(values: npt.ArrayLike) -> bool:
    """Whether any value occurs twice."""
    ordered = np.sort(np.asarray(values).reshape(-1))
    return bool(len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any())


def first_occurrences(values: npt.ArrayLike) -> npt.NDArray[np.intp]:
    """The index of each distinct value's first occurrence, in ascending order: the values
    with later repeats left out, order kept (``np.sort(np.unique(values,
    return_index=True)[1])``)."""
    flat = np.asarray(values).reshape(-1)
    order = np.argsort(flat, kind="stable")  # stable: the first of equal values leads
    return np.sort(order[_first_of_each(flat[order])])


def difference(values: npt.ArrayLike, without: npt.ArrayLike) -> npt.NDArray[Any]:
    """The distinct values of ``values`` not in ``without``, ascending
    (``np.setdiff1d(values, without)``, which takes the hash path of ``np.unique``)."""
    kept = distinct(values)
    out = np.asarray(without).reshape(-1)
    return kept if len(out) == 0 else kept[~np.isin(kept, out)]
