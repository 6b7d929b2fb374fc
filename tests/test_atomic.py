"""Inside ``atomic`` the engine uses the caller's connection, so uncommitted rows are seen."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch import api
from async_prefetch.execution.caller_thread import on_caller_thread
from async_prefetch.runtime import bridge
from tests.testapp.models import Author, Book, Page, Publisher


def make_uncommitted() -> Book:
    publisher = Publisher.objects.create(name="Uncommitted Press")
    book = Book.objects.create(title="Draft", isbn="draft-1", publisher=publisher)
    book.authors.add(Author.objects.create(name="Ghost", email="ghost@example.com"))
    Page.objects.bulk_create([Page(book=book, number=n) for n in (2, 1)])
    return book


def check(books: list[Any]) -> None:
    (book,) = books
    assert [p.number for p in book.pages.all()] == [1, 2]
    assert [a.name for a in book.authors.all()] == ["Ghost"]
    assert book.publisher.name == "Uncommitted Press"


LOOKUPS = ("pages", "authors", "publisher")


@pytest.mark.django_db(transaction=True)
def test_sync_api_inside_atomic() -> None:
    with transaction.atomic():
        book = make_uncommitted()
        with CaptureQueriesContext(connection) as queries:
            books = async_prefetch.prefetch(Book.objects.filter(pk=book.pk), *LOOKUPS)
        check(books)
        assert len(queries) == 1 + len(LOOKUPS)
        transaction.set_rollback(True)


@pytest.mark.django_db(transaction=True)
def test_async_api_inside_atomic_of_the_outer_thread() -> None:
    """An async function run with async_to_sync inside atomic (Django's async TestCase)."""
    with transaction.atomic():
        book = make_uncommitted()
        with CaptureQueriesContext(connection) as queries:
            books = async_to_sync(async_prefetch.aprefetch)(
                Book.objects.filter(pk=book.pk), *LOOKUPS
            )
            instances = list(Book.objects.filter(pk=book.pk))
            async_to_sync(async_prefetch.aprefetch_related_objects)(instances, *LOOKUPS)
        check(books)
        check(instances)
        assert len(queries) == (1 + len(LOOKUPS)) * 2
        transaction.set_rollback(True)


@pytest.mark.django_db
def test_inside_django_testcase_transaction() -> None:
    """Plain ``django_db`` wraps the test in a transaction: pooled connections can't see it."""
    book = make_uncommitted()
    check(async_prefetch.prefetch(Book.objects.filter(pk=book.pk), *LOOKUPS))
    check(async_to_sync(async_prefetch.aprefetch)(Book.objects.filter(pk=book.pk), *LOOKUPS))


@pytest.fixture
def no_hand_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the engine hands a call back to Django's own function."""

    def refuse(*args: object) -> None:
        raise AssertionError("handed back to Django's prefetch_related_objects")

    monkeypatch.setattr(api, "django_prefetch_related_objects", refuse)


@pytest.mark.django_db
@pytest.mark.usefixtures("no_hand_back")
def test_sync_api_inside_atomic_runs_the_engine_on_the_callers_connection() -> None:
    """Inside ``atomic`` (Django's ``TestCase``) the engine's own planner and builders run,
    their queries one at a time on the test's connection: its rows are seen, its query log
    sees every query, the engine's ``= ANY`` arrays are in the SQL and the trace has the steps."""
    book = make_uncommitted()
    other = make_uncommitted_second()
    instances = list(Book.objects.filter(pk__in=[book.pk, other.pk]).order_by("pk"))
    with async_prefetch.tracing() as trace, CaptureQueriesContext(connection) as queries:
        async_prefetch.prefetch_related_objects(instances, *LOOKUPS)
    check(instances[:1])
    assert [step.key for step in trace.steps if step.kind == "query"] == list(LOOKUPS)
    assert len(queries) == len(LOOKUPS)
    assert any("= ANY(" in query["sql"] for query in queries.captured_queries)


def make_uncommitted_second() -> Book:
    publisher = Publisher.objects.create(name="Second Press")
    book = Book.objects.create(title="Second", isbn="draft-2", publisher=publisher)
    Page.objects.create(book=book, number=1)
    return book


@pytest.mark.django_db
@pytest.mark.usefixtures("no_hand_back")
def test_sync_api_inside_atomic_queries_on_the_callers_thread_without_a_loop_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run goes on the engine's loop, its queries on this thread (which owns the
    transaction), and no event loop is made for the call (as ``async_to_sync`` would)."""
    book = make_uncommitted()
    threads: list[int] = []

    def on_thread(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        threads.append(threading.get_ident())
        return execute(sql, params, many, context)

    def no_new_loop() -> None:
        raise AssertionError("an event loop was made for the call")

    instances = list(Book.objects.filter(pk=book.pk))
    monkeypatch.setattr(asyncio.events, "new_event_loop", no_new_loop)
    with connection.execute_wrapper(on_thread):
        async_prefetch.prefetch_related_objects(instances, *LOOKUPS)
        books = async_prefetch.prefetch(Book.objects.filter(pk=book.pk), *LOOKUPS)
    check(instances)
    check(books)
    assert threads == [threading.get_ident()] * (len(LOOKUPS) * 2 + 1)


def test_a_base_exception_on_the_callers_thread_cancels_the_run_and_is_raised_there() -> None:
    """``KeyboardInterrupt`` in a function the run sent: the run is interrupted, the task
    awaiting the function gets ``CancelledError`` (never the ``KeyboardInterrupt``, which
    would stop the engine's loop), and the caller's thread raises it."""
    seen: list[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    async def run() -> None:
        try:
            await on_caller_thread(interrupted)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with pytest.raises(KeyboardInterrupt):
        bridge.run_serving(run)
    assert seen == ["cancelled"]
    assert bridge.run_serving(_one) == 1  # the engine's loop still runs


async def _one() -> int:
    return await on_caller_thread(lambda: 1)
