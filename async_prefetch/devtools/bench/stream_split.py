"""Where a ``stream`` side's time goes: CPU per thread and the cyclic garbage collector.

``python -m async_prefetch.devtools.bench.stream_split --books 100000 --rtt 0 --runs 2
--sides engine engine_memo floor`` starts (or finds) PostgreSQL as the bench does, puts one
latency proxy in front of it, seeds the books, runs each side once to warm up, then ``runs``
times (sides alternating) and prints, per run: wall time, the process's CPU time, the CPU
time of the engine's loop thread (where a stream reads, prefetches and fills caches) and of
the calling thread (the loop body, and the caller's side of each hand-over), and the
collector's runs per generation with their wall time (``gc.callbacks``: a collection holds
the GIL, so the other thread waits meanwhile). Every run's digest must equal the first
side's. Run it under ``py-spy record --gil`` for the functions holding the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Sequence
from typing import Any

from async_prefetch.devtools.bench import runner, stream


async def _thread_time() -> float:
    return time.thread_time()


class _GcClock:
    """Runs and wall time of the collector per generation (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.collections: dict[int, tuple[int, float]] = {}
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        count, total = self.collections.get(info["generation"], (0, 0.0))
        self.collections[info["generation"]] = (
            count + 1,
            total + time.perf_counter() - self._started,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.stream_split")
    parser.add_argument("--books", type=int, default=stream.BOOKS)
    parser.add_argument("--chunk-size", type=int, default=stream.CHUNK_SIZE)
    parser.add_argument("--rtt", type=float, default=0.0, help="added round-trip time, ms")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=["engine", "engine_memo", "floor"])
    args = parser.parse_args(argv)
    from async_prefetch.devtools.embedded import get_server
    from async_prefetch.devtools.latency_proxy import LatencyProxyProcess
    from async_prefetch.runtime import bridge

    server = get_server()
    alias = runner.alias_for(args.rtt)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(LatencyProxyProcess(server.address(), args.rtt))
        runner.configure_django(server, {alias: (proxy.host, proxy.port)})
        stack.callback(runner.shutdown_engine)
        from django.core.management import call_command

        call_command("migrate", run_syncdb=True, verbosity=0)
        workload = stream.StreamWorkload(books=args.books, chunk_size=args.chunk_size)
        workload.seed()
        with asyncio.Runner() as loop:
            reference: stream.Digest | None = None
            for side in args.sides:
                _, digest = workload.timed(side, alias, loop)
                reference = reference or digest
                assert reference.difference(digest, args.chunk_size) is None, side
            for run in range(args.runs):
                for side in args.sides:
                    clock = _GcClock()
                    gc.collect()
                    gc.callbacks.append(clock.callback)
                    cpu, engine, caller = (
                        time.process_time(),
                        bridge.run_sync(_thread_time),
                        time.thread_time(),
                    )
                    try:
                        seconds, digest = workload.timed(side, alias, loop)
                    finally:
                        gc.callbacks.remove(clock.callback)
                    cpu, engine, caller = (
                        time.process_time() - cpu,
                        bridge.run_sync(_thread_time) - engine,
                        time.thread_time() - caller,
                    )
                    assert reference is not None
                    assert reference.difference(digest, args.chunk_size) is None, side
                    gcs = ", ".join(
                        f"gen{generation} {count:.0f}x {total:.2f} s"
                        for generation, (count, total) in sorted(clock.collections.items())
                    )
                    print(
                        f"run {run + 1} {side:18} wall {seconds:6.2f} s  cpu {cpu:6.2f} s  "
                        f"engine thread {engine:5.2f} s  caller thread {caller:5.2f} s  "
                        f"gc: {gcs}  (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
