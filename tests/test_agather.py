"""``agather()``: independent querysets evaluated at once, each with its own prefetches,
results identical to ``list(qs)`` in Django, concurrency proven with the server's clock."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import FieldError
from django.db import DataError, ProgrammingError, connection, connections, transaction
from django.db.models import Count, F, Prefetch, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.sql.compiler import SQLCompiler
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from async_prefetch.dispatch import FallbackWarning, _warned_aliases
from async_prefetch.gather import MethodCall, agather, run_methods
from async_prefetch.runtime import bridge
from tests.cache_snapshot import render, snapshot
from tests.conftest import Bookstore
from tests.differential import query_log, warm_content_types
from tests.pipelines import batch_sizes
from tests.run_state import settle_pool, sleepers
from tests.server_time import SLEEP, slow, start_of
from tests.testapp.models import Author, Book, Page, Publisher, Review
from tests.throwaway import engine_alias

OTHER = "gather_other"  # a second alias for the same test database


@pytest.fixture
def engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a call is handed to Django's own method instead of the engine."""

    async def refuse(self: MethodCall) -> None:
        raise AssertionError(f"handed to Django: a {self.queryset.model.__name__} queryset")

    monkeypatch.setattr(MethodCall, "with_django", refuse)


@pytest.fixture
def other_alias(transactional_db: None) -> Iterator[str]:
    with engine_alias(OTHER, {}) as alias:
        try:
            yield alias
        finally:
            connections[alias].close()


def querysets(alias: str) -> list[QuerySet[Any]]:
    """Fresh querysets covering what ``list(qs)`` may meet (built anew for each side:
    Django writes hints into the querysets it evaluates)."""
    return [
        Book.objects.order_by("pk").prefetch_related(
            "authors__location", Prefetch("pages", queryset=Page.objects.filter(number__gt=1))
        ),
        Author.objects.select_related("location__country").order_by("-pk")[1:4],
        Book.objects.annotate(n_authors=Count("authors"), double=F("price") * 2).order_by("title"),
        Book.objects.only("title").defer("isbn").order_by("pk").prefetch_related("reviews"),
        Book.objects.none(),
        Book.objects.filter(title="no such title").prefetch_related("pages"),
        Book.objects.values("title", "price").order_by("pk"),
        Book.objects.values_list("pk", flat=True).order_by("-pk"),
        Review.objects.using(alias).order_by("pk").prefetch_related("book__authors"),
        Publisher.objects.order_by("name").distinct().prefetch_related("books"),
        Book.objects.order_by("pk").extra(select={"x": "1"}).prefetch_related("ebook", "profile"),
        Book.objects.filter(pk__lte=2)
        .union(Book.objects.filter(title__endswith="5"))
        .order_by("pk"),
        Book.objects.dates("published", "year"),
    ]


def django_side() -> tuple[list[list[Any]], list[str]]:
    """Django's results, all on ``default`` (the test case may not open a connection of
    its own to the second alias): :func:`compare` reads the alias's name as ``default``."""
    warm_content_types()
    with CaptureQueriesContext(connection) as queries:
        results = [list(qs) for qs in querysets("default")]
    return results, [q["sql"] for q in queries.captured_queries]


def compare(expected: list[list[Any]], got: tuple[list[Any], ...]) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        if want and not hasattr(want[0], "_meta"):
            assert have == want
        else:
            assert [line.replace(OTHER, "default") for line in render(snapshot(have))] == render(
                snapshot(want)
            )


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("engine_only")
async def test_results_and_query_count_are_djangos(bookstore: Bookstore, other_alias: str) -> None:
    expected, django_sql = await sync_to_async(django_side)()
    await sync_to_async(warm_content_types)()
    async with query_log() as default_sql, query_log(other_alias) as other_sql:
        got = await agather(*querysets(other_alias))
    compare(expected, got)
    assert len(default_sql) + len(other_sql) == len(django_sql)
    assert any("= ANY(" in sql for sql in default_sql)  # the engine's prefetch queries
    assert len(other_sql) == 3  # reviews, books, authors: on the database each used
    assert {review._state.db for review in got[8]} == {other_alias}


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_fills_each_querysets_result_cache_as_list_does(bookstore: Bookstore) -> None:
    books = Book.objects.order_by("pk").prefetch_related("pages")
    authors = Author.objects.order_by("pk")
    got_books, got_authors, again = await agather(books, authors, books)
    assert books._result_cache == got_books == again
    assert got_books is not again
    assert books._prefetch_done  # type: ignore[attr-defined]
    assert authors._result_cache == got_authors
    async with query_log() as sql:  # evaluated: answered from the caches
        assert (await agather(books))[0] == got_books
        assert [b.pages.all()[0].pk for b in got_books] == [b.pages.all()[0].pk for b in books]
    assert sql == []


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("engine_only")
async def test_each_query_is_compiled_once(
    bookstore: Bookstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked for Django's errors before any query, the root queries are sent as
    compiled then (not compiled again); ``list(qs)`` is not replayed; the prefetch
    done flag is Django's."""
    compiled: list[str] = []
    as_sql = SQLCompiler.as_sql

    def counting(self: SQLCompiler, *args: Any, **kwargs: Any) -> Any:
        compiled.append(self.query.model.__name__ if self.query.model else "")
        return as_sql(self, *args, **kwargs)

    monkeypatch.setattr(SQLCompiler, "as_sql", counting)
    books, authors = Book.objects.prefetch_related("pages"), Author.objects.order_by("pk")
    await agather(books, authors)
    assert sorted(compiled) == ["Author", "Book", "Page"]
    assert books._prefetch_done  # type: ignore[attr-defined]
    assert not authors._prefetch_done  # type: ignore[attr-defined]  # as list(qs) leaves it
    compiled.clear()
    count = MethodCall(Author.objects.filter(pk__gt=0), lambda qs: qs.count())
    assert await run_methods([count]) == [len(bookstore.author_ids)]
    assert compiled == ["Author", "Author"]  # Django's count(), run again with its answer


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_root_queries_run_at_once_under_one_limit(settings: Any) -> None:
    """At once; and with ``MAX_CONCURRENCY`` 1 one after the other: one limit for the
    call, not one per queryset."""
    await sync_to_async(seed)()
    books, authors, pages = await agather(
        slow(Book.objects.all()), slow(Author.objects.all()), slow(Page.objects.all())
    )
    starts = [start_of(books), start_of(authors), start_of(pages)]
    # One after the other, they would start at least SLEEP apart.
    assert max(starts) - min(starts) < timedelta(seconds=0.8 * SLEEP), starts
    settings.ASYNC_PREFETCH = {"MAX_CONCURRENCY": 1}
    books, authors = await agather(slow(Book.objects.all()), slow(Author.objects.all()))
    first, second = sorted([start_of(books), start_of(authors)])
    assert second - first >= timedelta(seconds=0.9 * SLEEP)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_prefetches_start_when_their_own_rows_are_in() -> None:
    """One queryset's prefetch does not wait for a slower sibling queryset's root query."""
    await sync_to_async(seed)()
    slow_sibling = 3 * SLEEP
    books, authors = await agather(
        slow(Book.objects.all()).prefetch_related(
            Prefetch("pages", queryset=slow(Page.objects.all()), to_attr="slow_pages")
        ),
        slow(Author.objects.all(), slow_sibling),
    )
    root, child, sibling = (
        start_of(books),
        start_of([p for b in books for p in b.slow_pages]),
        start_of(authors),
    )
    assert child - root >= timedelta(seconds=SLEEP), "the child waited for its own root"
    assert child < sibling + timedelta(seconds=slow_sibling - SLEEP), "not for the sibling"


def seed() -> None:
    from tests.factories import seed_bookstore

    seed_bookstore()


# -- errors ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_djangos_errors_and_before_any_query_those_that_need_none(
    bookstore: Bookstore,
) -> None:
    def bad_sql() -> QuerySet[Any]:
        return Book.objects.extra(order_by=["no_such_column__x"])

    def bad_lookup() -> QuerySet[Any]:
        lookup: Any = "no_such_relation"
        return Book.objects.prefetch_related(lookup)

    with pytest.raises(FieldError) as django_compile_error:
        await sync_to_async(lambda: list(bad_sql()))()
    with pytest.raises(AttributeError) as django_lookup_error:
        await sync_to_async(lambda: list(bad_lookup()))()
    async with query_log() as sql:
        with pytest.raises(TypeError, match="must be querysets, not list"):
            await agather(Book.objects.all(), [])  # type: ignore[call-overload]
        with pytest.raises(FieldError, match=re.escape(str(django_compile_error.value))):
            await agather(slow(Author.objects.all()), bad_sql())
        with pytest.raises(FieldError, match=re.escape(str(django_compile_error.value))):
            await agather(bad_sql())
    assert sql == []
    with pytest.raises(AttributeError) as lookup_error:  # needs the rows, as in Django
        await agather(Author.objects.all(), bad_lookup())
    assert str(lookup_error.value) == str(django_lookup_error.value)


FAILS_LATE = RawSQL("(SELECT 1 / (random() * 0)::int FROM pg_sleep(0.3))", ())
# "more than one row returned by a subquery": a ProgrammingError, at once.
FAILS_AT_ONCE = RawSQL("(SELECT x FROM (VALUES (1), (2)) AS v(x))", ())


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_the_first_failing_queryset_in_order_wins(bookstore: Bookstore) -> None:
    """As with ``list(a), list(b)``: ``a``'s error even when ``b`` fails first; a slow
    third queryset is cancelled in the server and every connection comes back."""
    with pytest.raises(DataError) as error:
        await agather(
            Book.objects.annotate(late=FAILS_LATE),
            Author.objects.annotate(early=FAILS_AT_ONCE),
            Page.objects.extra(where=["EXISTS (SELECT 1 FROM pg_sleep(5))"]),
        )
    assert "division by zero" in str(error.value)
    assert await sync_to_async(sleepers)() == 0
    assert await bridge.run_async(settle_pool) == 0


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_cancellation_stops_the_queries_and_returns_the_connections(
    bookstore: Bookstore,
) -> None:
    books = Book.objects.prefetch_related(
        Prefetch("pages", queryset=Page.objects.extra(where=["EXISTS (SELECT 1 FROM pg_sleep(5))"]))
    )
    authors = Author.objects.extra(where=["EXISTS (SELECT 1 FROM pg_sleep(5))"])
    with anyio.move_on_after(0.5) as scope:
        await agather(books, authors)
    assert scope.cancelled_caught
    assert books._result_cache is None
    assert await sync_to_async(sleepers)() == 0
    assert await bridge.run_async(settle_pool) == 0


# -- inside atomic, other databases ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("engine_only")
def test_inside_atomic_it_reads_the_callers_transaction() -> None:
    with transaction.atomic():
        publisher = Publisher.objects.create(name="Uncommitted Press")
        book = Book.objects.create(title="Draft", isbn="draft-1", publisher=publisher)
        Page.objects.bulk_create([Page(book=book, number=n) for n in (2, 1)])
        with CaptureQueriesContext(connection) as queries:
            books, publishers = async_to_sync(gather_two)(
                Book.objects.prefetch_related("pages"), Publisher.objects.values_list("name")
            )
        assert [b.title for b in books] == ["Draft"]
        assert [p.number for p in books[0].pages.all()] == [1, 2]
        assert publishers == [("Uncommitted Press",)]
        assert len(queries) == 3  # books, pages, publishers: on the caller's connection
        transaction.set_rollback(True)


@pytest.mark.django_db(transaction=True)
def test_select_for_update_is_djangos() -> None:
    """Django's own evaluation: an error outside a transaction, rows inside one."""
    with pytest.raises(TransactionManagementError):
        async_to_sync(agather)(Book.objects.select_for_update())
    with transaction.atomic():
        book = Book.objects.create(title="Draft", isbn="draft-1")
        (locked,) = async_to_sync(agather)(Book.objects.select_for_update())
        assert locked == [book]
        transaction.set_rollback(True)


async def gather_two(first: QuerySet[Any], second: QuerySet[Any]) -> tuple[list[Any], list[Any]]:
    return await agather(first, second)


@pytest.fixture
def sqlite_alias(transactional_db: None) -> Iterator[str]:
    alias = "gather_sqlite"
    connections.settings[alias] = {
        **connections["default"].settings_dict,
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": ":memory:",
    }
    try:
        yield alias
    finally:
        async_to_sync(sync_to_async(connections[alias].close))()
        del connections[alias]
        del connections.settings[alias]
        _warned_aliases.discard(alias)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_another_database_vendor_is_djangos(bookstore: Bookstore, sqlite_alias: str) -> None:
    """The sqlite queryset goes to Django's own connection (which the test case does not
    let connect: that refusal is Django's path), the others to the engine, with one
    warning for the alias."""
    refused = "connections to 'gather_sqlite' are not allowed"
    with pytest.warns(FallbackWarning, match="sqlite"), pytest.raises(Exception, match=refused):
        await agather(Book.objects.all(), Book.objects.using(sqlite_alias))
    books, none = await agather(Book.objects.all(), Book.objects.using(sqlite_alias).none())
    assert len(books) == len(bookstore.book_ids)
    assert none == []


# -- review of the compile-once path and of pipelines under load --------------------------


class _MarkingQuerySet(QuerySet[Book]):
    """A subclass whose own ``_fetch_all()`` marks what it loaded."""

    def _fetch_all(self) -> None:
        super()._fetch_all()
        for book in self._result_cache or ():
            book.marked = True  # type: ignore[attr-defined]


@pytest.mark.django_db(transaction=True)
def test_a_querysets_own_fetch_all_runs(bookstore: Bookstore) -> None:
    ascending: QuerySet[Book] = _MarkingQuerySet(Book).order_by("pk")[:3]
    descending: QuerySet[Book] = _MarkingQuerySet(Book).order_by("-pk")[:3]

    async def both() -> tuple[list[Book], list[Book]]:
        return await agather(ascending, descending)

    first, second = async_to_sync(both)()
    assert len(first) == len(second) == 3
    assert all(getattr(book, "marked", False) for book in [*first, *second])


@pytest.mark.django_db(transaction=True)
def test_no_second_prefetch_once_done(bookstore: Bookstore) -> None:
    """``update()`` leaves ``_prefetch_done`` set with no result cache: Django's
    ``list(qs)`` then does not prefetch again, nor does ``agather``."""

    def updated() -> QuerySet[Book]:
        queryset = Book.objects.filter(pk__in=bookstore.book_ids[:3])
        queryset = queryset.prefetch_related("pages")
        list(queryset)
        queryset.update(title="updated")
        assert queryset._result_cache is None
        assert queryset._prefetch_done  # type: ignore[attr-defined]
        return queryset

    django = list(updated())
    (ours,) = async_to_sync(agather)(updated())
    assert [b.pk for b in ours] == [b.pk for b in django]
    assert not any(hasattr(b, "_prefetched_objects_cache") for b in [*django, *ours])


@pytest.mark.django_db(transaction=True)
def test_a_failure_in_a_shared_pipeline_is_the_failing_querysets(
    bookstore: Bookstore, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pool short of connections, querysets of one call share pipelines; the
    error raised is the failing queryset's own (Django's ``ProgrammingError``), not the
    "not run" of an earlier queryset that only shared its pipeline."""
    from async_prefetch.execution.pipeline import PooledPipelineExecutor

    sizes = batch_sizes(monkeypatch, PooledPipelineExecutor, "send")
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 2, "MAX_SIZE": 2}}
    async_to_sync(agather)(Book.objects.all())  # the pool of two, open and idle
    time.sleep(0.3)
    querysets = [
        slow(Review.objects.all(), 0.2),
        slow(Review.objects.all(), 0.2),
        Book.objects.order_by("pk"),
        Book.objects.extra(where=["no_such_column = 1"]),
        Book.objects.order_by("pk"),
    ]
    with pytest.raises(ProgrammingError, match="no_such_column"):
        async_to_sync(agather)(*querysets)
    assert any(size >= 2 for size in sizes), sizes  # the failing query shared a pipeline
