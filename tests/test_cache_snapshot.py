"""Self-test of tests/cache_snapshot.py: Django against Django, and proof that it can fail.

Equal lookups on two fresh fetches must give equal snapshots; each deliberate difference (another
lookup set, another order, broken identity, a float where a Decimal was, another time zone, a
missing ``_prefetch_done``...) must make :func:`assert_same_prefetch` fail with a diff.
"""

from __future__ import annotations

import copy
import datetime
import weakref
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeAlias

import pytest
from django.db import connection
from django.db.models import Count, Prefetch, prefetch_related_objects
from django.test.utils import CaptureQueriesContext

from tests.cache_snapshot import assert_same_prefetch, render, snapshot
from tests.conftest import Bookstore
from tests.testapp.models import Author, Book, Comment, Page, Review

pytestmark = pytest.mark.django_db

Lookup: TypeAlias = "str | Prefetch[Any, Any, Any]"


def fetched(lookups: Sequence[Lookup], make: Callable[[], Any] | None = None) -> list[Any]:
    objs = list(make() if make is not None else Book.objects.order_by("pk"))
    prefetch_related_objects(objs, *copy.deepcopy(list(lookups)))
    return objs


def assert_differs(a: list[Any], b: list[Any], lookups: Sequence[Lookup], needle: str) -> None:
    with pytest.raises(AssertionError) as info:
        assert_same_prefetch(a, b, lookups)
    assert needle in str(info.value), str(info.value)


SAME_CASES: list[Sequence[Lookup]] = [
    (),
    ("publisher",),
    ("pages", "reviews", "authors__location__country", "tags", "profile", "editions"),
    ("authors__books__pages", "authors__mentees", "authors__mentor"),
    ("comments", "ebook", "publisher__books", "author_list__location"),
    (
        Prefetch("pages", queryset=Page.objects.order_by("-number")[:2], to_attr="last_pages"),
        Prefetch("reviews", queryset=Review.all_objects.filter(stars__gte=3), to_attr="good"),
        Prefetch("authors", queryset=Author.objects.annotate(n=Count("books"))),
    ),
]


@pytest.mark.parametrize("lookups", SAME_CASES, ids=lambda lk: repr(lk)[:60])
def test_django_against_django_is_equal(bookstore: Bookstore, lookups: Sequence[Lookup]) -> None:
    a = fetched(lookups)
    b = fetched(lookups)
    assert_same_prefetch(a, b, lookups)
    assert snapshot(a, lookups) == snapshot(b, lookups)
    assert render(snapshot(a, lookups))  # renders without error


def test_snapshot_sends_no_query(bookstore: Bookstore) -> None:
    lookups = ("pages", "authors__books", "publisher", "reviews", "comments", "profile")
    objs = fetched(lookups)
    with CaptureQueriesContext(connection) as ctx:
        snap = snapshot(objs, lookups)
        render(snap)
    assert len(ctx.captured_queries) == 0


def test_different_lookups_differ(bookstore: Bookstore) -> None:
    assert_differs(fetched(("pages",)), fetched(("pages", "reviews")), (), "reviews")
    assert_differs(fetched(("authors",)), fetched(("authors__location",)), (), "location")


def test_nested_difference_is_seen(bookstore: Bookstore) -> None:
    a = fetched(("authors__location__country",))
    b = fetched(("authors__location",))
    assert_differs(a, b, (), "country")


def test_order_of_items_matters(bookstore: Bookstore) -> None:
    lookups = ("pages",)
    a = fetched(lookups)
    b = fetched(lookups)
    book = next(x for x in b if len(x._prefetched_objects_cache["pages"]._result_cache) > 1)
    book._prefetched_objects_cache["pages"]._result_cache.reverse()
    assert_differs(a, b, lookups, "pages")


def test_order_of_instances_matters(bookstore: Bookstore) -> None:
    a = fetched(())
    b = fetched((), lambda: Book.objects.order_by("-pk"))
    assert_differs(a, b, (), "pk=")


def test_prefetch_done_flag_matters(bookstore: Bookstore) -> None:
    a = fetched(("pages",))
    b = fetched(("pages",))
    b[0]._prefetched_objects_cache["pages"]._prefetch_done = False
    assert_differs(a, b, (), "prefetch_done")


def test_missing_prefetch_cache_attribute_matters(bookstore: Bookstore) -> None:
    a = fetched(("publisher",))
    b = fetched(("publisher",))
    del b[-1]._prefetched_objects_cache
    assert_differs(a, b, (), "has_prefetch_cache")


def test_shared_identity_matters(bookstore: Bookstore) -> None:
    """Django shares one Publisher object between books; equal copies are not the same."""
    a = fetched(("publisher",))
    b = fetched(("publisher",))
    seen: set[int] = set()
    for book in b:
        pub = book._state.fields_cache.get("publisher")
        if pub is None:
            continue
        if id(pub) in seen:
            book._state.fields_cache["publisher"] = copy.copy(pub)
            break
        seen.add(id(pub))
    else:
        pytest.fail("seed data has no two books with one publisher")
    assert_differs(a, b, (), "same object as")


def test_reverse_cache_identity_matters(bookstore: Bookstore) -> None:
    """A page whose ``book`` cache is an equal copy of its parent is not Django's result."""
    a = fetched(("pages",))
    b = fetched(("pages",))
    page = b[0]._prefetched_objects_cache["pages"]._result_cache[0]
    assert page._state.fields_cache["book"] is b[0]
    page._state.fields_cache["book"] = Book.objects.get(pk=b[0].pk)
    assert_differs(a, b, (), "is the parent")


def test_decimal_repr_matters(bookstore: Bookstore) -> None:
    a = fetched(())
    b = fetched(())
    b[0].price = float(a[0].price)
    assert_differs(a, b, (), "price")
    c = fetched(())
    c[0].price = Decimal(f"{a[0].price}0")  # equal value, other exponent
    assert c[0].price == a[0].price
    assert_differs(a, c, (), "price")


def test_timezone_matters(bookstore: Bookstore) -> None:
    lookups = ("reviews",)
    a = fetched(lookups)
    b = fetched(lookups)
    review = next(r for book in b for r in book._prefetched_objects_cache["reviews"]._result_cache)
    chicago = datetime.timezone(datetime.timedelta(hours=-6))
    review.created = review.created.astimezone(chicago)  # same instant, another tzinfo
    assert_differs(a, b, lookups, "created")


def test_deferred_field_matters(bookstore: Bookstore) -> None:
    a = fetched((), lambda: Book.objects.order_by("pk"))
    b = fetched((), lambda: Book.objects.order_by("pk").defer("title"))
    assert_differs(a, b, (), "<deferred>")


def test_to_attr_and_annotation_matter(bookstore: Bookstore) -> None:
    lk_a = (Prefetch("pages", queryset=Page.objects.order_by("number"), to_attr="p"),)
    lk_b = (Prefetch("pages", queryset=Page.objects.order_by("-number"), to_attr="p"),)
    assert_differs(fetched(lk_a), fetched(lk_b), lk_a, "to_attr p")
    lk_c = (Prefetch("authors", queryset=Author.objects.annotate(n=Count("books"))),)
    assert_differs(fetched(lk_c), fetched(("authors",)), lk_c, "attr n")


def test_cached_queryset_sql_matters(bookstore: Bookstore) -> None:
    """A leaf Prefetch queryset is what ``book.pages.all()`` builds on: its SQL is compared."""
    lk_a = (Prefetch("pages", queryset=Page.objects.filter(number__gte=1)),)
    assert_differs(fetched(lk_a), fetched(("pages",)), lk_a, "sql:")


def test_cycles_terminate_and_are_refs(bookstore: Bookstore) -> None:
    lookups = ("authors__mentees__mentor", "comments__content_object", "pages__book")
    objs = fetched(lookups)
    lines = render(snapshot(objs, lookups))
    assert any("same object as" in line for line in lines)


def test_gfk_with_two_content_types(bookstore: Bookstore) -> None:
    comments = list(Comment.objects.order_by("pk"))
    a = list(comments)
    prefetch_related_objects(a, "content_object")
    b = list(Comment.objects.order_by("pk"))
    prefetch_related_objects(b, "content_object")
    assert_same_prefetch(a, b, ["content_object"])
    models = {
        node["fields_cache"]["content_object"]["value"]["model"]
        for node in snapshot(a)["instances"]
    }
    assert models == {"testapp.Book", "testapp.Author"}


def test_peers_identity_matters(bookstore: Bookstore) -> None:
    """Django 6.1's ``_state.peers``: peers must be the very objects, not equal copies."""
    a = fetched(())
    b = fetched(())
    c = fetched(())
    other = fetched(())
    for objs, peers in ((a, a), (b, b), (c, other)):
        refs = [weakref.ref(p) for p in peers]
        for obj in objs:
            obj._state.peers = refs
    keep_alive = [a, b, c, other]
    assert_same_prefetch(a, b)
    assert_differs(a, c, (), "outside the graph")
    assert keep_alive


def test_cached_queryset_origin_matters(bookstore: Bookstore) -> None:
    """Same rows, same SQL, but not built by the related manager: no back-reference, no hints."""
    a = fetched(("pages",))
    b = fetched(("pages",))
    book = b[0]
    cached = book._prefetched_objects_cache["pages"]
    replacement = Page.objects.filter(book_id=book.pk)
    replacement._result_cache = cached._result_cache
    replacement._prefetch_done = True  # type: ignore[attr-defined]
    book._prefetched_objects_cache["pages"] = replacement
    assert_differs(a, b, (), "details")
