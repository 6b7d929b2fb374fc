"""Compiled relation statements kept across calls (``async_prefetch.sql.statements``).

A reverse foreign key's or many-to-many's query from the related model's plain default
queryset is compiled by Django once; later calls bind their parents' keys to the kept SQL.
The whole test suite runs with ``statements.VERIFY`` (``tests/conftest.py``): every reuse
is compared with Django's compile of the same filter. Here: that reuse happens, where it
must not, and that the caches it fills are Django's.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import models
from django.db.models import Prefetch, Q, prefetch_related_objects
from django.db.models.sql.compiler import SQLCompiler

import async_prefetch
from async_prefetch.relations import build_relation_query, parents
from async_prefetch.sql import statements
from async_prefetch.sql.compiler import CompiledQuery, compile_queryset
from tests.cache_snapshot import snapshot
from tests.factories import seed_bookstore
from tests.testapp.models import Author, Book, BookProfile, Page, Publisher

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("no_kept_statements"),
]


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the models whose queries Django's compiler compiled, in order."""
    compiled: list[str] = []
    as_sql = SQLCompiler.as_sql

    def counted(self: SQLCompiler, *args: Any, **kwargs: Any) -> Any:
        model: Any = self.query.model
        compiled.append(model.__name__)
        return as_sql(self, *args, **kwargs)

    monkeypatch.setattr(SQLCompiler, "as_sql", counted)
    return compiled


def _djangos(*lookups: Any) -> list[Book]:
    return list(Book.objects.order_by("pk").prefetch_related(*lookups))


def test_a_second_call_binds_its_keys_to_the_kept_statement(compiles: list[str]) -> None:
    seed_bookstore(n_books=8)
    lookups = ("pages", "authors")
    compiles.clear()
    first = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)
    assert sorted(compiles) == ["Author", "Book", "Page"]
    assert len(statements.statements) == 2

    compiles.clear()
    statements.VERIFY = False  # VERIFY would compile again to compare
    try:
        second = async_prefetch.prefetch(Book.objects.order_by("pk").filter(pk__gt=0), *lookups)
    finally:
        statements.VERIFY = True
    assert compiles == ["Book"]  # the root only: the relations' SQL was kept
    expected = _djangos(*lookups)
    assert snapshot(second, lookups) == snapshot(expected, lookups)
    assert snapshot(first, lookups) == snapshot(expected, lookups)


def test_other_parents_get_their_own_rows_and_caches() -> None:
    """The kept SQL with another call's keys: each call's caches hold its own parents'
    related rows only, as Django's ``prefetch_related_objects`` fills them."""
    seed_bookstore(n_books=10)
    lookups = ("pages", "authors", "tags")
    pks = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    for half in (pks[:5], pks[5:], pks[2:7]):
        ours = list(Book.objects.filter(pk__in=half).order_by("pk"))
        async_prefetch.prefetch_related_objects(ours, *lookups)
        djangos = list(Book.objects.filter(pk__in=half).order_by("pk"))
        prefetch_related_objects(djangos, *lookups)
        assert snapshot(ours, lookups) == snapshot(djangos, lookups)
    assert len(statements.statements) == 3


def test_not_kept_for_a_prefetch_queryset_or_a_filtering_default_manager() -> None:
    seed_bookstore(n_books=6)
    async_prefetch.prefetch(
        Book.objects.order_by("pk"),
        Prefetch("pages", queryset=Page.objects.filter(number__gt=1)),
        "reviews",  # Review's default manager hides rows: its own get_queryset()
    )
    assert len(statements.statements) == 0


def test_a_builder_asked_without_reuse_returns_the_filtered_queryset() -> None:
    """Callers other than the scheduler (the memo) evaluate ``RelationQuery.queryset``:
    it stays filtered on the parents even when a statement is kept."""
    seed_bookstore(n_books=8)
    async_prefetch.prefetch(Author.objects.order_by("pk"), "books")
    assert len(statements.statements) == 1
    authors: list[Any] = list(Author.objects.order_by("pk")[:2])
    descriptor, manager = Author.books, authors[0].books
    relation = build_relation_query(descriptor, manager, authors, None)
    assert relation is not None
    assert relation.statement is None
    rows = {book.pk for book in relation.queryset}
    expected = {book.pk for author in authors for book in author.books.all()}
    assert rows == expected != {book.pk for book in Book.objects.all()}


def test_verify_raises_when_a_kept_statement_is_not_djangos() -> None:
    seed_bookstore(n_books=6)
    async_prefetch.prefetch(Book.objects.order_by("pk"), "pages")
    (entry,) = statements.statements._entries.values()
    entry.sql_by_cast = {
        cast: sql.replace("ORDER BY", "ORDER BY 1,") for cast, sql in entry.sql_by_cast.items()
    }
    with pytest.raises(AssertionError, match="differs from Django's"):
        async_prefetch.prefetch(Book.objects.order_by("pk"), "pages")


def _compiled(model: type[Any], name: str, parents: list[Any]) -> CompiledQuery:
    """Django's compile of the relation's filtered queryset (no reuse)."""
    relation = build_relation_query(getattr(model, name), getattr(parents[0], name), parents, None)
    assert relation is not None
    return compile_queryset(relation.queryset)


def test_the_least_recently_used_statement_goes_first() -> None:
    seed_bookstore(n_books=6)
    books = list(Book.objects.order_by("pk"))
    keys = [("test", name, "default") for name in ("pages", "authors", "tags")]
    kept = statements.StatementCache(size=2)
    kept.keep(keys[0], _compiled(Book, "pages", books))
    kept.keep(keys[1], _compiled(Book, "authors", books))
    values = [book.pk for book in books]
    assert kept.find(keys[0], values) is not None  # used: now the most recent
    kept.keep(keys[2], _compiled(Book, "tags", books))
    assert len(kept) == 2
    assert kept.find(keys[1], values) is None  # dropped
    found = kept.find(keys[0], values)
    assert found is not None
    assert found.params == (values,)
    assert kept.find(keys[2], values[:1]) is None  # one key: Django's IN, not the array


def test_one_key_is_kept_as_djangos_in_list_of_one() -> None:
    """One distinct key is Django's ``IN (%s)``: a second form of the statement, bound to
    another single key (also given twice); several keys need the array form."""
    seed_bookstore(n_books=6)
    books = list(Book.objects.order_by("pk"))
    kept = statements.StatementCache()
    key = ("test", "pages", "default")
    single = _compiled(Book, "pages", books[:1])
    assert single.sql is not None
    assert "IN (%s)" in single.sql
    kept.keep(key, single)
    assert len(kept) == 1
    other = _compiled(Book, "pages", books[3:4])
    for values in ([books[3].pk], [books[3].pk, books[3].pk]):
        found = kept.find(key, values)
        assert found is not None
        assert (found.sql, found.params) == (other.sql, other.params)
    assert kept.find(key, [book.pk for book in books]) is None  # no array form kept yet
    kept.keep(key, _compiled(Book, "pages", books))
    assert kept.find(key, [book.pk for book in books]) is not None
    assert kept.find(key, [books[2].pk]) is not None  # both forms under one key
    assert len(kept) == 1


def test_a_single_parent_reuses_the_kept_statement(compiles: list[str]) -> None:
    """A detail view's prefetch (one parent) compiles its relations once, as a list's does."""
    seed_bookstore(n_books=8)
    lookups = ("pages", "authors")
    pks = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    async_prefetch.prefetch(Book.objects.filter(pk=pks[0]), *lookups)
    compiles.clear()
    statements.VERIFY = False  # VERIFY would compile again to compare
    try:
        ours = async_prefetch.prefetch(Book.objects.filter(pk=pks[5]), *lookups)
    finally:
        statements.VERIFY = True
    assert compiles == ["Book"]  # the root only
    expected = list(Book.objects.filter(pk=pks[5]).prefetch_related(*lookups))
    assert snapshot(ours, lookups) == snapshot(expected, lookups)


def test_a_compile_of_another_shape_is_not_kept() -> None:
    """Only the array condition alone, its array the only parameter (or one key's
    ``IN (%s)``, its key the only one), is kept."""
    seed_bookstore(n_books=6)
    books = list(Book.objects.order_by("pk"))
    kept = statements.StatementCache()
    filtered = _compiled(Book, "pages", books)
    filtered.queryset.query.add_q(Q(number__gt=1))  # a second condition
    kept.keep(("test", "two conditions", "default"), filtered)
    assert len(kept) == 0


def test_forward_relations_keep_their_statements(compiles: list[str]) -> None:
    """Forward foreign keys (nullable, to another field) and a forward one-to-one keep
    their statements as to-many relations do; the caches stay Django's."""
    seed_bookstore(n_books=8)
    calls: list[tuple[Any, tuple[str, ...]]] = [
        (Book.objects.order_by("pk"), ("publisher", "authors__location", "taggings__tag")),
        (BookProfile.objects.order_by("pk"), ("book",)),
    ]
    firsts = [async_prefetch.prefetch(root, *lookups) for root, lookups in calls]
    forward = sorted(str(key[1]) for key in statements.statements._entries if key[0] == "forward")
    assert forward == [
        "testapp.Author.location",
        "testapp.Book.publisher",
        "testapp.BookProfile.book",
        "testapp.Tagging.tag",
    ]
    for (root, lookups), first in zip(calls, firsts, strict=True):
        compiles.clear()
        statements.VERIFY = False
        try:
            second = async_prefetch.prefetch(root.filter(pk__gt=0), *lookups)
        finally:
            statements.VERIFY = True
        assert compiles == [root.model.__name__]  # the root only
        expected = list(root.prefetch_related(*lookups))
        assert snapshot(second, lookups) == snapshot(expected, lookups)
        assert snapshot(first, lookups) == snapshot(expected, lookups)


def test_forward_statements_need_the_plain_base_manager() -> None:
    """A ``Prefetch`` queryset, or a base manager or queryset class that makes its own
    queryset, compiles every call."""
    seed_bookstore(n_books=4)
    async_prefetch.prefetch(
        Book.objects.order_by("pk"), Prefetch("publisher", queryset=Publisher.objects.all())
    )
    assert len(statements.statements) == 0

    class Filtering(models.Manager[Any]):
        def get_queryset(self) -> Any:
            return super().get_queryset().filter(pk__gt=0)

    class OwnClone(models.QuerySet[Any]):
        def _clone(self) -> Any:
            return super()._clone()  # type: ignore[misc]

    own_clone: Any = OwnClone.as_manager().__class__
    assert parents.plain_manager_class(models.Manager, own=True)
    assert not parents.plain_manager_class(Filtering, own=True)
    assert not parents.plain_manager_class(own_clone, own=True)
