"""An executor for ``MachineMemory.copier`` that runs each copy when the test says.

The copy itself is real (``page_move.copy_frames`` on the machine's frames); only its moment
is the test's: between ``submit`` and ``run_held`` the copy is in flight, as on the copier
thread, so a test (or a state machine's rule) can put a fault, a VM's end or another
batch there, deterministically. With ``inline`` set, work runs at once (a test's "let
everything finish").
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any


class HeldCopies(concurrent.futures.Executor):
    def __init__(self) -> None:
        self.held: list[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = []
        self.inline = False
        self.ran = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.held.append((fut, lambda: fn(*args, **kwargs)))
        if self.inline:
            self.run_held()
        return fut

    def run_held(self) -> int:
        """Run every copy held, oldest first; returns how many ran."""
        ran = 0
        while self.held:
            fut, work = self.held.pop(0)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(work())
            except BaseException as exc:
                fut.set_exception(exc)
            ran += 1
        self.ran += ran
        return ran

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the copier thread would: what was handed over finishes first."""
        self.run_held()
