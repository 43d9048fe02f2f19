"""This machine's own limits, measured in the same run as a benchmark (DESIGN.md, "Performance
rules").

VMMem figures are ratios against what the hardware and kernel do here and now, never absolute
times: a round trip is compared with a raw socket ping-pong placed the same way, a batch copy
with NumPy's memcpy, a share scan with xxh3_64, a swap-out with ``pwrite``.

Functions (each repeats its measurement and returns a dict of medians):

- ``pingpong(placement)``: round trip of ~30-byte frames over a Unix stream socket between two
  processes running uvloop, with both processes on one CPU (``"same"``) or on two
  (``"cross"``), pinned with ``os.sched_setaffinity``. ``pingpong_blocking`` is the same with
  blocking ``send``/``recv`` and no event loop: the floor under any Python event loop.
- ``memcpy_rate()``: 4 KiB pages per second copied as one contiguous block and gathered
  from 512 random frames (the shape of a PageList copy).
- ``hash_rate()``: pages per second through ``xxhash.xxh3_64_intdigest``, one call per page.
- ``pwrite_rate(directory)``: bytes per second of 2 MiB ``os.pwrite`` calls (page cache).

The ping-pong peers are subprocesses running this file (``_echo`` and ``_pingpong`` roles), so
the caller's own affinity is never changed. Run ``python benchmarks/machine_limits.py`` to
print everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

PAGE_SIZE = 4096
#: Size of a ping-pong frame: a Fault message is an 18-byte header plus a 12-byte body.
FRAME_BYTES = 30
THIS = Path(__file__).resolve()


# ---- placement -------------------------------------------------------------------------------


def cpus() -> list[int]:
    """The CPUs this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def placement_cpus(placement: str, cpu_list: Sequence[int] | None = None) -> tuple[int, int]:
    """CPUs of the (server, client) pair: one CPU for ``same``, two for ``cross``."""
    avail = list(cpu_list) if cpu_list is not None else cpus()
    if placement == "same":
        return avail[0], avail[0]
    if placement == "cross":
        if len(avail) < 2:
            raise ValueError("placement 'cross' needs two CPUs")
        return avail[0], avail[1]
    raise ValueError(f"unknown placement {placement!r} (same or cross)")


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads it starts later inherit it)."""
    tasks = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.exists() else [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, {cpu})


def process_cpu_ns(pid: int) -> int:
    """CPU time (user + system) of process ``pid`` so far, in ns (its CPUCLOCK_SCHED clock).

    The clock id is what ``clock_getcpuclockid(3)`` returns; Linux lets a process read the
    CPU clock of any other process, with nanosecond resolution (``/proc/PID/stat`` ticks are
    10 ms, and ``schedstat`` is often disabled).
    """
    return time.clock_gettime_ns(((~pid) << 3) | 2)


class CpuMeter:
    """CPU time this process and a peer spend between ``start()`` and ``per()``."""

    def __init__(self, peer_pid: int) -> None:
        self.peer_pid = peer_pid
        self.start()

    def start(self) -> None:
        self.own0 = time.process_time_ns()
        self.peer0 = process_cpu_ns(self.peer_pid)

    def per(self, n: int, own: str = "client", peer: str = "server") -> dict[str, float]:
        """Microseconds of CPU per operation, for ``n`` operations since ``start()``."""
        own_ns = time.process_time_ns() - self.own0
        peer_ns = process_cpu_ns(self.peer_pid) - self.peer0
        return {f"{own}_cpu_us": own_ns / n / 1000, f"{peer}_cpu_us": peer_ns / n / 1000}


def quantiles_us(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50, p90, p99 and mean of a sample of nanosecond durations, in microseconds."""
    arr = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    p50, p90, p99 = np.quantile(arr, [0.5, 0.9, 0.99])
    return {"p50_us": float(p50), "p90_us": float(p90), "p99_us": float(p99),
            "mean_us": float(arr.mean()), "n": len(arr)}  # fmt: skip


def median_of(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise median of several result dicts (numeric keys only)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: float(statistics.median(r[k] for r in runs)) for k in keys}


def _pythonpath_env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


# ---- ping-pong ---------------------------------------------------------------------------------


def _short_socket_path(tag: str) -> str:
    return os.path.join(
        tempfile.gettempdir(), f"vmb-{tag}-{os.getpid()}-{time.monotonic_ns() % 10**6}.s"
    )


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"echo server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


def _run_pair(role: str, placement: str, iterations: int, warmup: int,
              cpu_list: Sequence[int] | None) -> dict[str, float]:  # fmt: skip
    """One ping-pong run: an echo server and a client subprocess, pinned; client's stats."""
    server_cpu, client_cpu = placement_cpus(placement, cpu_list)
    path = _short_socket_path("pp")
    py, env = sys.executable, _pythonpath_env()
    echo_role = "_echo" if role == "_pingpong" else "_echo_blocking"
    server = subprocess.Popen([py, str(THIS), echo_role, path, str(server_cpu)], env=env)
    try:
        _wait_for(path, server)
        out = subprocess.run(
            [py, str(THIS), role, path, str(client_cpu), str(iterations), str(warmup),
             str(server.pid)],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        result: dict[str, float] = json.loads(out.stdout)
        return result
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        if os.path.exists(path):
            os.unlink(path)


def pingpong(placement: str, iterations: int = 5000, repeats: int = 3, warmup: int = 500,
             cpu_list: Sequence[int] | None = None) -> dict[str, float]:  # fmt: skip
    """Round trip of ``FRAME_BYTES`` frames between two uvloop processes: medians of repeats."""
    runs = [_run_pair("_pingpong", placement, iterations, warmup, cpu_list) for _ in range(repeats)]
    return {**median_of(runs), "repeats": repeats}


def pingpong_blocking(placement: str, iterations: int = 5000, repeats: int = 3, warmup: int = 500,
                      cpu_list: Sequence[int] | None = None) -> dict[str, float]:  # fmt: skip
    """The same round trip with blocking sockets and no event loop on either side."""
    runs = [_run_pair("_pingpong_blocking", placement, iterations, warmup, cpu_list)
            for _ in range(repeats)]  # fmt: skip
    return {**median_of(runs), "repeats": repeats}


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _echo_main(path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(_Echo, path)
    async with server:
        await server.serve_forever()


class _PingClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= FRAME_BYTES and self.waiter is not None:
            self.got -= FRAME_BYTES
            self.waiter.set_result(None)


async def _pingpong_main(path: str, iterations: int, warmup: int, peer: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(_PingClient, path)
    frame = b"v" * FRAME_BYTES
    samples = np.empty(iterations, dtype=np.int64)
    clock = time.perf_counter_ns
    meter = CpuMeter(peer)
    for i in range(-warmup, iterations):
        if i == 0:
            meter.start()
        t0 = clock()
        proto.waiter = loop.create_future()
        proto.transport.write(frame)
        await proto.waiter
        if i >= 0:
            samples[i] = clock() - t0
    cpu = meter.per(iterations)
    proto.transport.close()
    return {**quantiles_us(samples), **cpu}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def _echo_blocking_main(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)


def _pingpong_blocking_main(path: str, iterations: int, warmup: int, peer: int) -> dict[str, float]:
    frame = b"v" * FRAME_BYTES
    samples = np.empty(iterations, dtype=np.int64)
    clock = time.perf_counter_ns
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        meter = CpuMeter(peer)
        for i in range(-warmup, iterations):
            if i == 0:
                meter.start()
            t0 = clock()
            sock.sendall(frame)
            _recv_exact(sock, FRAME_BYTES)
            if i >= 0:
                samples[i] = clock() - t0
        cpu = meter.per(iterations)
    return {**quantiles_us(samples), **cpu}


# ---- memory, hashing, disk -------------------------------------------------------------------


def _timed(fn: Callable[[], None], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def memcpy_rate(batch: int = 512, pool_pages: int = 16384, rounds: int = 32,
                repeats: int = 5, seed: int = 1) -> dict[str, float]:  # fmt: skip
    """Pages/s copied by NumPy: contiguous blocks of ``batch`` pages and gathers of random pages.

    The source is a ``pool_pages`` array (64 MiB by default, larger than the caches) and each
    round copies from a new random place, as a PageList copy would.
    """
    rng = np.random.default_rng(seed)
    src = np.ones((pool_pages, PAGE_SIZE), dtype=np.uint8)
    dst = np.zeros((batch, PAGE_SIZE), dtype=np.uint8)
    starts = rng.integers(0, pool_pages - batch, size=rounds)
    gathers = [rng.choice(pool_pages, size=batch, replace=False) for _ in range(rounds)]

    def contiguous() -> None:
        for s in starts:
            np.copyto(dst, src[s : s + batch])

    def gather() -> None:
        for idx in gathers:
            np.take(src, idx, axis=0, out=dst)

    contiguous()
    gather()  # warm: fault the destination and source pages in
    pages = batch * rounds
    c = [pages / t for t in _timed(contiguous, repeats)]
    g = [pages / t for t in _timed(gather, repeats)]
    return {
        "contiguous_pages_per_s": float(statistics.median(c)),
        "gather_pages_per_s": float(statistics.median(g)),
        "batch_pages": batch,
        "repeats": repeats,
    }


def hash_rate(pages: int = 4096, repeats: int = 5, seed: int = 2) -> dict[str, float]:
    """Pages/s hashed with xxh3_64, one Python call per 4 KiB page (the share scanner's loop)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(pages, PAGE_SIZE), dtype=np.uint8)
    digest = xxhash.xxh3_64_intdigest

    def run() -> None:
        for row in frames:
            digest(row)

    run()
    rates = [pages / t for t in _timed(run, repeats)]
    return {"xxh3_64_pages_per_s": float(statistics.median(rates)), "repeats": repeats}


def pwrite_rate(directory: str | Path, block: int = 2 << 20, total: int = 64 << 20,
                repeats: int = 5) -> dict[str, float]:  # fmt: skip
    """Bytes/s of ``block``-sized ``os.pwrite`` calls into a file in ``directory`` (no fsync).

    Each repeat rewrites the same ``total`` bytes, so after the first the page cache already
    holds the file's pages, as it does for a long-lived swap file.
    """
    buf = np.full(block, 0x5A, dtype=np.uint8).tobytes()
    fd, name = tempfile.mkstemp(prefix="vmb-pwrite-", dir=str(directory))
    try:
        os.ftruncate(fd, total)

        def run() -> None:
            for off in range(0, total, block):
                os.pwrite(fd, buf, off)

        run()
        rates = [total / t for t in _timed(run, repeats)]
    finally:
        os.close(fd)
        os.unlink(name)
    return {"bytes_per_s": float(statistics.median(rates)), "block_bytes": block,
            "total_bytes": total, "repeats": repeats}  # fmt: skip


def all_limits(directory: str | Path, quick: bool = False,
               placements: Sequence[str] = ("same", "cross")) -> dict[str, Any]:  # fmt: skip
    """Every measurement above, with ``quick`` settings for a fast run."""
    n, reps = (1500, 3) if quick else (5000, 5)
    out: dict[str, Any] = {
        "pingpong": {p: pingpong(p, n, reps) for p in placements},
        "pingpong_blocking": {p: pingpong_blocking(p, n, reps) for p in placements},
        "memcpy": memcpy_rate(rounds=8 if quick else 32, repeats=reps),
        "hash": hash_rate(pages=1024 if quick else 4096, repeats=reps),
        "pwrite": pwrite_rate(directory, total=(16 if quick else 64) << 20, repeats=reps),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):  # subprocess roles
        role, path, cpu = argv[0], argv[1], int(argv[2])
        os.sched_setaffinity(0, {cpu})
        if role == "_echo":
            import uvloop

            uvloop.run(_echo_main(path))
        elif role == "_echo_blocking":
            _echo_blocking_main(path)
        elif role == "_pingpong":
            import uvloop

            res = uvloop.run(_pingpong_main(path, int(argv[3]), int(argv[4]), int(argv[5])))
            print(json.dumps(res))
        elif role == "_pingpong_blocking":
            res = _pingpong_blocking_main(path, int(argv[3]), int(argv[4]), int(argv[5]))
            print(json.dumps(res))
        else:
            raise SystemExit(f"unknown role {role}")
        return 0
    p = argparse.ArgumentParser(description="Measure this machine's limits (JSON on stdout).")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="directory of the pwrite file")
    p.add_argument("--quick", action="store_true", help="fewer iterations (a few seconds)")
    args = p.parse_args(argv)
    placements = ("same", "cross") if len(cpus()) > 1 else ("same",)
    print(json.dumps(all_limits(args.dir, args.quick, placements), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
