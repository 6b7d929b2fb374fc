"""Differential tests: the engine against Django's own ``prefetch_related_objects``.

Every case fetches two fresh lists of the same rows, prefetches the same lookups on one with
Django and on the other with the engine, and requires

* equal snapshots (:mod:`tests.cache_snapshot`: caches, order, identity, field values), and
* the same number of queries (the engine reports its pooled queries into the caller's
  connection query log while that log is captured).

Invalid lookups must raise the same exception type with the same message. Where Django can tell
from the lookups and the instances alone (level 0 checks), the engine must raise before sending
any query; where Django needs rows to decide (a deeper level), the engine may not send more
queries than Django did before raising.

All tests are ``transaction=True``: the engine's pooled connections cannot see the rows of a
test transaction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db import models as django_models
from django.db.models import Count, F, Model, Prefetch, QuerySet, prefetch_related_objects
from django.test.utils import CaptureQueriesContext

import async_prefetch
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.differential import (
    Lookup,
    Source,
    assert_same_queries,
    check_async,
    check_sync,
    closing,
    django_side,
    django_side_async,
    engine_side,
    fresh,
    fresh_async,
    fresh_lookups,
    query_log,
)
from tests.factories import seed_bookstore
from tests.testapp.models import (
    Author,
    Book,
    BookProfile,
    Comment,
    Country,
    EBook,
    Edition,
    Location,
    Page,
    Publisher,
    Review,
    Tag,
    Tagging,
)

pytestmark = pytest.mark.django_db(transaction=True)

# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

BOOKS = Book.objects.order_by("pk")
AUTHORS = Author.objects.order_by("pk")
PUBLISHERS = Publisher.objects.order_by("name")
COMMENTS = Comment.objects.order_by("pk")
EBOOKS = EBook.objects.order_by("pk")


@dataclass(frozen=True)
class Case:
    id: str
    source: Source
    lookups: tuple[Lookup, ...]
    run_async: bool = False
    marks: tuple[Any, ...] = field(default=())


def _half_prefetched(lookups: tuple[Lookup, ...]) -> Callable[[], list[Any]]:
    """Books of which every other one already went through ``lookups`` (with Django)."""

    def make() -> list[Any]:
        books = list(BOOKS.all())
        prefetch_related_objects(books[::2], *fresh_lookups(lookups))
        return books

    return make


def _books_without_publisher() -> list[Any]:
    return list(BOOKS.filter(publisher=None))


def _books_and_ebooks() -> list[Any]:
    """Books followed by EBook instances: a list mixing a model and its MTI child."""
    return [*BOOKS.all()[:3], *EBOOKS.all()]


CASES: list[Case] = [
    # forward FK: nullable, UUID pk; to_field; self-referential
    Case("fk-publisher", BOOKS, ("publisher",), run_async=True),
    Case("fk-to-field-edition-book", Edition.objects.order_by("pk"), ("book",), run_async=True),
    Case("fk-tagging-tag-to-field", Tagging.objects.order_by("pk"), ("tag", "book")),
    Case("fk-review-author-nullable", Review.all_objects.order_by("pk"), ("author", "book")),
    Case("fk-comment-content-type", COMMENTS, ("content_type",)),
    Case("fk-self-mentor", AUTHORS, ("mentor",)),
    Case("fk-self-mentor-chain", AUTHORS, ("mentor__mentor__mentor",), run_async=True),
    Case("fk-location-base-manager", AUTHORS, ("location",)),
    # one-to-one both directions
    Case("o2o-reverse-profile", BOOKS, ("profile",), run_async=True),
    Case("o2o-forward-bookprofile-book", BookProfile.objects.order_by("pk"), ("book",)),
    Case("o2o-forward-then-reverse-cached", BookProfile.objects.order_by("pk"), ("book__profile",)),
    Case("o2o-reverse-then-back", BOOKS, ("profile__book__pages",)),
    # reverse FK
    Case("rfk-pages-default-ordering", BOOKS, ("pages",), run_async=True),
    Case("rfk-reviews-filtering-manager", BOOKS, ("reviews",), run_async=True),
    Case("rfk-editions-to-field", BOOKS, ("editions",)),
    Case("rfk-pages-then-book-cached", BOOKS, ("pages__book",)),
    Case("rfk-self-mentees", AUTHORS, ("mentees",)),
    Case("rfk-self-mentees-nested", AUTHORS, ("mentees__mentees", "mentor__mentees")),
    Case("rfk-uuid-publisher-books", PUBLISHERS, ("books",), run_async=True),
    Case("rfk-uuid-publisher-books-authors", PUBLISHERS, ("books__authors",)),
    # M2M
    Case("m2m-authors", BOOKS, ("authors",), run_async=True),
    Case("m2m-author-books", AUTHORS, ("books",)),
    Case("m2m-through-to-field-tags", BOOKS, ("tags",), run_async=True),
    Case("m2m-tag-books", Tag.objects.order_by("pk"), ("books",)),
    Case("rfk-taggings-tag", BOOKS, ("taggings__tag",)),
    # Unordered querysets: rows in the order PostgreSQL's plan gives, so the array must be
    # planned as Django's IN list is (one value, an integer array).
    Case(
        "m2m-unordered-one-parent",
        EBOOKS,
        (Prefetch("tags", queryset=Tag.objects.filter(books__pk__gt=0)),),
    ),
    Case(
        "m2m-unordered",
        BOOKS,
        (Prefetch("tags", queryset=Tag.objects.filter(books__pk__gt=0)),),
        run_async=True,
    ),
    Case("rfk-unordered", BOOKS, (Prefetch("pages", queryset=Page.objects.order_by()),)),
    # nested, depth 3+
    Case("nested-authors-location-country", BOOKS, ("authors__location__country",), True),
    Case("nested-authors-books-pages", BOOKS, ("authors__books__pages",), run_async=True),
    Case("nested-depth-4", BOOKS, ("authors__mentees__books__publisher",)),
    Case("nested-reviews-author-books-tags", BOOKS, ("reviews__author__books__tags",)),
    Case(
        "nested-many-siblings",
        BOOKS,
        ("pages", "reviews__author", "authors__location", "tags", "profile", "editions"),
        run_async=True,
    ),
    # default manager of Location adds an automatic "country" lookup
    Case("auto-lookup-country-locations", Country.objects.order_by("pk"), ("locations",), True),
    Case("auto-lookup-locations-authors", Country.objects.order_by("pk"), ("locations__authors",)),
    Case("auto-lookup-and-explicit", Country.objects.order_by("pk"), ("locations__country",)),
    Case("auto-lookup-location-authors", AUTHORS, ("location__authors",)),
    Case("auto-lookup-deep", BOOKS, ("authors__location__authors__location",)),
    # traversal through attributes without a prefetcher
    Case("property-publisher-books", BOOKS, ("publisher_prop__books",), run_async=True),
    Case("cached-property-author-list", BOOKS, ("author_list__location",), run_async=True),
    Case("property-after-prefetched-leaf", BOOKS, ("publisher", "publisher_prop__books")),
    Case("property-after-prefetched-path", BOOKS, ("publisher__books", "publisher_prop__books")),
    Case("cached-property-after-m2m", BOOKS, ("authors", "author_list__location")),
    Case(
        "cached-property-before-m2m",
        BOOKS,
        ("publisher__books", "author_list__location", "author_list__location", "authors__books"),
        run_async=True,
    ),
    Case(
        "property-between-siblings",
        BOOKS,
        ("publisher__books", "publisher_prop__books", "tags__books"),
    ),
    Case("cached-property-author-list-books", BOOKS, ("author_list__books__pages",)),
    # relations already loaded by select_related
    Case("select-related-then-prefetch", BOOKS.select_related("publisher"), ("publisher__books",)),
    Case("select-related-leaf-only", BOOKS.select_related("publisher"), ("publisher",)),
    Case(
        "select-related-page-book",
        Page.objects.select_related("book").order_by("pk"),
        ("book__authors",),
        run_async=True,
    ),
    Case("select-related-reverse-o2o", BOOKS.select_related("profile"), ("profile__book",)),
    # objects already fetched: Django skips them, and does not walk below them
    Case("already-fetched-half-authors", _half_prefetched(("authors",)), ("authors__location",)),
    Case("already-fetched-half-pages", _half_prefetched(("pages",)), ("pages", "pages__book")),
    Case("already-fetched-half-publisher", _half_prefetched(("publisher",)), ("publisher__books",)),
    Case("already-fetched-all", _half_prefetched(("authors",)), ("authors",)),
    # Prefetch objects
    Case(
        "prefetch-filter-to-attr",
        BOOKS,
        (Prefetch("pages", queryset=Page.objects.filter(number__gte=2), to_attr="later_pages"),),
        run_async=True,
    ),
    Case(
        "prefetch-filter-no-to-attr",
        BOOKS,
        (Prefetch("pages", queryset=Page.objects.filter(number__gte=2)),),
    ),
    Case(
        "prefetch-ordering", BOOKS, (Prefetch("pages", queryset=Page.objects.order_by("-number")),)
    ),
    Case(
        "prefetch-annotation-m2m",
        BOOKS,
        (
            Prefetch(
                "authors",
                queryset=Author.objects.annotate(n_books=Count("books")).order_by("-name"),
            ),
        ),
        run_async=True,
    ),
    Case(
        "prefetch-annotation-f",
        BOOKS,
        (Prefetch("pages", queryset=Page.objects.annotate(twice=F("number") * 2), to_attr="pp"),),
    ),
    Case(
        "prefetch-select-related",
        BOOKS,
        (
            Prefetch(
                "reviews",
                queryset=Review.all_objects.select_related("author__location").order_by(
                    "-stars", "pk"
                ),
                to_attr="all_reviews",
            ),
        ),
        run_async=True,
    ),
    Case(
        "prefetch-only",
        BOOKS,
        (Prefetch("reviews", queryset=Review.objects.only("stars", "book")),),
    ),
    Case(
        "prefetch-only-join-column-deferred",
        BOOKS,
        (Prefetch("reviews", queryset=Review.objects.only("stars")),),
    ),
    Case("prefetch-defer", BOOKS, (Prefetch("authors", queryset=Author.objects.defer("email")),)),
    Case(
        "prefetch-sliced-to-attr",
        BOOKS,
        (Prefetch("pages", queryset=Page.objects.order_by("-number")[:2], to_attr="last_pages"),),
        run_async=True,
    ),
    Case(
        "prefetch-sliced-m2m",
        BOOKS,
        (Prefetch("authors", queryset=Author.objects.order_by("name")[:2], to_attr="first2"),),
    ),
    Case(
        "prefetch-single-to-attr",
        BOOKS,
        (Prefetch("publisher", queryset=Publisher.objects.all(), to_attr="pub"),),
        run_async=True,
    ),
    Case("prefetch-reverse-o2o-to-attr", BOOKS, (Prefetch("profile", to_attr="prof"),)),
    Case(
        "prefetch-traverse-to-attr-list",
        BOOKS,
        (Prefetch("authors", to_attr="author_objs"), "author_objs__location"),
    ),
    Case(
        "prefetch-nested-queryset-lookups",
        BOOKS,
        (Prefetch("authors", queryset=Author.objects.prefetch_related("location", "mentees")),),
        run_async=True,
    ),
    Case(
        "prefetch-nested-prefetch-in-queryset",
        BOOKS,
        (
            Prefetch(
                "authors",
                queryset=Author.objects.prefetch_related(
                    Prefetch("books", queryset=Book.objects.order_by("-pk"), to_attr="bks")
                ),
            ),
        ),
    ),
    Case(
        "prefetch-queryset-at-depth-2",
        BOOKS,
        (Prefetch("authors__books", queryset=Book.objects.filter(price__gte=10)),),
    ),
    Case(
        "prefetch-queryset-at-depth-2-to-attr",
        BOOKS,
        ("authors", Prefetch("authors__books", to_attr="bk")),
    ),
    Case(
        "prefetch-hidden-reviews-via-all-objects",
        BOOKS,
        (Prefetch("reviews", queryset=Review.all_objects.all()),),
    ),
    Case("prefetch-to-attr-names-field", BOOKS, (Prefetch("pages", to_attr="title"),)),
    Case("prefetch-to-attr-names-m2m", BOOKS, (Prefetch("authors", to_attr="tags"),)),
    Case(
        "prefetch-to-attr-existing-attname",
        BOOKS,
        (Prefetch("publisher", to_attr="publisher_id"),),
    ),
    Case(
        "prefetch-location-queryset-without-auto-lookup",
        Country.objects.order_by("pk"),
        (Prefetch("locations", queryset=Location.objects.order_by("-name")),),
    ),
    # duplicated lookups
    Case("dup-same-string", BOOKS, ("pages", "pages")),
    Case("dup-prefix-repeated", BOOKS, ("authors", "authors__location", "authors")),
    Case("dup-deep-then-prefix", BOOKS, ("authors__location", "authors")),
    Case("dup-prefetch-then-string", BOOKS, (Prefetch("pages"), "pages")),
    Case(
        "dup-same-to-attr",
        BOOKS,
        (Prefetch("pages", to_attr="p"), Prefetch("pages", to_attr="p")),
    ),
    Case(
        "dup-queryset-then-string", BOOKS, (Prefetch("pages", queryset=Page.objects.all()), "pages")
    ),
    Case("dup-string-and-to-attr", BOOKS, ("pages", Prefetch("pages", to_attr="p2"))),
    # generic relations
    Case("generic-relation-comments", BOOKS, ("comments",), run_async=True),
    Case("gfk-content-object", COMMENTS, ("content_object",), run_async=True),
    Case("gfk-through-generic-relation", BOOKS, ("comments__content_object",)),
    Case(
        "gfk-then-nested",
        COMMENTS.filter(content_type__model="book"),
        ("content_object__authors", "content_object__pages"),
    ),
    Case(
        "prefetch-generic-relation-queryset",
        BOOKS,
        (Prefetch("comments", queryset=Comment.objects.order_by("-pk"), to_attr="cs"),),
    ),
    Case("heterogeneous-book-and-ebook", _books_and_ebooks, ("comments", "pages", "authors")),
    # multi-table inheritance
    Case("mti-reverse-ebook", BOOKS, ("ebook",), run_async=True),
    Case("mti-ebook-authors", BOOKS, ("ebook__authors",)),
    # Django 6.1: the e-book's many-to-many manager returns its book's prefetched queryset
    Case("mti-book-then-ebook-authors", BOOKS, ("authors", "ebook__authors"), run_async=True),
    Case(
        "mti-ebook-inherited-relations",
        EBOOKS,
        ("authors", "pages", "publisher", "comments", "tags", "profile"),
        run_async=True,
    ),
    Case("mti-ebook-parent-link", EBOOKS, ("book_ptr__pages",)),
    Case("mti-publisher-books-ebook", PUBLISHERS, ("books__ebook",)),
    # edge cases
    Case("no-lookups", BOOKS, ()),
    Case("empty-instances", Book.objects.none(), ("pages", "bogus")),
    Case("level-without-objects", _books_without_publisher, ("publisher__bogus",)),
    Case("no-related-rows", BOOKS.filter(authors=None), ("authors__location",)),
]


# Django 6.1 fetch modes: instances remember their fetch mode and (FETCH_PEERS) their peers.
FETCH_PEERS: Any = getattr(django_models, "FETCH_PEERS", None)
if FETCH_PEERS is not None:
    CASES += [
        Case(
            "fetch-peers-root",
            BOOKS.fetch_mode(FETCH_PEERS),
            ("pages", "authors__location", "publisher"),
            run_async=True,
        ),
        Case(
            "fetch-peers-prefetch-queryset",
            BOOKS,
            (
                Prefetch("authors", queryset=Author.objects.all().fetch_mode(FETCH_PEERS)),
                "authors__location",
            ),
            run_async=True,
        ),
    ]


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c.source, c.lookups, id=c.id, marks=c.marks) for c in cases]


@pytest.mark.parametrize(("source", "lookups"), _params(CASES))
def test_sync_matches_django(
    bookstore: Bookstore, source: Source, lookups: tuple[Lookup, ...]
) -> None:
    check_sync(source, lookups)


@pytest.mark.anyio
@pytest.mark.parametrize(("source", "lookups"), _params([c for c in CASES if c.run_async]))
async def test_async_matches_django(
    bookstore: Bookstore, source: Source, lookups: tuple[Lookup, ...]
) -> None:
    await check_async(source, lookups)


# --------------------------------------------------------------------------------------------
# aprefetch(queryset): the queryset's own rows, and lookups already on it
# --------------------------------------------------------------------------------------------

QS_CASES: list[tuple[str, QuerySet[Any], tuple[Lookup, ...]]] = [
    ("qs-plain", BOOKS, ("pages", "authors__location")),
    ("qs-own-lookups", BOOKS.prefetch_related("pages"), ("authors",)),
    ("qs-own-lookups-duplicated", BOOKS.prefetch_related("pages", "authors"), ("pages",)),
    ("qs-own-lookups-only", BOOKS.prefetch_related("reviews__author"), ()),
    (
        "qs-own-prefetch-object",
        BOOKS.prefetch_related(Prefetch("pages", queryset=Page.objects.order_by("-number"))),
        ("pages__book",),
    ),
    ("qs-select-related", BOOKS.select_related("publisher"), ("publisher__books",)),
    ("qs-filtered-manager", Review.objects.order_by("pk"), ("book__reviews",)),
    ("qs-annotated", BOOKS.annotate(n=Count("pages")), ("pages",)),
    ("qs-only", BOOKS.only("title"), ("authors",)),
    ("qs-mti", EBOOKS, ("authors", "book_ptr")),
    ("qs-uuid", PUBLISHERS, ("books__tags",)),
    ("qs-empty", Book.objects.none(), ("pages",)),
    ("qs-no-rows", BOOKS.filter(pk=-1), ("pages",)),
    (
        "qs-cached-property-before-m2m",
        BOOKS.select_related("publisher"),
        (
            "publisher",
            "publisher__books",
            "taggings__tag",
            "author_list__location",
            "authors__books",
        ),
    ),
    ("qs-no-rows-invalid-lookup", BOOKS.filter(pk=-1), ("bogus", "title")),
    ("qs-no-ebooks-to-attr-path", EBOOKS.filter(pk=-1), ("all_reviews__author",)),
]
if FETCH_PEERS is not None:
    QS_CASES.append(("qs-fetch-peers", BOOKS.fetch_mode(FETCH_PEERS), ("publisher", "pages")))


def _all_lookups(qs: QuerySet[Any], lookups: tuple[Lookup, ...]) -> list[Lookup]:
    return [*qs._prefetch_related_lookups, *lookups]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("qs", "lookups"), [pytest.param(q, lk, id=i) for i, q, lk in QS_CASES])
def test_prefetch_queryset_sync(
    bookstore: Bookstore, qs: QuerySet[Any], lookups: tuple[Lookup, ...]
) -> None:
    with CaptureQueriesContext(connection) as dctx:
        expected = list(qs.all().prefetch_related(*fresh_lookups(lookups)))
    with CaptureQueriesContext(connection) as ectx:
        got = async_prefetch.prefetch(copy.deepcopy(qs), *fresh_lookups(lookups))
    assert isinstance(got, list)
    assert_same_prefetch(expected, got, _all_lookups(qs, lookups))
    assert_same_queries(
        _all_lookups(qs, lookups),
        [q["sql"] for q in dctx.captured_queries],
        [q["sql"] for q in ectx.captured_queries],
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("qs", "lookups"), [pytest.param(q, lk, id=i) for i, q, lk in QS_CASES])
async def test_aprefetch_queryset(
    bookstore: Bookstore, qs: QuerySet[Any], lookups: tuple[Lookup, ...]
) -> None:
    def django() -> tuple[list[Any], list[str]]:
        with CaptureQueriesContext(connection) as ctx:
            objs = list(qs.all().prefetch_related(*fresh_lookups(lookups)))
        return objs, [q["sql"] for q in ctx.captured_queries]

    expected, django_sql = await sync_to_async(closing(django))()
    async with query_log() as engine_sql:
        got = await async_prefetch.aprefetch(copy.deepcopy(qs), *fresh_lookups(lookups))
    assert isinstance(got, list)
    assert_same_prefetch(expected, got, _all_lookups(qs, lookups))
    assert_same_queries(_all_lookups(qs, lookups), django_sql, engine_sql)


@pytest.mark.anyio
async def test_aprefetch_instances(bookstore: Bookstore) -> None:
    lookups: tuple[Lookup, ...] = ("pages", "authors__books", "publisher")
    expected, django_sql = await django_side_async(BOOKS, lookups)
    objs = await fresh_async(BOOKS)
    async with query_log() as engine_sql:
        got = await async_prefetch.aprefetch(objs, *fresh_lookups(lookups))
    assert [id(o) for o in got] == [id(o) for o in objs]
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)


@pytest.mark.anyio
async def test_aprefetch_using(bookstore: Bookstore) -> None:
    lookups: tuple[Lookup, ...] = ("pages",)

    def django() -> tuple[list[Any], list[str]]:
        with CaptureQueriesContext(connection) as ctx:
            objs = list(BOOKS.using("default").prefetch_related(*lookups))
        return objs, [q["sql"] for q in ctx.captured_queries]

    expected, django_sql = await sync_to_async(closing(django))()
    async with query_log() as engine_sql:
        got = await async_prefetch.aprefetch(BOOKS.all(), *lookups, using="default")
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)


# --------------------------------------------------------------------------------------------
# Lookups applied in several calls, and state-dependent behaviour
# --------------------------------------------------------------------------------------------


def test_second_call_adds_nested_lookup(bookstore: Bookstore) -> None:
    """Prefetch once, then again with an extra nested lookup, on the same instances."""
    first: tuple[Lookup, ...] = ("authors", "pages")
    second: tuple[Lookup, ...] = ("authors__location__country", "pages__book", "reviews")
    expected = fresh(BOOKS)
    django_side(expected, first)
    django_sql = django_side(expected, second)
    got = fresh(BOOKS)
    engine_side(got, first)
    engine_sql = engine_side(got, second)
    assert_same_prefetch(expected, got, (*first, *second))
    assert_same_queries(second, django_sql, engine_sql)


def test_engine_then_django_then_engine(bookstore: Bookstore) -> None:
    """Caches the engine fills are ones Django recognises as fetched, and vice versa."""
    expected = fresh(BOOKS)
    django_side(expected, ("authors",))
    django_side(expected, ("authors__books",))
    d3 = django_side(expected, ("authors__books__pages", "publisher"))
    got = fresh(BOOKS)
    engine_side(got, ("authors",))
    django_side(got, ("authors__books",))
    e3 = engine_side(got, ("authors__books__pages", "publisher"))
    assert_same_prefetch(expected, got, ())
    assert_same_queries(("authors__books__pages", "publisher"), d3, e3)


def test_same_lookups_twice_is_free(bookstore: Bookstore) -> None:
    lookups: tuple[Lookup, ...] = ("authors__location", "pages", "publisher", "profile")
    got = fresh(BOOKS)
    engine_side(got, lookups)
    assert engine_side(got, lookups) == []
    expected = fresh(BOOKS)
    django_side(expected, lookups)
    assert django_side(expected, lookups) == []
    assert_same_prefetch(expected, got, lookups)


COLD_CT_CASES = [
    pytest.param(BOOKS, ("comments",), id="generic-relation"),
    pytest.param(EBOOKS, ("comments",), id="generic-relation-mti"),
    pytest.param(COMMENTS, ("content_object",), id="gfk"),
    pytest.param(BOOKS, ("comments__content_object",), id="generic-relation-then-gfk"),
]


@pytest.mark.parametrize(("source", "lookups"), COLD_CT_CASES)
def test_cold_content_type_cache(
    bookstore: Bookstore, source: Source, lookups: tuple[Lookup, ...]
) -> None:
    """Generic relations look content types up; a cold cache costs a query on both sides."""
    expected = fresh(source)
    ContentType.objects.clear_cache()
    django_sql = django_side(expected, lookups)
    got = fresh(source)
    ContentType.objects.clear_cache()
    engine_sql = engine_side(got, lookups)
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)


@pytest.mark.anyio
@pytest.mark.parametrize(("source", "lookups"), COLD_CT_CASES)
async def test_cold_content_type_cache_async(
    bookstore: Bookstore, source: Source, lookups: tuple[Lookup, ...]
) -> None:
    def django() -> tuple[list[Any], list[str]]:
        objs = fresh(source)
        ContentType.objects.clear_cache()
        return objs, django_side(objs, lookups)

    expected, django_sql = await sync_to_async(closing(django))()
    got = await fresh_async(source)
    ContentType.objects.clear_cache()
    async with query_log() as engine_sql:
        await async_prefetch.aprefetch_related_objects(got, *fresh_lookups(lookups))
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)


@pytest.mark.parametrize(("n_books", "seed"), [(12, 1), (20, 7)])
def test_larger_store(transactional_db: None, n_books: int, seed: int) -> None:
    seed_bookstore(n_books=n_books, seed=seed)
    lookups: tuple[Lookup, ...] = (
        "authors__location__country",
        "authors__books__pages",
        "authors__mentees",
        Prefetch("reviews", queryset=Review.all_objects.order_by("-created"), to_attr="rv"),
        "rv__author__mentor",
        "tags__books",
        "comments__content_object",
        "publisher__books__editions",
        "ebook",
        Prefetch("pages", queryset=Page.objects.order_by("-number")[:1], to_attr="last"),
    )
    check_sync(BOOKS, lookups)


# --------------------------------------------------------------------------------------------
# Invalid lookups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    id: str
    source: Source
    lookups: tuple[Lookup, ...]
    exc: type[Exception]
    fragment: str
    static: bool  # Django decides from lookups and instances alone: engine must send no query


ERROR_CASES: list[ErrorCase] = [
    ErrorCase(
        "cannot-find",
        BOOKS,
        ("bogus",),
        AttributeError,
        "Cannot find 'bogus' on Book object, 'bogus' is an invalid parameter",
        static=True,
    ),
    ErrorCase(
        "cannot-find-after-valid",
        BOOKS,
        ("pages", "authors", "bogus"),
        AttributeError,
        "Cannot find 'bogus' on Book object",
        static=True,
    ),
    ErrorCase(
        "cannot-find-ebook",
        EBOOKS,
        ("pages", "nope"),
        AttributeError,
        "Cannot find 'nope' on EBook object",
        static=True,
    ),
    ErrorCase(
        "not-prefetchable-field",
        BOOKS,
        ("title",),
        ValueError,
        "'title' does not resolve to an item that supports prefetching",
        static=True,
    ),
    ErrorCase(
        "not-prefetchable-attname",
        BOOKS,
        ("publisher_id",),
        ValueError,
        "'publisher_id' does not resolve to an item that supports prefetching",
        static=True,
    ),
    ErrorCase(
        "already-seen-level-0",
        BOOKS,
        ("pages", Prefetch("pages", queryset=Page.objects.all())),
        ValueError,
        "'pages' lookup was already seen with a different queryset",
        static=True,
    ),
    ErrorCase(
        "already-seen-first-in-lookup-order",
        BOOKS,
        (
            Prefetch("pages", queryset=Page.objects.order_by("-number"), to_attr="pages_desc"),
            "pages",
            Prefetch("pages", queryset=Page.objects.all()),
            Prefetch("pages", queryset=Page.objects.order_by("-number"), to_attr="pages_desc"),
        ),
        ValueError,
        "'pages' lookup was already seen with a different queryset",
        static=True,
    ),
    ErrorCase(
        "already-seen-first-in-lookup-order-2",
        BOOKS,
        (
            "pages",
            Prefetch("pages", queryset=Page.objects.order_by("-number"), to_attr="pages_desc"),
            Prefetch("pages", queryset=Page.objects.order_by("-number"), to_attr="pages_desc"),
            Prefetch("pages", queryset=Page.objects.all()),
        ),
        ValueError,
        "'pages_desc' lookup was already seen with a different queryset",
        static=True,
    ),
    ErrorCase(
        "already-seen-two-querysets",
        BOOKS,
        (
            Prefetch("authors", queryset=Author.objects.all()),
            Prefetch("authors", queryset=Author.objects.order_by("name")),
        ),
        ValueError,
        "'authors' lookup was already seen with a different queryset",
        static=True,
    ),
    ErrorCase(
        "already-seen-through-prefix",
        BOOKS,
        ("authors__location", Prefetch("authors", queryset=Author.objects.all())),
        ValueError,
        "'authors' lookup was already seen with a different queryset",
        static=True,
    ),
    # Django checks to_attr against the fields only for instances on which the to_attr
    # attribute is missing (``hasattr`` is its "already fetched" test), after the query
    ErrorCase(
        "to-attr-conflicts-reverse-o2o",
        BOOKS.select_related("profile"),
        (Prefetch("pages", to_attr="profile"),),
        ValueError,
        "to_attr=profile conflicts with a field on the Book model.",
        static=True,
    ),
    ErrorCase(
        "to-attr-conflicts-m2m-mti-child",
        BOOKS.select_related("ebook"),
        (Prefetch("authors", queryset=Author.objects.all(), to_attr="ebook"),),
        ValueError,
        "to_attr=ebook conflicts with a field on the Book model.",
        static=True,
    ),
    # Django needs rows of an earlier level to decide
    ErrorCase(
        "sliced-queryset-without-to-attr",
        BOOKS,
        (Prefetch("pages", queryset=Page.objects.order_by("-number")[1:3]),),
        TypeError,
        "Cannot filter a query once a slice has been taken.",
        static=False,
    ),
    ErrorCase(
        "to-attr-conflicts-after-hasattr-queries",
        BOOKS,
        (Prefetch("pages", to_attr="profile"),),
        ValueError,
        "to_attr=profile conflicts with a field on the Book model.",
        static=False,
    ),
    ErrorCase(
        "already-seen-level-1-before-later-cannot-find",
        BOOKS,
        (
            "authors__location__country",
            Prefetch("authors__location", queryset=Location.objects.all()),
            "bogus__x",
        ),
        ValueError,
        "'authors__location' lookup was already seen with a different queryset",
        static=False,
    ),
    ErrorCase(
        "already-seen-same-path-before-prefix",
        BOOKS,
        (
            Prefetch("authors__books", queryset=Book.objects.all()),
            Prefetch("authors__books", queryset=Book.objects.all()),
            Prefetch("authors", queryset=Author.objects.all()),
        ),
        ValueError,
        "'authors__books' lookup was already seen with a different queryset",
        static=False,
    ),
    ErrorCase(
        "to-attr-conflicts-level-1-behind-select-related",
        Edition.objects.select_related("book__profile").order_by("pk"),
        (Prefetch("book__pages", to_attr="profile"),),
        ValueError,
        "to_attr=profile conflicts with a field on the Book model.",
        static=False,
    ),
    ErrorCase(
        "cannot-find-level-1",
        BOOKS,
        ("pages__bogus",),
        AttributeError,
        "Cannot find 'bogus' on Page object, 'pages__bogus' is an invalid parameter",
        static=False,
    ),
    ErrorCase(
        "cannot-find-level-2",
        BOOKS,
        ("authors__location__bogus",),
        AttributeError,
        "Cannot find 'bogus' on Location object",
        static=False,
    ),
    ErrorCase(
        "not-prefetchable-level-1",
        BOOKS,
        ("authors__name",),
        ValueError,
        "'authors__name' does not resolve to an item that supports prefetching",
        static=False,
    ),
    ErrorCase(
        "already-seen-level-1",
        BOOKS,
        ("authors__books", Prefetch("authors__books", queryset=Book.objects.all())),
        ValueError,
        "'authors__books' lookup was already seen with a different queryset",
        static=False,
    ),
    ErrorCase(
        "cannot-find-behind-gfk",
        Comment.objects.order_by("-pk"),
        ("content_object__pages",),
        AttributeError,
        "Cannot find 'pages' on Author object",
        static=False,
    ),
]


ERROR_CASES += [
    ErrorCase(
        # The inner lookup owns books__pages (Django runs it right after "books"): the
        # later explicit queryset for that path is rejected.
        "inner-lookup-then-explicit-queryset",
        AUTHORS,
        (
            Prefetch("books", queryset=Book.objects.prefetch_related("pages")),
            Prefetch("books__pages", queryset=Page.objects.filter(number=1)),
        ),
        ValueError,
        "'books__pages' lookup was already seen with a different queryset",
        static=False,
    ),
]

# Instances of several models in one list: Django's builders check each instance against
# the relation's model ("Must be ... instance") before any query; the engine filled one
# model's caches with the other's rows, or queried first and failed differently.
MIXED_CASES = [
    ("reverse-fk", lambda: [Author.objects.first(), Book.objects.first()], "reviews"),
    ("reverse-fk-page", lambda: [Book.objects.first(), Page.objects.first()], "reviews"),
    ("reverse-fk-author", lambda: [Book.objects.first(), Author.objects.first()], "pages"),
    ("m2m-forward", lambda: [Book.objects.first(), Author.objects.first()], "authors"),
    ("m2m-reverse", lambda: [Author.objects.first(), Book.objects.first()], "books"),
    ("m2m-through", lambda: [Book.objects.first(), Tag.objects.first()], "tags"),
    ("forward-fk", lambda: [Book.objects.first(), Author.objects.first()], "publisher"),
    ("reverse-o2o", lambda: [Book.objects.first(), Author.objects.first()], "profile"),
    ("to-field", lambda: [Book.objects.first(), Author.objects.first()], "editions"),
    ("gfk", lambda: [Comment.objects.first(), Author.objects.first()], "content_object"),
]


@pytest.mark.parametrize(
    ("make", "lookup"), [pytest.param(m, lk, id=i) for i, m, lk in MIXED_CASES]
)
def test_mixed_models_raise_djangos_error(
    bookstore: Bookstore, make: Callable[[], list[Any]], lookup: str
) -> None:
    objs = make()
    with CaptureQueriesContext(connection) as dctx, pytest.raises(Exception) as dinfo:  # noqa: PT011
        prefetch_related_objects(objs, lookup)
    objs = make()
    with CaptureQueriesContext(connection) as ectx, pytest.raises(Exception) as einfo:  # noqa: PT011
        async_prefetch.prefetch_related_objects(objs, lookup)
    assert type(einfo.value) is type(dinfo.value)
    assert str(einfo.value) == str(dinfo.value)
    assert len(ectx.captured_queries) == len(dctx.captured_queries) == 0
    assert not any(getattr(obj, "_prefetched_objects_cache", {}) for obj in objs)


def _error_params() -> list[Any]:
    return [pytest.param(c, id=c.id) for c in ERROR_CASES]


def _assert_same_error(
    case: ErrorCase, django_exc: BaseException, engine_exc: BaseException
) -> None:
    assert case.fragment in str(django_exc), f"case is stale: Django said {django_exc!r}"
    assert type(engine_exc) is type(django_exc), (
        f"engine raised {engine_exc!r}, Django {django_exc!r}"
    )
    assert str(engine_exc) == str(django_exc)


def _assert_error_queries(case: ErrorCase, django_sql: list[str], engine_sql: list[str]) -> None:
    if case.static:
        assert engine_sql == [], (
            f"engine sent {len(engine_sql)} queries before raising (Django {len(django_sql)}); "
            "this error is decidable from the lookups and instances:\n" + "\n".join(engine_sql)
        )
    else:
        assert len(engine_sql) <= len(django_sql), (
            f"engine sent {len(engine_sql)} queries before raising, Django {len(django_sql)}:\n"
            + "\n".join(engine_sql)
        )


@pytest.mark.parametrize("case", _error_params())
def test_invalid_lookup_sync(bookstore: Bookstore, case: ErrorCase) -> None:
    objs = fresh(case.source)
    with CaptureQueriesContext(connection) as dctx, pytest.raises(case.exc) as dinfo:
        prefetch_related_objects(objs, *fresh_lookups(case.lookups))
    objs = fresh(case.source)
    with CaptureQueriesContext(connection) as ectx, pytest.raises(Exception) as einfo:  # noqa: PT011
        async_prefetch.prefetch_related_objects(objs, *fresh_lookups(case.lookups))
    _assert_same_error(case, dinfo.value, einfo.value)
    _assert_error_queries(
        case,
        [q["sql"] for q in dctx.captured_queries],
        [q["sql"] for q in ectx.captured_queries],
    )


@pytest.mark.anyio
@pytest.mark.parametrize("case", _error_params())
async def test_invalid_lookup_async(bookstore: Bookstore, case: ErrorCase) -> None:
    def django() -> tuple[BaseException, list[str]]:
        objs = fresh(case.source)
        with CaptureQueriesContext(connection) as ctx:
            try:
                prefetch_related_objects(objs, *fresh_lookups(case.lookups))
            except Exception as exc:
                return exc, [q["sql"] for q in ctx.captured_queries]
        raise AssertionError(f"Django did not raise for {case.id}")

    django_exc, django_sql = await sync_to_async(closing(django))()
    objs = await fresh_async(case.source)
    async with query_log() as engine_sql:
        with pytest.raises(Exception) as einfo:  # noqa: PT011
            await async_prefetch.aprefetch_related_objects(objs, *fresh_lookups(case.lookups))
    _assert_same_error(case, django_exc, einfo.value)
    _assert_error_queries(case, django_sql, engine_sql)


@pytest.mark.parametrize("case", _error_params())
def test_invalid_lookup_on_queryset(bookstore: Bookstore, case: ErrorCase) -> None:
    """``prefetch(qs, ...)`` raises like ``list(qs.prefetch_related(...))`` does."""
    if not isinstance(case.source, QuerySet):
        pytest.fail("error cases are querysets")
    with pytest.raises(case.exc) as dinfo:
        list(case.source.all().prefetch_related(*fresh_lookups(case.lookups)))
    with pytest.raises(Exception) as einfo:  # noqa: PT011
        async_prefetch.prefetch(case.source.all(), *fresh_lookups(case.lookups))
    _assert_same_error(case, dinfo.value, einfo.value)


def test_empty_list_accepts_anything(transactional_db: None) -> None:
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects([], "bogus", Prefetch("x", to_attr="y"))
        prefetch_related_objects([], "bogus", Prefetch("x", to_attr="y"))
    assert ctx.captured_queries == []


def _unsaved_book() -> Book:
    return Book(title="unsaved", isbn="unsaved")


UNSAVED_PARENTS: list[tuple[str, Callable[[], Model]]] = [
    ("pages", _unsaved_book),  # reverse FK
    ("editions", _unsaved_book),  # reverse FK, to_field
    ("authors", _unsaved_book),  # M2M
    ("tags", _unsaved_book),  # M2M, custom through
    ("books", lambda: Tag(name="unsaved")),  # reverse M2M, through to_field
    ("profile", _unsaved_book),  # reverse one-to-one
]


@pytest.mark.parametrize(
    ("lookup", "unsaved"), [pytest.param(*case, id=case[0]) for case in UNSAVED_PARENTS]
)
def test_unsaved_parent_raises_djangos_error_before_any_query(
    bookstore: Bookstore, lookup: str, unsaved: Callable[[], Model]
) -> None:
    """Django's filter on the parents rejects one without a primary key (even when the
    relation's key is another field): so does the engine, before sending anything."""

    def parents() -> list[Model]:
        first = type(unsaved())._default_manager.order_by("pk").first()
        assert first is not None
        return [first, unsaved()]

    django_objs, engine_objs = parents(), parents()
    with pytest.raises(ValueError, match="must be saved") as django_error:
        prefetch_related_objects(django_objs, lookup)
    with CaptureQueriesContext(connection) as ctx, pytest.raises(Exception) as engine_error:  # noqa: PT011
        async_prefetch.prefetch_related_objects(engine_objs, lookup)
    assert type(engine_error.value) is ValueError
    assert str(engine_error.value) == str(django_error.value)
    assert ctx.captured_queries == []
    assert all(vars(obj).get("_prefetched_objects_cache", {}) == {} for obj in engine_objs)


def test_to_attr_already_set_on_some_instances(bookstore: Bookstore) -> None:
    """A to_attr set by Django on some instances only: is_fetched is per instance."""
    books: list[Model] = fresh(BOOKS)
    expected = fresh(BOOKS)
    for objs in (books, expected):
        setattr(objs[0], "p", [])  # noqa: B010
    lookups: tuple[Lookup, ...] = (Prefetch("pages", to_attr="p"),)
    d = django_side(expected, lookups)
    e = engine_side(books, lookups)
    assert_same_prefetch(expected, books, lookups)
    assert_same_queries(lookups, d, e)
