"""The pool terminals: Django's async queryset methods with their queries on the engine's
pool. Results and exceptions compared with Django's sync methods on the same querysets;
concurrency proven in the server (statement start times, ``pg_stat_activity``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, transaction
from django.db.models import Avg, Count, F, Max, Min, QuerySet, Sum
from django.db.models.query import MAX_GET_RESULTS
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from async_prefetch.gather import MethodCall
from async_prefetch.runtime import bridge
from async_prefetch.terminals import (
    TERMINALS,
    PoolManager,
    PoolQuerySet,
    install_pool_terminals,
    pool_terminals_installed,
    uninstall_pool_terminals,
)
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.differential import query_log, warm_content_types
from tests.run_state import settle_pool, sleepers
from tests.server_time import SLEEP, slow
from tests.testapp.models import Author, Book, EBook, Page, Review


@pytest.fixture
def engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a call is handed to Django's own method instead of the engine."""

    async def refuse(self: MethodCall) -> None:
        raise AssertionError(f"handed to Django: a {self.queryset.model.__name__} queryset")

    monkeypatch.setattr(MethodCall, "with_django", refuse)


@pytest.fixture
def terminals() -> Iterator[None]:
    """Every queryset gets the pool terminals for the test."""
    install_pool_terminals()
    try:
        yield
    finally:
        uninstall_pool_terminals()


Case = tuple[str, Callable[[], QuerySet[Any]], str, tuple[Any, ...], dict[str, Any]]


def cases(book_ids: list[int], author_ids: list[int]) -> list[Case]:
    """(name, fresh queryset, method, args, kwargs): Django's sync method ``method`` and the
    pool terminal ``"a" + method`` must agree on each."""
    first, second = book_ids[0], book_ids[1]
    books = Book.objects.all
    return [
        ("get", lambda: books(), "get", (), {"pk": first}),
        (
            "get prefetch",
            lambda: books().prefetch_related("authors", "pages"),
            "get",
            (),
            {"pk": second},
        ),
        (
            "get select_related",
            lambda: books().select_related("publisher"),
            "get",
            (),
            {"pk": second},
        ),
        ("get missing", lambda: books(), "get", (), {"pk": -1}),
        ("get many", lambda: books(), "get", (), {}),
        ("get more than 20", lambda: Page.objects.all(), "get", (), {}),
        ("get values", lambda: books().values("title", "price"), "get", (), {"pk": first}),
        ("get annotated", lambda: books().annotate(n=Count("authors")), "get", (), {"pk": first}),
        ("get deferred", lambda: books().only("title"), "get", (), {"pk": first}),
        ("first unordered", lambda: books(), "first", (), {}),
        ("first ordered", lambda: books().order_by("-title"), "first", (), {}),
        ("first empty", lambda: books().filter(pk=-1), "first", (), {}),
        ("first prefetch", lambda: books().prefetch_related("reviews__author"), "first", (), {}),
        ("last unordered", lambda: books(), "last", (), {}),
        ("last ordered", lambda: Page.objects.all(), "last", (), {}),
        ("last values_list", lambda: books().values_list("title", flat=True), "last", (), {}),
        ("count", lambda: books(), "count", (), {}),
        ("count filtered", lambda: Review.objects.filter(stars__gte=3), "count", (), {}),
        ("count sliced", lambda: books().order_by("pk")[1:4], "count", (), {}),
        (
            "count distinct",
            lambda: Book.objects.filter(authors__isnull=False).distinct(),
            "count",
            (),
            {},
        ),
        ("count none", lambda: books().none(), "count", (), {}),
        ("exists", lambda: books(), "exists", (), {}),
        ("exists empty", lambda: books().filter(pk=-1), "exists", (), {}),
        (
            "aggregate",
            lambda: books(),
            "aggregate",
            (Max("pk"),),
            {"total": Sum("price"), "avg": Avg("price")},
        ),
        (
            "aggregate empty",
            lambda: books().filter(pk=-1),
            "aggregate",
            (),
            {"m": Min("price"), "n": Count("pk")},
        ),
        (
            "aggregate annotated",
            lambda: books().annotate(n=Count("authors")),
            "aggregate",
            (),
            {"most": Max("n")},
        ),
        (
            "aggregate sliced",
            lambda: books().order_by("pk")[:2],
            "aggregate",
            (),
            {"s": Sum(F("price") * 2)},
        ),
        ("in_bulk ids", lambda: books(), "in_bulk", ([first, second, -1],), {}),
        ("in_bulk empty list", lambda: books(), "in_bulk", ([],), {}),
        ("in_bulk all", lambda: books().prefetch_related("pages"), "in_bulk", (), {}),
        (
            "in_bulk field",
            lambda: Author.objects.all(),
            "in_bulk",
            (["author01@example.com"],),
            {"field_name": "email"},
        ),
        (
            "get union",
            lambda: books().filter(pk=first).union(books().filter(pk=second)),
            "get",
            (),
            {"pk": first},
        ),
        (
            "count union",
            lambda: books().filter(pk=first).union(books().filter(pk=second)),
            "count",
            (),
            {},
        ),
        ("first inherited", lambda: EBook.objects.all(), "first", (), {}),
        ("last dates", lambda: Review.all_objects.dates("created", "month"), "last", (), {}),
        ("count json", lambda: Review.objects.filter(data__has_key="k"), "count", (), {}),
        ("exists json", lambda: Review.objects.filter(data__k__gt=0), "exists", (), {}),
        ("in_bulk other ids", lambda: Author.objects.all(), "in_bulk", (author_ids[:3],), {}),
    ]


def more_pages(bookstore: Bookstore) -> None:
    """More pages than ``get()`` reads (``MAX_GET_RESULTS``)."""
    book = Book.objects.get(pk=bookstore.book_ids[0])
    Page.objects.bulk_create([Page(book=book, number=100 + n) for n in range(MAX_GET_RESULTS)])


def outcome(func: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", func()
    except Exception as exc:
        return type(exc).__name__, str(exc)


async def aoutcome(func: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", await func()
    except Exception as exc:
        return type(exc).__name__, str(exc)


def assert_same(expected: tuple[str, Any], got: tuple[str, Any], name: str) -> None:
    kind, want = expected
    assert got[0] == kind, (name, expected, got)
    have = got[1]
    if kind != "value" or not _has_instances(want):
        assert have == want, name
        return
    if isinstance(want, dict):
        assert list(have) == list(want), name
        assert_same_prefetch(list(want.values()), list(have.values()))
    else:
        assert_same_prefetch([want], [have])


def _has_instances(value: Any) -> bool:
    if isinstance(value, dict):
        return any(hasattr(v, "_meta") for v in value.values())
    return hasattr(value, "_meta")


def django_outcomes(all_cases: list[Case]) -> list[tuple[tuple[str, Any], int]]:
    results = []
    for _, make, method, args, kwargs in all_cases:
        warm_content_types()
        with CaptureQueriesContext(connection) as queries:
            result = outcome(lambda: getattr(make(), method)(*args, **kwargs))  # noqa: B023
        results.append((result, len(queries)))
    return results


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("terminals", "engine_only")
async def test_results_exceptions_and_queries_are_djangos(bookstore: Bookstore) -> None:
    await sync_to_async(more_pages)(bookstore)
    all_cases = cases(bookstore.book_ids, bookstore.author_ids)
    expected = await sync_to_async(django_outcomes)(all_cases)
    await sync_to_async(warm_content_types)()
    for (name, make, method, args, kwargs), (want, n_queries) in zip(
        all_cases, expected, strict=True
    ):
        async with query_log() as sql:
            got = await aoutcome(lambda: getattr(make(), "a" + method)(*args, **kwargs))  # noqa: B023
        assert_same(want, got, name)
        if want[0] == "value":  # Django prefetches before it raises; the engine need not
            assert len(sql) == n_queries, (name, sql)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_djangos_messages_errors_before_any_query_and_cached_answers(
    bookstore: Bookstore,
) -> None:
    await sync_to_async(more_pages)(bookstore)
    with pytest.raises(Page.MultipleObjectsReturned) as many:
        await PoolQuerySet(Page).aget()
    assert str(many.value) == (
        f"get() returned more than one Page -- it returned more than {MAX_GET_RESULTS - 1}!"
    )
    with pytest.raises(Book.DoesNotExist, match=r"^Book matching query does not exist\.$"):
        await PoolQuerySet(Book).aget(pk=-1)

    books = PoolQuerySet(Book).order_by("pk")
    async with query_log() as sql:
        with pytest.raises(TypeError, match="Complex aggregates require an alias"):
            await books.aaggregate(Sum("price") + 1)
        with pytest.raises(ValueError, match="must be a unique field but 'title' isn't"):
            await books.ain_bulk(["x"], field_name="title")
        with pytest.raises(TypeError, match="Cannot use 'limit' or 'offset' with in_bulk"):
            await books[:2].ain_bulk()
        with pytest.raises(TypeError, match="first"):
            await PoolQuerySet(Book).values("title").annotate(n=Count("pk")).afirst()
    assert sql == []

    seen = [book async for book in books]
    async with query_log() as sql:  # an evaluated queryset answers from its cache
        assert await books.acount() == len(seen)
        assert await books.aexists()
        assert await books.afirst() is seen[0]
        assert [book async for book in books] == seen
    assert sql == []

    manager = PoolManager()  # a manager gives the methods
    manager.model = Book
    assert (await manager.aget(pk=bookstore.book_ids[0])).pk == bookstore.book_ids[0]
    assert await manager.acount() == len(bookstore.book_ids)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_async_for_and_aiterator(bookstore: Bookstore) -> None:
    books = PoolQuerySet(Book).order_by("pk").prefetch_related("pages")
    async with query_log() as sql:
        seen = [book async for book in books]
    assert [b.pk for b in seen] == bookstore.book_ids
    assert books._result_cache == seen  # filled, as Django's
    assert len(sql) == 2
    expected = await sync_to_async(
        lambda: list(Book.objects.order_by("pk").prefetch_related("pages"))
    )()
    assert_same_prefetch(expected, seen)
    chunked = [
        b async for b in PoolQuerySet(Book).order_by("pk").prefetch_related("pages").aiterator(2)
    ]
    assert_same_prefetch(expected, chunked)
    with pytest.raises(ValueError, match="Chunk size must be strictly positive"):
        [b async for b in PoolQuerySet(Book).aiterator(0)]


def test_install_and_uninstall() -> None:
    from django.db.models import QuerySet as DjangoQuerySet

    originals = {name: DjangoQuerySet.__dict__[name] for name in TERMINALS}
    install_pool_terminals()
    install_pool_terminals()  # idempotent
    try:
        assert pool_terminals_installed()
        assert all(DjangoQuerySet.__dict__[name] is not originals[name] for name in TERMINALS)
    finally:
        uninstall_pool_terminals()
    assert not pool_terminals_installed()
    assert all(DjangoQuerySet.__dict__[name] is originals[name] for name in TERMINALS)


# -- concurrency, in the server ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_two_agets_query_at_the_same_time(bookstore: Bookstore) -> None:
    books = slow(PoolQuerySet(Book))
    first, second = await asyncio.gather(
        books.aget(pk=bookstore.book_ids[0]), books.aget(pk=bookstore.book_ids[1])
    )
    # One after the other, they would start at least SLEEP apart.
    assert abs(first.started_at - second.started_at) < timedelta(seconds=0.8 * SLEEP)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_count_exists_and_aggregate_run_at_once_on_the_pool(bookstore: Bookstore) -> None:
    """Seen in ``pg_stat_activity`` while they sleep: three of the engine's connections
    run them at the same time."""
    books = PoolQuerySet(Book).extra(where=["EXISTS (SELECT 1 FROM pg_sleep(0.8))"])
    work = asyncio.gather(books.acount(), books.aexists(), books.aaggregate(Max("pk")))
    most = 0
    for _ in range(60):
        await asyncio.sleep(0.02)
        most = max(most, await sync_to_async(sleepers)(0.8, engine_only=True))
        if most == 3 or work.done():
            break
    count, exists, aggregate = await work
    assert most == 3
    assert (count, exists, aggregate) == (
        len(bookstore.book_ids),
        True,
        {"pk__max": max(bookstore.book_ids)},
    )


# -- cancellation, atomic ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_cancellation_stops_the_query_and_returns_the_connection(
    bookstore: Bookstore,
) -> None:
    books = PoolQuerySet(Book).extra(where=["EXISTS (SELECT 1 FROM pg_sleep(5))"])
    for call in (lambda: books.aget(pk=bookstore.book_ids[0]), books.acount):
        with anyio.move_on_after(0.3) as scope:
            await call()
        assert scope.cancelled_caught
        assert await sync_to_async(sleepers)() == 0
        assert await bridge.run_async(settle_pool) == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("engine_only")
def test_inside_atomic_the_callers_transaction_is_read(bookstore: Bookstore) -> None:
    with transaction.atomic():
        book = Book.objects.create(title="Draft", isbn="draft-1")
        Page.objects.create(book=book, number=1)
        books = PoolQuerySet(Book).prefetch_related("pages")
        with CaptureQueriesContext(connection) as queries:
            got = async_to_sync(books.aget)(pk=book.pk)
            count = async_to_sync(books.acount)()
            in_bulk = async_to_sync(books.ain_bulk)([book.pk])
        assert [p.number for p in got.pages.all()] == [1]
        assert count == len(bookstore.book_ids) + 1
        assert list(in_bulk) == [book.pk]
        assert len(queries) == 5  # book, pages, count, book, pages: the caller's connection
        transaction.set_rollback(True)


@pytest.mark.django_db(transaction=True)
def test_select_for_update_is_djangos(bookstore: Bookstore) -> None:
    """Django's own: FOR UPDATE needs the transaction (Django's error outside one)."""
    books = PoolQuerySet(Book).select_for_update()
    with pytest.raises(TransactionManagementError):
        async_to_sync(books.aget)(pk=bookstore.book_ids[0])
    with transaction.atomic():
        locked = async_to_sync(books.aget)(pk=bookstore.book_ids[0])
        assert locked.pk == bookstore.book_ids[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("terminals", "installed")
def test_aiterator_inside_atomic_with_install_is_djangos(bookstore: Bookstore) -> None:
    """With ``install()`` too, ``aiterator()`` inside ``atomic`` is Django's own (not a
    loop between the engine's fallbacks), its chunks prefetched on the caller's connection."""

    async def read() -> list[Any]:
        books = Book.objects.order_by("pk").prefetch_related("pages")
        return [book async for book in books.aiterator(2)]

    with transaction.atomic():
        book = Book.objects.create(title="Draft", isbn="draft-1")
        Page.objects.create(book=book, number=7)
        books = async_to_sync(read)()
        assert [b.pk for b in books] == [*bookstore.book_ids, book.pk]
        assert [p.number for p in books[-1].pages.all()] == [7]
        transaction.set_rollback(True)
