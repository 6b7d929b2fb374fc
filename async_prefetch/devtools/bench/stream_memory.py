"""Where a ``stream`` side's resident memory goes.

``python -m async_prefetch.devtools.bench.stream_memory`` starts (or finds) PostgreSQL as the
bench does, seeds the books, and prints:

* each variant's peak resident memory (``VmHWM``) streaming every book, one fresh process per
  variant, variants alternating over ``--rounds``: Django's ``iterator(chunk_size)`` with
  ``prefetch_related()``, and the engine's :func:`async_prefetch.iterator` with each
  ``--read-ahead`` (0: no chunk is fetched ahead of the loop); beside it, the resident size
  before the stream and the peak of a second stream in the same process (the engine's
  first stream also pays for its start: its modules, thread and pool);
* the live Python memory (``tracemalloc``, after a collection) that one chunk of books with
  its caches holds, Django's ``prefetch_related`` beside the engine's ``prefetch``.

A variant whose peak does not move with ``read_ahead`` spends its extra memory elsewhere
than on the chunk read ahead.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Sequence
from typing import Any

from async_prefetch.devtools.bench import runner, stream


def _child(variant: str, host: str, port: str, books: int, chunk_size: int) -> int:
    """A fresh process streaming every book, twice (:func:`runner.memory_runs`)."""
    from async_prefetch.devtools.embedded import get_server

    alias = runner.alias_for(0.0)
    runner.configure_django(get_server(), {alias: (host, int(port))})
    import async_prefetch

    workload = stream.StreamWorkload(books=books, chunk_size=chunk_size)

    def run_once() -> int:
        root = workload.root(alias)
        if variant == "django":
            books_iter: Any = root.prefetch_related(*stream.LOOKUPS).iterator(chunk_size)
        else:
            read_ahead = int(variant.removeprefix("engine_read_ahead_"))
            books_iter = async_prefetch.iterator(
                root, *stream.LOOKUPS, chunk_size=chunk_size, read_ahead=read_ahead
            )
        return stream.consume(books_iter, chunk_size).books

    return runner.print_memory(runner.memory_runs(stream.NAME, variant, 0.0, run_once))


def _live_chunk_kib(alias: str, chunk_size: int, rounds: int) -> dict[str, float]:
    """Live Python memory (KiB) of one chunk of books with its caches, per side (median)."""
    import statistics

    import async_prefetch

    root = stream.StreamWorkload(books=chunk_size, chunk_size=chunk_size).root(alias)

    def django() -> list[Any]:
        return list(root.prefetch_related(*stream.LOOKUPS))

    def engine() -> list[Any]:
        return async_prefetch.prefetch(root, *stream.LOOKUPS)

    sides = {"django": django, "engine": engine}
    for make in sides.values():
        make()  # warm-up: compiled queries, generated loops
    live: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, make in sides.items():
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                books = make()
                gc.collect()
                live[side].append((tracemalloc.get_traced_memory()[0] - before) / 1024)
                del books
            finally:
                tracemalloc.stop()
    return {side: statistics.median(values) for side, values in live.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.stream_memory")
    parser.add_argument("--books", type=int, default=stream.BOOKS)
    parser.add_argument("--chunk-size", type=int, default=stream.CHUNK_SIZE)
    parser.add_argument("--read-ahead", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--child", nargs=3, metavar=("VARIANT", "HOST", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        variant, host, port = args.child
        return _child(variant, host, port, books=args.books, chunk_size=args.chunk_size)
    variants = ["django", *(f"engine_read_ahead_{n}" for n in args.read_ahead)]
    peaks: dict[str, list[float]] = {variant: [] for variant in variants}
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    befores: dict[str, list[float]] = {variant: [] for variant in variants}
    with runner.bench_database([0.0]) as (server, proxies):
        stream.StreamWorkload(books=args.books, chunk_size=args.chunk_size).seed()
        host, port = proxies[runner.alias_for(0.0)]
        for _ in range(args.rounds):
            for variant in variants:
                command = [
                    *(sys.executable, "-m", "async_prefetch.devtools.bench.stream_memory"),
                    *("--books", str(args.books), "--chunk-size", str(args.chunk_size)),
                    *("--child", variant, host, str(port)),
                ]
                payload, error = runner.run_memory_child(
                    command, runner.child_env(server), timeout=900
                )
                if payload is None:
                    print(f"{variant} failed {error}")
                    return 1
                peaks[variant].append(payload["peak_kib"] / 1024)
                seconds[variant].append(payload["second_peak_kib"] / 1024)
                befores[variant].append(payload["baseline_kib"] / 1024)
                print(f"{variant}: peak {peaks[variant][-1]:.1f} MiB", file=sys.stderr, flush=True)
        live = _live_chunk_kib(runner.alias_for(0.0), args.chunk_size, args.rounds * 2)
    print(
        f"| variant | peak RSS MiB ({args.rounds} fresh processes) | second stream: peak MiB"
        " | RSS before MiB |\n| --- | --- | --- | --- |"
    )
    for variant, values in peaks.items():
        columns = (values, seconds[variant], befores[variant])
        print(f"| {variant} | {' | '.join(' / '.join(f'{v:.1f}' for v in c) for c in columns)} |")
    print(f"\nLive Python memory of one chunk of {args.chunk_size} books with its caches:")
    for side, kib in live.items():
        print(f"- {side}: {kib / 1024:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
