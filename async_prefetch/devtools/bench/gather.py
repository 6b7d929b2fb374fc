"""The ``gather`` workload (independent querysets at once) and the ``atomic`` variants.

``gather``: an async view's five independent querysets on the demo bookstore, two of them
with ``prefetch_related`` (a book by pk with its authors, a page of 20 books with their
pages, the book's reviews, an author by name, the publishers). Sides, alternating within
each round, each run from the same event loop:

- ``django``: ``asyncio.gather`` of Django's ``aget()`` and ``[x async for x in qs]``;
- ``agather``: the engine's ``agather(...)`` of the five querysets;
- ``agather_pipeline``: ``agather(..., round_trips=1)`` (one pooled connection, each
  stage's queries in one pipeline);
- ``pool_terminals``: ``asyncio.gather`` of :class:`~async_prefetch.terminals.PoolQuerySet`'s
  ``aget()`` and ``async for``;
- ``single_query_fetch``: django-querysets-single-query-fetch's one JSON-aggregated query
  for the five root querysets, then Django's ``prefetch_related_objects`` for the two
  querysets' lookups (the package does not prefetch), in ``sync_to_async`` as an async view
  calls sync code; only when the package is installed (it always queries the ``default``
  database: the bench points that name at the proxied alias for the side's duration);
- ``floor_queries``: the engine's own SQL and parameters for the call (recorded once), the
  five root queries at once on five psycopg connections, then the two relation queries at
  once, rows read as tuples, through the same proxy (:class:`QueryFloor`): the I/O floor of
  these queries at one round trip per stage;
- ``floor``: ``STAGES`` sequential ``SELECT 1`` round trips on one psycopg connection
  through the same proxy: one round trip per stage (the root queries, then the prefetches).

``atomic``: the runner's ``chain`` and ``fanout-100`` workloads
(:func:`~async_prefetch.devtools.bench.workloads.build_workloads`) evaluated synchronously
inside ``transaction.atomic()``, as an ``ATOMIC_REQUESTS`` view does: ``django``
(``list(root.prefetch_related(*lookups))``), ``engine`` (``prefetch(root, *lookups)``: the
caller's connection, each stage in one pipeline), ``engine_unpipelined`` (the same with
``PIPELINE: False``: one query after another on the caller's connection) and, for
reference, ``engine_pool`` (``prefetch()`` outside ``atomic``, on the pool).

Every run of every side is checked against Django's result (``gather``: ids and
prefetch caches of each result; ``atomic``: the workload's structural signature); a
difference raises :class:`AssertionError`.

Run: ``python -m async_prefetch.devtools.bench.gather --rtts 0 1 5 --runs 7``; writes
``docs/benchmarks/gather.md`` (``--out``). ``--quick``: one run at RTT 0, small workloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = "gather"
STAGES = 2
"""Round trips one ``gather`` call needs at least: the root queries, then the prefetches."""
PAGE = 20
GATHER_SIDES = (
    "django",
    "agather",
    "agather_pipeline",
    "pool_terminals",
    "single_query_fetch",
    "floor_queries",
    "floor",
)
ATOMIC_WORKLOADS = ("chain", "fanout-100")
ATOMIC_SIDES = ("django", "engine", "engine_unpipelined", "engine_pool")
GATHER_TARGET = 1.3
"""``agather`` at 5 ms within this factor of :data:`STAGES` round trips (issue 16)."""
ATOMIC_TARGET = 3.0
"""Inside ``atomic``, Django over the engine on ``fanout-100`` at 5 ms, at least (issue 16)."""

Digest = tuple[Any, ...]


# -- the gather workload ------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The rows the five querysets pick (chosen once from the seeded data)."""

    book: int
    author: str
    offset: int


def choose_targets(alias: str) -> Targets:
    """A book with reviews and authors, an author's name, a page offset (needs Django)."""
    from async_prefetch.devtools.demo.models import Author, Book

    books = list(Book.objects.using(alias).order_by("pk").values_list("pk", flat=True)[:60])
    if len(books) < PAGE + 20:
        raise RuntimeError(f"the demo bookstore has {len(books)} books; the bench needs 40+")
    book = next(
        pk
        for pk in books[10:]
        if Book.objects.using(alias).filter(pk=pk, authors__isnull=False).exists()
        and Book.objects.using(alias).filter(pk=pk, reviews__isnull=False).exists()
    )
    author = Author.objects.using(alias).order_by("pk").values_list("name", flat=True)[7]
    return Targets(book=book, author=author, offset=10)


def querysets(alias: str, targets: Targets, base: type | None = None) -> list[Any]:
    """The five querysets, each with its own lookups (``base``: a ``QuerySet`` class, e.g.
    :class:`~async_prefetch.terminals.PoolQuerySet`; default: the models' managers).
    Those read with ``aget()`` are filtered here; :func:`gather_django` and
    :func:`gather_pool` call ``aget()`` on the unfiltered ones of :func:`get_querysets`."""
    book, page, reviews, author, publishers = get_querysets(alias, targets, base)
    return [
        book.filter(pk=targets.book),
        page,
        reviews,
        author.filter(name=targets.author),
        publishers,
    ]


def get_querysets(alias: str, targets: Targets, base: type | None = None) -> list[Any]:
    """:func:`querysets` before the ``aget()`` filters of the first and fourth."""
    from async_prefetch.devtools.demo.models import Author, Book, Publisher, Review

    def of(model: type[Any]) -> Any:
        if base is None:
            return model.objects.using(alias)
        return base(model=model, using=alias)

    offset = targets.offset
    return [
        of(Book).prefetch_related("authors"),
        of(Book).order_by("pk")[offset : offset + PAGE].prefetch_related("pages"),
        of(Review).filter(book_id=targets.book).order_by("pk"),
        of(Author),
        of(Publisher).order_by("name", "pk"),
    ]


def digest(results: Sequence[Any]) -> Digest:
    """Ids (and the prefetch caches' ids) of the five results: ``(book, books, reviews,
    author, publishers)``, the first and fourth an instance or a one-element list. Reads
    the prefetch caches directly: a missing cache raises ``KeyError`` (no lazy query)."""
    book, books, reviews, author, publishers = (
        r[0] if i in (0, 3) and isinstance(r, list) else r for i, r in enumerate(results)
    )
    if isinstance(results[0], list) and len(results[0]) != 1:
        raise AssertionError(f"book: {len(results[0])} rows")
    if isinstance(results[3], list) and len(results[3]) != 1:
        raise AssertionError(f"author: {len(results[3])} rows")
    return (
        (
            book.pk,
            book.title,
            tuple(sorted(a.pk for a in book._prefetched_objects_cache["authors"])),
        ),
        tuple((b.pk, tuple(p.pk for p in b._prefetched_objects_cache["pages"])) for b in books),
        tuple(r.pk for r in reviews),
        (author.pk, author.name, author.location_id),
        tuple(p.pk for p in publishers),
    )


async def gather_django(alias: str, targets: Targets, base: type | None = None) -> list[Any]:
    """``asyncio.gather`` of ``aget()`` and async list comprehensions: Django's own
    methods, or those of ``base`` (a queryset class, e.g.
    :class:`~async_prefetch.terminals.PoolQuerySet`)."""
    book, page, reviews, author, publishers = get_querysets(alias, targets, base)

    async def rows(queryset: Any) -> list[Any]:
        return [obj async for obj in queryset]

    return list(
        await asyncio.gather(
            book.aget(pk=targets.book),
            rows(page),
            rows(reviews),
            author.aget(name=targets.author),
            rows(publishers),
        )
    )


async def gather_engine(alias: str, targets: Targets, round_trips: int | None = None) -> list[Any]:
    """The engine: ``agather`` of the five querysets."""
    from async_prefetch.gather import agather

    return list(await agather(*querysets(alias, targets), round_trips=round_trips))


async def gather_pool(alias: str, targets: Targets) -> list[Any]:
    """:func:`gather_django` with :class:`~async_prefetch.terminals.PoolQuerySet`'s
    ``aget()`` and ``async for``."""
    from async_prefetch.terminals import PoolQuerySet

    return await gather_django(alias, targets, PoolQuerySet)


SQF_MODULE = "django_querysets_single_query_fetch.service"


def _sqf_service() -> Any:
    """django-querysets-single-query-fetch's module (imported by name: it is optional and
    untyped); raises ``ImportError`` when it is not installed."""
    return importlib.import_module(SQF_MODULE)


def single_query_fetch_available() -> bool:
    """Whether django-querysets-single-query-fetch is importable."""
    try:
        _sqf_service()
    except ImportError:
        return False
    return True


class _DefaultIs:
    """A stand-in for ``django.db.connections`` whose ``default`` is ``alias``'s."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __getitem__(self, name: str) -> Any:
        from django.db import connections

        return connections[self.alias if name == "default" else name]


@contextlib.contextmanager
def _default_database(alias: str) -> Iterator[None]:
    service = _sqf_service()
    saved = service.connections
    service.connections = _DefaultIs(alias)
    try:
        yield
    finally:
        service.connections = saved


def single_query_fetch(alias: str, targets: Targets) -> list[Any]:
    """django-querysets-single-query-fetch for the roots, Django's
    ``prefetch_related_objects`` for the lookups (sync; needs the package)."""
    from django.db.models import prefetch_related_objects

    qs = querysets(alias, targets)
    lookups = [list(q._prefetch_related_lookups) for q in qs]
    plain = [q.prefetch_related(None) for q in qs]
    with _default_database(alias):
        results: list[Any] = _sqf_service().QuerysetsSingleQueryFetch(querysets=plain).execute()
    for rows, names in zip(results, lookups, strict=True):
        if names:
            prefetch_related_objects(rows, *names)
    return results


def _connect_kwargs(alias: str) -> dict[str, Any]:
    """psycopg's ``connect()`` arguments for ``alias``'s ``DATABASES`` entry (its proxy)."""
    from django.conf import settings

    entry = settings.DATABASES[alias]
    return {
        "dbname": entry["NAME"],
        "user": entry["USER"],
        "password": entry.get("PASSWORD") or None,
        "host": entry.get("HOST") or None,
        "port": entry.get("PORT") or None,
    }


class Floor:
    """One psycopg connection to ``alias``'s server through its proxy (Django's
    ``DATABASES`` entry); :meth:`run` sends ``n`` ``SELECT 1`` one after another."""

    def __init__(self, alias: str) -> None:
        import psycopg

        self.connection = psycopg.connect(**_connect_kwargs(alias), autocommit=True)

    def run(self, n: int = STAGES) -> int:
        for _ in range(n):
            self.connection.execute("SELECT 1").fetchone()
        return n

    def close(self) -> None:
        self.connection.close()


class QueryFloor:
    """The I/O of one ``agather`` call without the engine: the SQL and parameters the
    engine sent (recorded from a traced call), the root queries at once on connections of
    their own, then the relation queries at once, each result read into tuples with
    psycopg on the caller's loop, through the same proxy. What any evaluation of these
    queries with one round trip per stage waits for, building no instances."""

    def __init__(self, alias: str, stages: list[list[tuple[str, Any]]]) -> None:
        self.alias = alias
        self.stages = stages
        self.connections: list[Any] = []

    @classmethod
    async def record(cls, alias: str, targets: Targets) -> QueryFloor:
        """The stages of ``agather``'s queries for ``targets`` (roots, then relations)."""
        from async_prefetch import tracing
        from async_prefetch.runtime.trace import ROOT_KEY

        with tracing() as trace:
            await gather_engine(alias, targets)
        stages: list[list[tuple[str, Any]]] = [[], []]
        for step in trace.steps:
            if step.kind == "query" and step.sql is not None:
                stages[step.key != ROOT_KEY].append((step.sql, step.params))
        return cls(alias, stages)

    async def open(self) -> None:
        import psycopg
        from psycopg import AsyncClientCursor

        for _ in range(max(map(len, self.stages))):
            self.connections.append(
                await psycopg.AsyncConnection.connect(
                    **_connect_kwargs(self.alias),
                    autocommit=True,
                    cursor_factory=AsyncClientCursor,  # the engine's binding (Django's)
                )
            )

    async def run(self) -> int:
        rows = 0
        for stage in self.stages:
            results = await asyncio.gather(
                *(
                    self._rows(conn, sql, params)
                    for conn, (sql, params) in zip(self.connections, stage, strict=False)
                )
            )
            rows += sum(map(len, results))
        return rows

    @staticmethod
    async def _rows(conn: Any, sql: str, params: Any) -> list[Any]:
        cursor = await conn.execute(sql, params)
        rows: list[Any] = await cursor.fetchall()
        return rows

    async def close(self) -> None:
        for conn in self.connections:
            await conn.close()


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


def _rotated(sides: Sequence[str], run: int) -> list[str]:
    k = run % len(sides)
    return [*sides[k:], *sides[:k]]


def bench_gather(alias: str, runs: int, runner: asyncio.Runner) -> dict[str, list[float]]:
    """Alternating timed runs (seconds) of every ``gather`` side on ``alias``; raises
    ``AssertionError`` when a side's result differs from Django's."""
    from asgiref.sync import sync_to_async

    targets = choose_targets(alias)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "django": lambda: gather_django(alias, targets),
        "agather": lambda: gather_engine(alias, targets),
        "agather_pipeline": lambda: gather_engine(alias, targets, round_trips=1),
        "pool_terminals": lambda: gather_pool(alias, targets),
    }
    if single_query_fetch_available():
        calls["single_query_fetch"] = lambda: sync_to_async(single_query_fetch)(alias, targets)
    floor = Floor(alias)
    queries = runner.run(QueryFloor.record(alias, targets))
    runner.run(queries.open())
    try:

        async def run_floor() -> int:
            return floor.run()

        calls["floor"] = run_floor
        calls["floor_queries"] = queries.run
        sides = [side for side in GATHER_SIDES if side in calls]
        _, reference = runner.run(_timed(calls["django"]))
        expected = digest(reference)
        del reference

        def check(side: str, result: Any, when: str) -> None:
            if side.startswith("floor"):
                return
            got = digest(result)
            if got != expected:
                diff = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
                raise AssertionError(
                    f"gather @ {alias}: {side} ({when}) differs from Django's in queryset "
                    f"{diff}: {got[diff]} != {expected[diff]}"
                )

        for side in sides:  # warm-up: connections, pools, caches; and a first check
            check(side, runner.run(_timed(calls[side]))[1], "warm-up")
        times: dict[str, list[float]] = {side: [] for side in sides}
        for run in range(runs):
            for side in _rotated(sides, run):
                gc.collect()
                seconds, result = runner.run(_timed(calls[side]))
                check(side, result, f"run {run + 1}")
                times[side].append(seconds)
                del result
    finally:
        floor.close()
        runner.run(queries.close())
    return times


# -- the atomic variants --------------------------------------------------------------------------


def atomic_sides(workload: Any, alias: str) -> dict[str, Callable[[], list[Any]]]:
    """Each ``atomic`` side as a function of no arguments returning the root instances."""
    from django.conf import settings
    from django.db import transaction
    from django.test.utils import override_settings

    from async_prefetch import prefetch

    def django_side() -> list[Any]:
        with transaction.atomic(using=alias):
            return list(workload.queryset(alias))

    def engine() -> list[Any]:
        with transaction.atomic(using=alias):
            return prefetch(workload.root(alias), *workload.lookups())

    unpipelined = {**getattr(settings, "ASYNC_PREFETCH", {}), "PIPELINE": False}

    def engine_unpipelined() -> list[Any]:
        with override_settings(ASYNC_PREFETCH=unpipelined), transaction.atomic(using=alias):
            return prefetch(workload.root(alias), *workload.lookups())

    def engine_pool() -> list[Any]:
        return prefetch(workload.root(alias), *workload.lookups())

    return {
        "django": django_side,
        "engine": engine,
        "engine_unpipelined": engine_unpipelined,
        "engine_pool": engine_pool,
    }


def bench_atomic(workload: Any, alias: str, runs: int) -> dict[str, list[float]]:
    """Alternating timed runs (seconds) of every ``atomic`` side; raises ``AssertionError``
    when a side's signature differs from Django's."""
    from async_prefetch.devtools.signature import describe_difference

    functions = atomic_sides(workload, alias)
    reference = workload.signature(functions["django"]())

    def check(side: str, objects: list[Any], when: str) -> None:
        got = workload.signature(objects)
        if got != reference:
            raise AssertionError(
                f"{workload.name} @ {alias} in atomic: {side} ({when}) differs from Django's:\n"
                + describe_difference(reference, got)
            )

    for side, function in functions.items():
        check(side, function(), "warm-up")
    sides = list(functions)
    times: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs):
        for side in _rotated(sides, run):
            gc.collect()
            started = time.perf_counter()
            objects = functions[side]()
            times[side].append(time.perf_counter() - started)
            check(side, objects, f"run {run + 1}")
            del objects
    return times


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Results:
    """Medians in ms: ``gather[rtt][side]`` and ``atomic[(workload, rtt)][side]``; the
    fastest runs in ``gather_best`` and ``atomic_best``."""

    gather: dict[float, dict[str, float]] = field(default_factory=dict)
    atomic: dict[tuple[str, float], dict[str, float]] = field(default_factory=dict)
    gather_best: dict[float, dict[str, float]] = field(default_factory=dict)
    """The fastest run of each side (ms), as ``gather``."""
    atomic_best: dict[tuple[str, float], dict[str, float]] = field(default_factory=dict)
    """The fastest run of each side (ms), as ``atomic``."""


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {side: statistics.median(values) * 1000 for side, values in times.items()}


def _best(times: dict[str, list[float]]) -> dict[str, float]:
    return {side: min(values) * 1000 for side, values in times.items()}


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def gather_table(results: dict[float, dict[str, float]]) -> str:
    """Markdown: the ``gather`` medians per RTT, and the ratios of the targets."""
    sides = [s for s in GATHER_SIDES if any(s in r for r in results.values())]
    header = ["RTT ms", *[f"{s} ms" for s in sides]]
    header += [
        "agather / floor",
        "agather / floor_queries",
        "django / agather",
        "pool_terminals / floor",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for rtt, med in results.items():
        cells = [f"{rtt:g}", *[f"{med[s]:.1f}" if s in med else "-" for s in sides]]
        cells += [
            fmt_ratio(med.get("agather"), med.get("floor")),
            fmt_ratio(med.get("agather"), med.get("floor_queries")),
            fmt_ratio(med.get("django"), med.get("agather")),
            fmt_ratio(med.get("pool_terminals"), med.get("floor")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def atomic_table(results: dict[tuple[str, float], dict[str, float]]) -> str:
    """Markdown: the ``atomic`` medians per workload and RTT, and Django over the engine."""
    header = ["workload", "RTT ms", *[f"{s} ms" for s in ATOMIC_SIDES]]
    header += ["django / engine", "engine_unpipelined / engine"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + " ---: |" * (len(header) - 1)]
    for (name, rtt), med in results.items():
        cells = [name, f"{rtt:g}", *[f"{med[s]:.1f}" if s in med else "-" for s in ATOMIC_SIDES]]
        cells += [
            fmt_ratio(med.get("django"), med.get("engine")),
            fmt_ratio(med.get("engine_unpipelined"), med.get("engine")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: Results) -> list[str]:
    """The targets of issue 16 against the 5 ms figures (when measured)."""
    lines = []
    five = results.gather.get(5.0)
    if five and five.get("floor"):
        ratio = five["agather"] / five["floor"]
        met = "met" if ratio <= GATHER_TARGET else "not met"
        lines.append(
            f"- `gather` at 5 ms: `agather` is {ratio:.2f}x the floor of {STAGES} round trips "
            f"(target <= {GATHER_TARGET:g}x): {met}."
        )
        best = results.gather_best.get(5.0, {})
        if best.get("floor"):
            lines.append(
                f"  Fastest runs: {best['agather'] / best['floor']:.2f}x "
                f"({best['agather']:.1f} ms / {best['floor']:.1f} ms)."
            )
        if five.get("floor_queries"):
            lines.append(
                f"  The call's own queries at one round trip per stage, building nothing "
                f"(`floor_queries`), take {five['floor_queries']:.1f} ms, "
                f"{five['floor_queries'] / five['floor']:.2f}x the floor: `agather` is "
                f"{five['agather'] / five['floor_queries']:.2f}x that."
            )
        zero = results.gather.get(0.0)
        if zero:
            lines.append(
                f"  Without network (0 ms) `agather` takes {zero['agather']:.1f} ms, "
                f"{zero['agather'] / five['floor']:.2f}x the 5 ms floor: the call's own cost "
                "(compiling, hydrating, thread hops), not its round trips, stands between it "
                "and the target."
            )
    fanout = results.atomic.get(("fanout-100", 5.0))
    if fanout:
        speedup = fanout["django"] / fanout["engine"]
        met = "met" if speedup >= ATOMIC_TARGET else "not met"
        lines.append(
            f"- `fanout-100` inside `atomic` at 5 ms: the engine is {speedup:.2f}x faster than "
            f"Django (target >= {ATOMIC_TARGET:g}x): {met}."
        )
        best = results.atomic_best.get(("fanout-100", 5.0), {})
        if best.get("engine"):
            lines.append(
                f"  Fastest runs: {best['django'] / best['engine']:.2f}x "
                f"({best['django']:.1f} ms / {best['engine']:.1f} ms)."
            )
        zero = results.atomic.get(("fanout-100", 0.0))
        if zero:
            lines.append(
                f"  Without network (0 ms) the ratio is {zero['django'] / zero['engine']:.2f}x: "
                "the CPU alone."
            )
    return lines


def markdown(results: Results, facts: dict[str, Any], command: str, wall: float, runs: int) -> str:
    """The report ``main`` writes."""
    sqf = (
        "django-querysets-single-query-fetch's JSON-aggregated query for the five roots, then "
        "Django's `prefetch_related_objects` for the two querysets' lookups (the package "
        "does not prefetch), in `sync_to_async`"
        if single_query_fetch_available()
        else "not measured: django-querysets-single-query-fetch is not installed"
    )
    return "\n".join(
        [
            "# Independent querysets at once, and the engine inside `atomic`",
            "",
            f"- command: `{command.strip()}` (wall time {wall:.0f} s)",
            f"- Python {facts.get('python')}, Django {facts.get('django')}, psycopg "
            f"{facts.get('psycopg')}, PostgreSQL {facts.get('postgresql')}; "
            f"{facts.get('cpu_count')} CPUs (load average {facts.get('load', '?')} at the "
            f"start); {facts.get('date')}, git {facts.get('git')}",
            f"- medians of {runs} runs; sides alternate within each round; every run's result "
            "checked against Django's.",
            "",
            "## `gather`: five querysets, two of them prefetching",
            "",
            "An async view's five independent querysets on the demo bookstore: a book by pk "
            "with its authors (`aget`), a page of 20 books with their pages, the book's "
            "reviews, an author by name (`aget`), the publishers.",
            "",
            "- `django`: `asyncio.gather` of Django's `aget()` and `[x async for x in qs]` "
            "(one thread: one query after another);",
            "- `agather`: `agather(...)` of the five querysets (the pool);",
            "- `agather_pipeline`: `agather(..., round_trips=1)` (one pooled connection, each "
            "stage in one pipeline);",
            "- `pool_terminals`: `asyncio.gather` of `PoolQuerySet`'s `aget()` and `async for`;",
            f"- `single_query_fetch`: {sqf};",
            "- `floor_queries`: the call's own SQL and parameters (recorded from the engine), "
            "the five root queries at once on five psycopg connections, then the two relation "
            "queries at once, rows read as tuples, through the same proxy: these queries' I/O "
            "at one round trip per stage;",
            f"- `floor`: {STAGES} sequential `SELECT 1` on one psycopg connection through the "
            "same proxy: one round trip per stage (the roots, then the prefetches).",
            "",
            gather_table(results.gather),
            "",
            "## `atomic`: `chain` and `fanout-100` inside `transaction.atomic()`",
            "",
            "The runner's workloads, synchronous as in an `ATOMIC_REQUESTS` view: `django` "
            "is `list(root.prefetch_related(*lookups))`, `engine` `prefetch(root, *lookups)` "
            "on the caller's connection (each stage in one pipeline), `engine_unpipelined` "
            "the same with `PIPELINE: False` (one query after another), `engine_pool` "
            "`prefetch()` outside `atomic` (the pool), for reference. Each `atomic` side "
            "includes its transaction's `BEGIN` and `COMMIT`: on `fanout-100` Django makes 13 "
            "round trips (`BEGIN`, 11 queries, `COMMIT`), the pipelined engine 3 (`BEGIN` "
            "with the root query in one pipeline, the ten siblings in another, `COMMIT`); "
            "`engine_unpipelined` 13, as Django.",
            "",
            atomic_table(results.atomic),
            "",
            "## Targets (issue 16)",
            "",
            *verdicts(results),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.gather")
    parser.add_argument("--rtts", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one run at RTT 0, small workloads")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/gather.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rtts, args.runs = [0.0], 1

    from async_prefetch.devtools.bench.runner import alias_for, bench_database, machine_facts
    from async_prefetch.devtools.bench.workloads import build_workloads
    from async_prefetch.devtools.demo.bookstore import seed

    started = time.perf_counter()
    results = Results()
    with contextlib.ExitStack() as stack:
        server, _ = stack.enter_context(bench_database(args.rtts))
        seed(200)
        workloads = build_workloads(quick=args.quick)
        for name in ATOMIC_WORKLOADS:
            workloads[name].seed()
        facts = machine_facts(server)
        facts["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        runner = stack.enter_context(asyncio.Runner())
        for rtt in args.rtts:
            alias = alias_for(rtt)
            times = bench_gather(alias, args.runs, runner)
            results.gather[rtt], results.gather_best[rtt] = _medians(times), _best(times)
            print(f"{NAME} @ {rtt:g} ms done", file=sys.stderr, flush=True)
            for name in ATOMIC_WORKLOADS:
                times = bench_atomic(workloads[name], alias, args.runs)
                results.atomic[(name, rtt)] = _medians(times)
                results.atomic_best[(name, rtt)] = _best(times)
                print(f"atomic {name} @ {rtt:g} ms done", file=sys.stderr, flush=True)
    command = "python -m async_prefetch.devtools.bench.gather " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = markdown(results, facts, command, time.perf_counter() - started, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(gather_table(results.gather))
    print(atomic_table(results.atomic))
    print("\n".join(verdicts(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
