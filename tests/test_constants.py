"""The shared enums behave as plain integers in NumPy, without the slow path of Python 3.11."""

from __future__ import annotations

import enum

import numpy as np
import pytest

from shared.constants import FaultReason, FreeState, PageState, PageStatus, Priority, ServiceType

ENUMS = [ServiceType, Priority, PageState, PageStatus, FaultReason, FreeState]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cls", ENUMS, ids=lambda c: c.__name__)
def test_numpy_never_asks_the_enum_metaclass(cls: type[enum.IntEnum], monkeypatch) -> None:
    """Comparing, assigning and counting with a member never reaches EnumType.__getattr__ (a
    raised AttributeError per NumPy operation on every hot path), and the results are those
    of the plain integer."""
    asked: list[str] = []
    original = enum.EnumType.__getattr__

    def spy(klass: type, name: str) -> object:
        asked.append(name)
        return original(klass, name)  # type: ignore[arg-type]

    monkeypatch.setattr(enum.EnumType, "__getattr__", spy)
    member = list(cls)[-1]
    values = np.arange(len(cls) + 1, dtype=np.uint8)
    equal = values == member
    values[values == member] = member
    total = np.count_nonzero(values != member) + int(np.add(values, member)[0])
    assert asked == []
    assert equal.tolist() == (values == int(member)).tolist()
    assert int(equal.sum()) == 1
    assert total == len(cls) + int(member)
    assert list(cls) == sorted(cls)  # still an ordinary enum: members, order, values
