"""Choose the event loop: uvloop when installed, the standard loop otherwise (uvicorn's way).

The only place in ``shared`` that touches asyncio, and only when a daemon's ``main`` calls it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on uvloop if available and wanted."""
    import asyncio

    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; fallback for odd hosts
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
