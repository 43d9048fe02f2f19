"""Human sizes (``256MiB``, ``1GiB``, ``4096``) to bytes and back."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``; binary units whatever the spelling (``1GB`` is 2**30 here)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64MiB, 1GiB)")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64MiB, 1GiB)")
    # Fraction, not float: exact for any number of digits, and never inf.
    return int(Fraction(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """The largest binary unit that keeps ``n`` readable: ``64MiB``, ``1.5GiB``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"
