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
import gc
import os
import time
from collections.abc import Sequence

from async_prefetch.devtools.bench import runner, stream


async def _thread_time() -> float:
    return time.thread_time()


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.stream_split")
    parser.add_argument("--books", type=int, default=stream.BOOKS)
    parser.add_argument("--chunk-size", type=int, default=stream.CHUNK_SIZE)
    parser.add_argument("--rtt", type=float, default=0.0, help="added round-trip time, ms")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=["engine", "engine_memo", "floor"])
    args = parser.parse_args(argv)
    from async_prefetch.runtime import bridge

    alias = runner.alias_for(args.rtt)
    with runner.bench_database([args.rtt]):
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
                    gc.collect()
                    cpu, engine, caller = (
                        time.process_time(),
                        bridge.run_sync(_thread_time),
                        time.thread_time(),
                    )
                    with runner.CollectorClock() as clock:
                        seconds, digest = workload.timed(side, alias, loop)
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
