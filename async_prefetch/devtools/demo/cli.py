"""``python -m async_prefetch demo``: a seeded bookstore, by Django and by the engine.

:func:`main` starts (or finds) PostgreSQL with
:func:`async_prefetch.devtools.embedded.get_server` and, unless ``--rtt-ms 0``, puts a
:class:`~async_prefetch.devtools.latency_proxy.LatencyProxyProcess` between Python and it
(2 ms per round trip by default, as to a cloud database in the same region). It seeds the
bookstore once, fetches the same page with Django's ``prefetch_related`` and with
``aprefetch`` alternately (``--runs`` times each, after a warm-up), and prints both median
times, their ratio, whether both fetched the same objects, and the engine's timeline of
which queries ran at the same time. Then, the same way, the scenarios of
:mod:`~async_prefetch.devtools.demo.scenarios`: a loop that reads relations nobody
prefetched (Django's lazy loads against ``autoprefetch``, and ``prefetch_report``'s
findings), a detail page's independent querysets (``asyncio.gather`` of Django's async
methods against ``agather`` and ``PoolQuerySet``) and a stream of every book (Django's
``aiterator`` against the engine's, with a memo). The exit code is 1 when any two sides
of a section read different objects.
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
from async_prefetch.devtools.demo import scenarios
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
SAME_SPEED = 1.15
"""Medians within this factor of each other count as the same speed (no gain to claim)."""


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
        (engine_result, "independent ones at once"),
    ):
        print(
            f"  {result.label:<{width}}  {result.seconds * 1000:7.1f} ms  "
            f"({result.queries} queries, {how})",
            file=stream,
        )
    same = django_result.signature == engine_result.signature
    text = (
        f"The engine was {comparison(django_result, engine_result)} (medians of {runs} runs "
        f"each); {'both fetched the same objects' if same else 'THE RESULTS DIFFER'}."
    )
    print(textwrap.fill(text, 79, subsequent_indent="  "), file=stream)
    print("\nThe engine's timeline (bars that overlap ran at the same time):", file=stream)
    for line in engine_result.timeline.splitlines():
        print(f"  {line}", file=stream)
    print("\nThe first books of the page:", file=stream)
    for line in engine_result.sample:
        print("  " + textwrap.shorten(line, 76, placeholder=" ..."), file=stream)


def verdict(django_result: DemoResult, engine_result: DemoResult) -> str:
    """``"3.1x faster, 240 fewer queries"``, or ``"as fast as Django (1.05x): no gain to
    claim here"`` when the medians are within :data:`SAME_SPEED` of each other."""
    ratio = django_result.seconds / engine_result.seconds
    if 1 / SAME_SPEED < ratio < SAME_SPEED:
        said = f"as fast as Django ({ratio:.2f}x): no gain to claim here"
    else:
        said = comparison(django_result, engine_result)
    fewer = django_result.queries - engine_result.queries
    if fewer:
        said += f", {abs(fewer)} {'fewer' if fewer > 0 else 'more'} queries"
    return said


def report_scenario(
    title: str, results: Sequence[DemoResult], runs: int, stream: TextIO = sys.stdout
) -> bool:
    """Print ``title``, each side's median time and queries, and how each engine side
    compares with Django's (``results[0]``); ``True`` when every side read the same
    objects as Django's."""
    print("\n" + textwrap.fill(title, 79), file=stream)
    width = max(len(result.label) for result in results)
    for result in results:
        print(
            f"  {result.label:<{width}}  {result.seconds * 1000:7.1f} ms  "
            f"({result.queries} queries)",
            file=stream,
        )
    django_result, *engine_results = results
    same = all(r.signature == django_result.signature for r in engine_results)
    said = "; ".join(f"{r.label}: {verdict(django_result, r)}" for r in engine_results)
    what = "both" if len(results) == 2 else f"all {len(results)}"
    text = (
        f"{said} (medians of {runs} runs each); "
        f"{what + ' read the same objects' if same else 'THE RESULTS DIFFER'}."
    )
    print(textwrap.fill(text, 79, subsequent_indent="  "), file=stream)
    return same


def describe_report(report: async_prefetch.PrefetchReport) -> str:
    """``prefetch_report()``'s N+1s in a line or two: the relations and their queries."""
    found = ", ".join(f"{g.model}.{g.relation} ({g.loads})" for g in report.n_plus_one)
    queries = sum(g.loads for g in report.n_plus_one)
    text = (
        f"prefetch_report() on Django's loop: {len(report.n_plus_one)} N+1s, {queries} "
        f"queries: {found}"
    )
    return textwrap.fill(text, 78, initial_indent="  ", subsequent_indent="    ")


def run_scenarios(args: argparse.Namespace, stack: contextlib.ExitStack) -> bool:
    """The sections after the page; ``True`` when every side read Django's objects."""
    page = args.page_size
    runner = stack.enter_context(asyncio.Runner())

    # Warm-ups; Django's is the run prefetch_report() watches.
    books = min(page, scenarios.LOOP_BOOKS)
    _, n_plus_one = scenarios.n_plus_one_report(books)
    lazy = [partial(scenarios.run_lazy_loop, books), partial(scenarios.run_autoprefetch, books)]
    lazy[1]()
    same = report_scenario(
        f"The N+1: a loop over the first {books} books of the page reads relations nobody "
        "prefetched, as a "
        "template or a serializer does. Django loads them one book at a time; "
        "autoprefetch(qs) loads each relation for all the books at once, as the page's "
        "hand-written prefetch_related above does.",
        median_of(args.runs, lazy),
        args.runs,
    )
    print(describe_report(n_plus_one))

    detail = scenarios.choose_detail_page()
    gathers = [
        partial(scenarios.run_django_gather, runner, detail),
        partial(scenarios.run_agather, runner, detail),
        partial(scenarios.run_pool_gather, runner, detail),
    ]
    for side in gathers:
        side()
    same &= report_scenario(
        "Several querysets at once: an async view needs five independent ones, two of "
        "them prefetching. Django runs its async methods on one thread, one query at a "
        "time, even under asyncio.gather(); agather() and PoolQuerySet run them at once.",
        median_of(args.runs, gathers),
        args.runs,
    )

    streams = [
        partial(scenarios.run_django_stream, runner, page),
        partial(scenarios.run_engine_stream, runner, page),
    ]
    for side in streams:
        side()
    same &= report_scenario(
        f"Streaming: every book ({scenarios.stream_size()}), {page} at a time, with its "
        "publisher, authors and tags. "
        "Django's aiterator() prefetches each chunk one query after another while the "
        "loop waits; the engine's reads the next chunk while the loop works, and with "
        "Memo(Publisher, all=True) loads the publishers once.",
        median_of(args.runs, streams),
        args.runs,
    )
    return same


def _close_engine() -> None:
    asyncio.run(async_prefetch.aclose())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code (1 when two sides' results differ)."""
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch demo",
        description="Seed a bookstore in PostgreSQL and fetch one page with Django's "
        "prefetch_related and with async_prefetch, over a simulated network round trip; "
        "then a loop that forgot prefetch_related, independent querysets in an async view "
        "and a stream of every book, each by Django and by the engine.",
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

    began = time.perf_counter()
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
                "between Python and\n  PostgreSQL, as to a cloud database in the same region "
                "(--rtt-ms 0: loopback)"
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
        same = django_result.signature == engine_result.signature
        same &= run_scenarios(args, stack)
    print(f"\nDone in {time.perf_counter() - began:.1f} s.")
    return 0 if same else 1
