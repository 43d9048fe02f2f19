"""The soak (issue 7 §9): overcommit with swap, frame retirement, an agent and the daemon
killed and restarted, all at once, with the invariants checked every few seconds.

``python -m tools.soak --minutes 5`` (``make soak MINUTES=5``). It exits 0 when every check
passed, every page every guest wrote reads back and the daemon's memory stayed flat; 1 with
each failure named; 2 on bad flags. See ``docs/reliability.md`` section 9.

- ``plan``: the settings, the schedule of events and the verdict on memory (pure code);
- ``procs``: the daemon and agent processes, their logs, control requests, ``/proc``;
- ``driver``: the run itself (events, checks, final verification) and its report.

It lives in ``tools/``, not ``benchmarks/``: it measures no speed, it passes or fails.
"""
