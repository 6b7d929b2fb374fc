"""The demo's scenarios after the page: each a user problem, solved by Django and by the engine.

- :func:`run_lazy_loop` / :func:`run_autoprefetch`: a loop reads relations of the page's
  first books that nobody prefetched (the N+1), plainly and through ``autoprefetch(qs)``;
  :func:`n_plus_one_report` runs the plain loop inside ``prefetch_report()``.
- :func:`run_django_gather` / :func:`run_agather` / :func:`run_pool_gather`: a book's
  detail page, five independent querysets awaited together.
- :func:`run_django_stream` / :func:`run_engine_stream`: every book, chunk by chunk, each
  chunk prefetched (the engine with a memo of the publishers).

Each ``run_*`` function returns a :class:`~async_prefetch.devtools.demo.bookstore.DemoResult`
whose ``signature`` (primary keys of everything the scenario read, in order; unordered
relations sorted) compares equal between the sides of a scenario when both read the same
objects, and whose ``queries`` is what ``CaptureQueriesContext`` counted (engine queries
included). The async scenarios run their coroutines on the given ``asyncio.Runner``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.devtools.demo.bookstore import DemoResult

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from async_prefetch.devtools.demo.models import Book

T = TypeVar("T")

LOOP_BOOKS = 20
"""Books of the page the N+1 loop reads (at most): its lazy loads cost a round trip each."""
STREAM_LOOKUPS = ("publisher", "authors__location", "tags")
"""What each chunk of the stream prefetches, and its loop reads."""


def _pks(objects: Any) -> tuple[Any, ...]:
    return tuple(sorted(obj.pk for obj in objects))


def _authors(book: Book) -> tuple[Any, ...]:
    # Authors have no ordering: the database's order may differ between plans.
    return tuple(
        sorted(
            (a.pk, None if a.location_id is None or a.location is None else a.location.pk)
            for a in book.authors.all()
        )
    )


def read_loop(books: Sequence[Book]) -> list[Any]:
    """The loop of a template or serializer: each book's publisher, authors and their
    locations, and pages, as primary keys. Loads whatever is not loaded yet."""
    return [
        (book.pk, book.publisher.pk, _authors(book), tuple(p.pk for p in book.pages.all()))
        for book in books
    ]


def _page(books: int) -> QuerySet[Book]:
    from async_prefetch.devtools.demo.models import Book

    return Book.objects.order_by("title", "pk")[:books]


def _sync_result(label: str, run: Callable[[], list[Any]]) -> DemoResult:
    connection.ensure_connection()
    with CaptureQueriesContext(connection) as captured:
        started = time.perf_counter()
        digest = run()
        seconds = time.perf_counter() - started
    return DemoResult(label, len(digest), len(captured.captured_queries), seconds, [], digest)


def run_lazy_loop(books: int = LOOP_BOOKS) -> DemoResult:
    """Django: the page's first ``books`` books without prefetches, then
    :func:`read_loop` (the N+1)."""
    return _sync_result("Django, lazy loads", lambda: read_loop(list(_page(books))))


def run_autoprefetch(books: int = LOOP_BOOKS) -> DemoResult:
    """The same loop over ``autoprefetch(qs)``'s books: one query per relation."""
    return _sync_result(
        "autoprefetch(qs)", lambda: read_loop(list(async_prefetch.autoprefetch(_page(books))))
    )


def n_plus_one_report(
    books: int = LOOP_BOOKS,
) -> tuple[DemoResult, async_prefetch.PrefetchReport]:
    """:func:`run_lazy_loop` inside ``prefetch_report(log=False)``, and the report."""
    with async_prefetch.prefetch_report(log=False) as report:
        result = run_lazy_loop(books)
    return result, report


async def _captured(
    label: str, run: Callable[[], Awaitable[T]], digest: Callable[[T], Any]
) -> DemoResult:
    """Time ``run()`` in this event loop; count the queries of the thread Django's async
    methods (and the engine's reports) use, by entering the capture on that thread."""
    capture = CaptureQueriesContext(connection)
    await sync_to_async(capture.__enter__)()
    try:
        started = time.perf_counter()
        value = await run()
        seconds = time.perf_counter() - started
    finally:
        await sync_to_async(capture.__exit__)(None, None, None)
    queries = await sync_to_async(len)(capture)  # its connection is that thread's
    found = digest(value)
    return DemoResult(label, len(found), queries, seconds, [], found)


# -- several querysets at once: a book's detail page ------------------------------------------


@dataclass(frozen=True)
class DetailPage:
    """The book a detail page shows (chosen once from the seeded data)."""

    book: int
    publisher: int


def choose_detail_page() -> DetailPage:
    """The first book by title with authors and reviews."""
    from async_prefetch.devtools.demo.models import Book

    book = (
        Book.objects.filter(authors__isnull=False, reviews__isnull=False)
        .order_by("title", "pk")
        .values_list("pk", "publisher_id")
        .first()
    )
    if book is None:
        raise RuntimeError("the demo bookstore has no book with authors and reviews")
    return DetailPage(*book)


def _detail_querysets(page: DetailPage, base: type | None = None) -> list[Any]:
    """The book with its authors, its publisher's other books with their tags, its reviews,
    every tag and every publisher (``base``: a ``QuerySet`` class; default the managers)."""
    from async_prefetch.devtools.demo.models import Book, Publisher, Review, Tag

    def of(model: type[Any]) -> Any:
        return model.objects.all() if base is None else base(model=model)

    return [
        of(Book).prefetch_related("authors"),
        of(Book)
        .filter(publisher_id=page.publisher)
        .exclude(pk=page.book)
        .order_by("title", "pk")
        .prefetch_related("tags")[:10],
        of(Review).filter(book_id=page.book).order_by("pk"),
        of(Tag).order_by("name"),
        of(Publisher).order_by("name", "pk"),
    ]


def _detail_digest(results: Sequence[Any]) -> list[Any]:
    book, others, reviews, tags, publishers = results
    return [
        (book.pk, _pks(book.authors.all())),
        *((other.pk, _pks(other.tags.all())) for other in others),
        tuple(r.pk for r in reviews),
        tuple(t.pk for t in tags),
        tuple(p.pk for p in publishers),
    ]


async def _rows(queryset: Any) -> list[Any]:
    return [obj async for obj in queryset]


async def _gather_terminals(page: DetailPage, base: type | None) -> list[Any]:
    book, others, reviews, tags, publishers = _detail_querysets(page, base)
    return list(
        await asyncio.gather(
            book.aget(pk=page.book), _rows(others), _rows(reviews), _rows(tags), _rows(publishers)
        )
    )


async def _agather(page: DetailPage) -> list[Any]:
    book, *rest = _detail_querysets(page)
    (found, *results) = await async_prefetch.agather(book.filter(pk=page.book), *rest)
    if len(found) != 1:
        raise AssertionError(f"{len(found)} books with pk {page.book}")
    return [found[0], *results]


def run_django_gather(runner: asyncio.Runner, page: DetailPage) -> DemoResult:
    """``asyncio.gather`` of Django's ``aget()`` and ``async for`` (one thread)."""
    return runner.run(
        _captured(
            "gather(), Django's aget()",
            lambda: _gather_terminals(page, None),
            _detail_digest,
        )
    )


def run_agather(runner: asyncio.Runner, page: DetailPage) -> DemoResult:
    """``agather`` of the five querysets (the first filtered to the book)."""
    return runner.run(_captured("agather(*querysets)", lambda: _agather(page), _detail_digest))


def run_pool_gather(runner: asyncio.Runner, page: DetailPage) -> DemoResult:
    """``asyncio.gather`` of :class:`~async_prefetch.PoolQuerySet`'s ``aget()`` and
    ``async for``."""
    return runner.run(
        _captured(
            "gather(), PoolQuerySet",
            lambda: _gather_terminals(page, async_prefetch.PoolQuerySet),
            _detail_digest,
        )
    )


# -- a stream of every book, chunk by chunk ---------------------------------------------------


def _stream_row(book: Book) -> tuple[Any, ...]:
    return (book.pk, book.publisher.pk, _authors(book), _pks(book.tags.all()))


def stream_size() -> int:
    """The books the stream reads: every book of the bookstore."""
    return _stream_root().count()


def _stream_root() -> QuerySet[Book]:
    from async_prefetch.devtools.demo.models import Book

    return Book.objects.order_by("pk")


def run_django_stream(runner: asyncio.Runner, chunk_size: int) -> DemoResult:
    """``async for`` over Django's ``prefetch_related(...).aiterator(chunk_size)``."""

    async def stream() -> list[Any]:
        queryset = _stream_root().prefetch_related(*STREAM_LOOKUPS)
        return [_stream_row(b) async for b in queryset.aiterator(chunk_size=chunk_size)]

    return runner.run(_captured("Django's aiterator()", stream, list))


def run_engine_stream(runner: asyncio.Runner, chunk_size: int) -> DemoResult:
    """``async for`` over ``aiterator(qs, ..., chunk_size, memo=Memo(Publisher, all=True))``,
    the memo new in each run (the publishers loaded once per run)."""
    from async_prefetch.devtools.demo.models import Publisher

    async def stream() -> list[Any]:
        memo = async_prefetch.Memo(Publisher, all=True)
        books = async_prefetch.aiterator(
            _stream_root(), *STREAM_LOOKUPS, chunk_size=chunk_size, memo=memo
        )
        return [_stream_row(b) async for b in books]

    return runner.run(_captured("aiterator(qs, memo=...)", stream, list))
