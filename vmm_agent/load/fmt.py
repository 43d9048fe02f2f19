"""Fixed-width text for the load generator's tables: latencies with units, aligned columns.

A latency is always at most ``LATENCY_WIDTH`` characters whatever its size (a tiny one reads
``0.3 µs``, a huge one ``1.2e+06 s``), and a table sizes each column to its widest cell, so
no two numbers can run together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: The widest text ``latency`` returns (``999.9 ms``, ``1.2e+06 s``).
LATENCY_WIDTH = 9


def latency(seconds: float | None) -> str:
    """``seconds`` in µs, ms or s with three significant digits, at most LATENCY_WIDTH wide."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    # Choose the unit on the rounded value, so 999.96 µs reads 1.00 ms, not 1000.0 µs.
    for scale, unit in ((1e6, "µs"), (1e3, "ms"), (1.0, "s")):
        value = seconds * scale
        if value < 9.995:
            return f"{value:.2f} {unit}"
        if value < 99.95:
            return f"{value:.1f} {unit}"
        if value < 999.5:
            return f"{value:.0f} {unit}"
    return f"{seconds:.1e} s"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], first_left: bool = True) -> list[str]:
    """``head`` then ``rows`` as lines: the first column left-aligned (a name), the others
    right-aligned, each as wide as its widest cell, two spaces between columns; then a rule
    under the head (the rule's width is the table's)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(cell.ljust(w) if i == 0 and first_left else cell.rjust(w))
        return "  ".join(out).rstrip()

    top = line(head)
    width = sum(widths) + 2 * (len(widths) - 1)
    return [top, "-" * width, *(line(r) for r in rows)]
