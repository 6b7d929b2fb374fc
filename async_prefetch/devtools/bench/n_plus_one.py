"""The ``n-plus-one`` workload: a loop reading relations nobody prefetched.

200 demo books; the loop (a template, a serializer) reads each book's publisher, its
authors and each author's location, and its pages. Sides, alternating within each round,
all synchronous (as template code is):

- ``django_plain``: no prefetch, the N+1 (one query per book and relation);
- ``django_fetch_peers``: Django 6.1's ``fetch_mode(FETCH_PEERS)`` (to-one relations only);
- ``django_prefetch``: the hand-written ``prefetch_related`` of what the loop reads;
- ``autoprefetch``: ``autoprefetch(qs)``, nothing else written;
- ``engine``: the hand-written ``prefetch(qs, ...)`` of the engine;
- ``learned``: ``prefetch(qs, learn=True)``, after one call that taught it the loop.

Every side's result (ids of each book's publisher, authors, locations and pages, in
order) is checked against ``django_prefetch``'s on every run.

Run: ``python -m async_prefetch.devtools.bench.n_plus_one --rtts 0 1 5 --runs 7``; writes
``docs/benchmarks/n-plus-one.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NAME = "n-plus-one"
BOOKS = 200
LOOKUPS = ("publisher", "authors__location", "pages")
SIDES = (
    "django_plain",
    "django_fetch_peers",
    "django_prefetch",
    "autoprefetch",
    "engine",
    "learned",
)

Digest = list[tuple[Any, ...]]


def read_all(books: Sequence[Any]) -> Digest:
    """What the loop body reads, as ids: the timed region includes it on every side."""
    digest: Digest = []
    for book in books:
        publisher = book.publisher
        # Authors have no ordering: the database's order may differ between plans.
        authors = sorted((a.pk, a.location_id and a.location.pk) for a in book.authors.all())
        pages = [p.pk for p in book.pages.all()]
        digest.append((book.pk, publisher.pk, tuple(authors), tuple(pages)))
    return digest


def sides(alias: str, n: int) -> dict[str, Callable[[], Digest]]:
    """Each side as a function of no arguments returning its digest (needs Django set up)."""
    import async_prefetch
    from async_prefetch.access.learn import forget_learned
    from async_prefetch.devtools.demo.models import Book

    def root() -> Any:
        return Book.objects.using(alias).order_by("pk")[:n]

    key = f"bench-{alias}"

    def learned() -> Digest:
        return read_all(async_prefetch.prefetch(root(), learn=True, key=key))

    forget_learned(key)
    learned()  # the first call teaches the plan (a call the bench does not time)
    available: dict[str, Callable[[], Digest]] = {
        "django_plain": lambda: read_all(list(root())),
        "django_prefetch": lambda: read_all(list(root().prefetch_related(*LOOKUPS))),
        "autoprefetch": lambda: read_all(list(async_prefetch.autoprefetch(root()))),
        "engine": lambda: read_all(async_prefetch.prefetch(root(), *LOOKUPS)),
        "learned": learned,
    }
    if hasattr(root(), "fetch_mode"):
        from django.db.models.fetch_modes import FETCH_PEERS  # type: ignore[import-not-found,unused-ignore]

        available["django_fetch_peers"] = lambda: read_all(list(root().fetch_mode(FETCH_PEERS)))
    return {side: available[side] for side in SIDES if side in available}


def bench(alias: str, runs: int, n: int = BOOKS) -> dict[str, list[float]]:
    """Alternating timed runs of every side; raises ``AssertionError`` on a mismatch."""
    functions = sides(alias, n)
    expected = functions["django_prefetch"]()
    for side, function in functions.items():  # warm up, and check once before timing
        got = function()
        if got != expected:
            first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
            raise AssertionError(
                f"{side}: result differs from django_prefetch's at book {first}: "
                f"{got[first]} != {expected[first]}"
            )
    times: dict[str, list[float]] = {side: [] for side in functions}
    for _ in range(runs):
        for side, function in functions.items():
            gc.collect()
            started = time.perf_counter()
            digest = function()
            times[side].append(time.perf_counter() - started)
            if digest != expected:
                raise AssertionError(f"{side}: result differs from django_prefetch's")
    return times


def table(results: dict[float, dict[str, list[float]]]) -> str:
    """Markdown: medians in ms per side and RTT, and the targets' ratios."""
    all_sides = [s for s in SIDES if any(s in r for r in results.values())]
    header = ["RTT ms", *[f"{s} ms" for s in all_sides]]
    header += ["autoprefetch / django_prefetch", "learned / engine", "django_plain / autoprefetch"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for rtt, times in results.items():
        med = {s: statistics.median(v) * 1000 for s, v in times.items()}
        cells = [f"{rtt:g}", *[f"{med[s]:.1f}" if s in med else "-" for s in all_sides]]
        cells += [
            f"{med['autoprefetch'] / med['django_prefetch']:.2f}x",
            f"{med['learned'] / med['engine']:.2f}x",
            f"{med['django_plain'] / med['autoprefetch']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.n_plus_one")
    parser.add_argument("--rtts", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--books", type=int, default=BOOKS)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/n-plus-one.md"))
    args = parser.parse_args(argv)

    from async_prefetch.devtools.bench.runner import alias_for, bench_database, machine_facts
    from async_prefetch.devtools.demo.bookstore import seed

    started = time.perf_counter()
    results: dict[float, dict[str, list[float]]] = {}
    with bench_database(args.rtts) as (server, _):
        seed(max(args.books, 200))
        facts = machine_facts(server)
        for rtt in args.rtts:
            results[rtt] = bench(alias_for(rtt), args.runs, args.books)
            print(f"{NAME} @ {rtt:g} ms done", file=sys.stderr)
    body = table(results)
    command = "python -m async_prefetch.devtools.bench.n_plus_one " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = "\n".join(
        [
            "# N+1: auto-prefetch and learned plans",
            "",
            f"- command: `{command.strip()}` (wall time {time.perf_counter() - started:.0f} s)",
            f"- Python {facts.get('python')}, Django {facts.get('django')}, "
            f"PostgreSQL {facts.get('postgresql')}; {facts.get('cpu_count')} CPUs; "
            f"{facts.get('date')}, git {facts.get('git')}",
            f"- {args.books} demo books; the loop reads each book's publisher, authors and "
            "their locations, and pages; sides alternate within each round; medians of "
            f"{args.runs} runs; every run's ids checked against `django_prefetch`.",
            "",
            body,
            "",
            "Targets (issue 15): `autoprefetch` within 1.2x of the hand-written "
            "`prefetch_related`; the learned plan within 1.1x of the hand-written engine "
            "call.",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
