"""``python -m async_prefetch demo``: one page of a seeded bookstore, by Django and by the engine.

:func:`main` starts (or finds) PostgreSQL with
:func:`async_prefetch.devtools.embedded.get_server` and, unless ``--rtt-ms 0``, puts a
:class:`~async_prefetch.devtools.latency_proxy.LatencyProxyProcess` between Python and it
(2 ms per round trip by default, as to a cloud database in the same region). It seeds the
bookstore once, fetches the same page with Django's ``prefetch_related`` and with
``aprefetch`` alternately (``--runs`` times each, after a warm-up), and prints both median
times, their ratio, whether both fetched the same objects, and the engine's timeline of
which queries ran at the same time. The exit code is 1 when the results differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TextIO

import async_prefetch
from async_prefetch.devtools.demo.bookstore import (
    DemoResult,
    configure_django,
    run_django_side,
    run_engine_side,
    seed,
)
from async_prefetch.devtools.embedded import get_server

DEFAULT_RTT_MS = 2.0
"""A round trip to a managed PostgreSQL in the same cloud region: about 1 to 3 ms."""


def median_of(runs: int, sides: Sequence[Callable[[], DemoResult]]) -> list[DemoResult]:
    """Run the sides alternately ``runs`` times; per side, the run with the median time."""
    results: list[list[DemoResult]] = [[] for _ in sides]
    for _ in range(runs):
        for i, side in enumerate(sides):
            results[i].append(side())
    medians = []
    for per_side in results:
        seconds = statistics.median(r.seconds for r in per_side)
        medians.append(min(per_side, key=lambda r: abs(r.seconds - seconds)))
    return medians


def comparison(django_result: DemoResult, engine_result: DemoResult) -> str:
    """``"3.1x faster"`` (or ``"1.2x slower"``): the engine's time against Django's."""
    ratio = django_result.seconds / engine_result.seconds
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def report(
    django_result: DemoResult, engine_result: DemoResult, runs: int, stream: TextIO = sys.stdout
) -> None:
    """Print both sides' times, their ratio, the engine's timeline and the first books."""
    width = max(len(django_result.label), len(engine_result.label))
    for result, how in (
        (django_result, "one after another"),
        (engine_result, "independent ones at the same time"),
    ):
        print(
            f"  {result.label:<{width}}  {result.seconds * 1000:7.1f} ms  "
            f"({result.queries} queries, {how})",
            file=stream,
        )
    same = django_result.signature == engine_result.signature
    print(
        f"The engine was {comparison(django_result, engine_result)} (medians of {runs} runs "
        f"each); {'both fetched the same objects' if same else 'THE RESULTS DIFFER'}.",
        file=stream,
    )
    print("\nThe engine's timeline (bars that overlap ran at the same time):", file=stream)
    for line in engine_result.timeline.splitlines():
        print(f"  {line}", file=stream)
    print("\nThe first books of the page:", file=stream)
    for line in engine_result.sample:
        print("  " + textwrap.shorten(line, 98, placeholder=" ..."), file=stream)


def _close_engine() -> None:
    asyncio.run(async_prefetch.aclose())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code (1 when the two results differ)."""
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch demo",
        description="Seed a bookstore in PostgreSQL and fetch one page with Django's "
        "prefetch_related and with async_prefetch, over a simulated network round trip.",
    )
    parser.add_argument("--books", type=int, default=200, help="books to seed (default 200)")
    parser.add_argument("--page-size", type=int, default=50, help="books per page (default 50)")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=DEFAULT_RTT_MS,
        help="simulated network round trip between Python and PostgreSQL, in ms "
        f"(default {DEFAULT_RTT_MS:g}, as to a cloud database; 0: plain loopback)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log server start-up")
    args = parser.parse_args(argv)
    if args.rtt_ms < 0 or args.runs < 1 or args.books < 1 or args.page_size < 1:
        parser.error("--rtt-ms must be >= 0; --runs, --books and --page-size >= 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )

    server = get_server()
    print(f"PostgreSQL: {server.source}, {server.host or 'default socket'}")
    with contextlib.ExitStack() as stack:
        proxy = None
        if args.rtt_ms > 0:
            from async_prefetch.devtools.latency_proxy import LatencyProxyProcess

            running = stack.enter_context(LatencyProxyProcess(server.address(), args.rtt_ms))
            proxy = (running.host, running.port)
            print(
                f"Network: {args.rtt_ms:g} ms per round trip, simulated by a latency proxy "
                "between Python and PostgreSQL\n"
                "  (a database in the same cloud region; --rtt-ms 0 for plain loopback)"
            )
        else:
            print(
                "Network: none, plain loopback (a round trip costs microseconds here;\n"
                f"  a database in the same cloud region adds about {DEFAULT_RTT_MS:g} ms: "
                f"try --rtt-ms {DEFAULT_RTT_MS:g})"
            )
        configure_django(server, proxy)
        # Close the engine's pool while the proxy still runs (the stack unwinds in reverse).
        stack.callback(_close_engine)
        started = time.perf_counter()
        if seed(args.books):
            print(f"Seeded {args.books} books in {time.perf_counter() - started:.1f} s")
        else:
            print("The bookstore was seeded already")
        sides = [partial(run_django_side, args.page_size), partial(run_engine_side, args.page_size)]
        for side in sides:  # warm up: connections, the engine's pool, caches
            side()
        django_result, engine_result = median_of(args.runs, sides)
        print(
            f"\nOne page: {django_result.books} books with their publisher, authors (and their "
            "location),\ntags, pages and good reviews: Book.objects.prefetch_related(...)[:"
            f"{args.page_size}]"
        )
        report(django_result, engine_result, args.runs)
    return 0 if django_result.signature == engine_result.signature else 1
