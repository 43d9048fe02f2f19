"""The invariant check (``vmmem-ctl check``) on a full 2 GiB host, against one NumPy pass.

Eight 256 MiB VMs map all of a 2 GiB host (the state ``tests/test_invariants.py`` checks for
correctness). Reported: the median of 7 checks, and the same over one vectorised pass of the
arrays the check reads (the p2ms' frame, state and flags arrays, the owner maps), so the
figure says how many passes' worth the check costs on this machine, whatever its speed.

Usage: ``python benchmarks/invariants.py``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from platform_daemon.invariants import check  # noqa: E402
from tests.test_invariants import big_host_state  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        state, swap = big_host_state(Path(tmp))
        try:
            assert check(state) == []
            runs = []
            for _ in range(7):
                t0 = time.perf_counter()
                check(state)
                runs.append(time.perf_counter() - t0)
            arrays = [a for p in state.vms.values() for a in (p.frame, p.state, p.flags)]
            arrays += [state.owner_vm, state.owner_bpn]
            passes = []
            for _ in range(7):
                t0 = time.perf_counter()
                for a in arrays:
                    int(np.count_nonzero(a))
                passes.append(time.perf_counter() - t0)
        finally:
            swap.close()
    check_s, pass_s = statistics.median(runs), statistics.median(passes)
    print(
        f"check of a 2 GiB host, 8 x 256 MiB VMs: median {check_s * 1e3:.0f} ms; one pass over "
        f"its arrays {pass_s * 1e3:.1f} ms; ratio {check_s / pass_s:.0f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
