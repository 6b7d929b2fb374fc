"""Shared fixtures. The database server itself is started by tests/settings.py, once per process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from asgiref.sync import SyncToAsync
from django.db import connections

import async_prefetch
from async_prefetch.runtime import bridge
from async_prefetch.sql import statements
from tests.factories import seed_bookstore
from tests.testapp.models import Author, Book, EBook

# Every kept statement the engine reuses is compiled by Django again and compared.
statements.VERIFY = True


@pytest.fixture
def no_kept_statements() -> Iterator[None]:
    """No relation statement kept by earlier tests, and none left for later ones."""
    statements.statements.clear()
    yield
    statements.statements.clear()


@pytest.fixture(scope="session", autouse=True)
def _engine_shutdown(django_db_setup: None) -> Iterator[None]:
    """Close the engine's pools, and the connection async tests opened on asgiref's
    sync thread, before pytest-django drops the test database."""
    yield
    bridge.shutdown()
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@dataclass(frozen=True)
class Bookstore:
    """Primary keys of the rows :func:`tests.factories.seed_bookstore` created, in pk order."""

    book_ids: list[int]
    author_ids: list[int]
    ebook_id: int


@pytest.fixture
def bookstore(db: None) -> Bookstore:
    """``seed_bookstore()`` with the defaults; works with ``django_db(transaction=True)`` too."""
    seed_bookstore()
    return Bookstore(
        book_ids=list(Book.objects.order_by("pk").values_list("pk", flat=True)),
        author_ids=list(Author.objects.order_by("pk").values_list("pk", flat=True)),
        ebook_id=EBook.objects.get().pk,
    )


@pytest.fixture
def installed() -> Iterator[None]:
    """Django's own prefetching routed through the engine for the test."""
    async_prefetch.install()
    try:
        yield
    finally:
        async_prefetch.uninstall()


@pytest.fixture
def anyio_backend() -> str:
    """The engine and its callers run on asyncio (psycopg's async API needs it)."""
    return "asyncio"
