"""Inside ``atomic`` the engine uses the caller's connection, so uncommitted rows are seen."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

import async_prefetch
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

    monkeypatch.setattr(async_prefetch.api, "django_prefetch_related_objects", refuse)


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
