"""Memos: related instances kept across the chunks of a session (``Memo``).

Differential against django-memoized-prefetch on its README example (the same ids per
cache, no more queries), against Django for the querysets left in many-to-many caches,
and against Django exactly where no memo applies.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from django.db import connection
from django.db.models import Model, Prefetch, QuerySet, prefetch_related_objects
from django.test.utils import CaptureQueriesContext
from django_memoized_prefetch import (  # type: ignore[import-untyped]
    MemoizedPrefetch,
    MemoizedPrefetchConfig,
)

from async_prefetch import Memo, tracing
from async_prefetch.runtime import bridge
from async_prefetch.runtime.scheduler import run_in_session, run_prefetch
from async_prefetch.runtime.session import CallerContext, Session
from async_prefetch.runtime.trace import RunTrace
from tests.cache_snapshot import assert_same_prefetch
from tests.memoapp.models import Author, Book, Category, Genre, Publisher, Review, Shelf

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = 10


def seed(n_books: int = 40, n_authors: int = 15) -> None:
    """The README's bookstore: shared authors and translators, a few publishers,
    categories added in a random order, reviews."""
    rng = random.Random(0)
    authors = Author.objects.bulk_create(
        Author(name=f"author {i}", email=f"a{i}@example.com") for i in range(n_authors)
    )
    publishers = Publisher.objects.bulk_create(
        Publisher(name=f"publisher {i}", country="NZ") for i in range(3)
    )
    categories = Category.objects.bulk_create(Category(name=f"category {i}") for i in range(6))
    books = Book.objects.bulk_create(
        Book(
            title=f"book {i}",
            isbn=f"{i:013}",
            author=rng.choice(authors),
            translator=rng.choice([None, *authors]),
            publisher=rng.choice(publishers),
        )
        for i in range(n_books)
    )
    for book in books:
        book.categories.add(*rng.sample(categories, rng.randint(0, 3)))
    Review.objects.bulk_create(
        Review(book=rng.choice(books), rating=rng.randint(1, 5), comment="")
        for _ in range(n_books * 2)
    )
    genres = Genre.objects.bulk_create(Genre(name=name) for name in "dbeac")
    for i in range(4):
        Shelf.objects.create(label=f"shelf {i}").genres.add(*rng.sample(genres, 3))


def chunks(queryset: QuerySet[Any]) -> list[list[Any]]:
    objs = list(queryset.order_by("pk"))
    return [objs[start : start + CHUNK] for start in range(0, len(objs), CHUNK)]


def session(*memos: Memo) -> Session:
    caller = CallerContext.capture()

    async def make() -> Session:  # its limiter belongs to the engine's loop
        return Session(caller, memos)

    return bridge.run_sync(make)


def run_chunks(session: Session, parts: Sequence[list[Any]], lookups: Sequence[Any]) -> None:
    for chunk in parts:
        bridge.run_sync(run_in_session, session, chunk, list(lookups))


def book_caches(book: Any) -> tuple[Any, ...]:
    """The ids a book's caches hold (django-memoized-prefetch caches no ``None``)."""
    cache = book._state.fields_cache
    translator = cache["translator"] if book.translator_id is not None else None
    return (
        cache["author"].pk,
        None if translator is None else translator.pk,
        cache["publisher"].pk,
    )


def flat(parts: list[list[Any]]) -> list[Any]:
    return [obj for part in parts for obj in part]


def pks(objs: Any) -> list[Any]:
    return [obj.pk for obj in objs]


def memo_queries(trace: RunTrace, model: type[Model]) -> int:
    return sum(step.key == f"(memo {model.__name__})" for step in trace.steps)


def queries_from(captured: CaptureQueriesContext, model: type[Model]) -> int:
    """Captured queries that read ``model``'s table first."""
    table = f'FROM "{model._meta.db_table}"'
    return sum(table in query["sql"] for query in captured.captured_queries)


def test_books_as_django_memoized_prefetch_with_no_more_queries() -> None:
    seed()
    theirs = chunks(Book.objects.all())
    with CaptureQueriesContext(connection) as their_queries:
        memoized = MemoizedPrefetch(
            MemoizedPrefetchConfig(Author, ["author", "translator"]),
            MemoizedPrefetchConfig(Publisher, ["publisher"], prefetch_all=True),
            MemoizedPrefetchConfig(
                Category,
                ["categories"],
                is_many_to_many=True,
                through_model=Book.categories.through,
                source_field="book_id",
                target_field="category_id",
            ),
        )
        for chunk in theirs:
            memoized.process_chunk(chunk)
    ours = chunks(Book.objects.all())
    memo = [Memo(Author), Memo(Publisher, all=True), Memo(Category)]
    with CaptureQueriesContext(connection) as our_queries:
        run_chunks(session(*memo), ours, ["author", "translator", "publisher", "categories"])

    for their_book, our_book in zip(flat(theirs), flat(ours), strict=True):
        assert book_caches(our_book) == book_caches(their_book)
        assert "translator" in our_book._state.fields_cache  # None, as Django caches it
        their_categories = their_book._prefetched_objects_cache["categories"]
        our_categories = our_book._prefetched_objects_cache["categories"]
        assert isinstance(our_categories, QuerySet)
        assert sorted(pks(our_categories)) == sorted(pks(their_categories))
    assert len(our_queries) <= len(their_queries)
    # One instance per row across chunks, as theirs: the point of a memo.
    by_pk: dict[Any, Any] = {}
    for book in flat(ours):
        for related in (book.author, book.translator, *book.categories.all()):
            if related is not None:
                assert by_pk.setdefault((type(related), related.pk), related) is related


def test_reviews_nested_as_django_memoized_prefetch() -> None:
    """The README's nested attributes: ``book.publisher`` and ``book__author`` on reviews."""
    seed()
    theirs = chunks(Review.objects.select_related("book"))
    with CaptureQueriesContext(connection) as their_queries:
        memoized = MemoizedPrefetch(
            MemoizedPrefetchConfig(Publisher, ["book.publisher"]),
            MemoizedPrefetchConfig(Author, ["book__author"]),
        )
        for chunk in theirs:
            memoized.process_chunk(chunk)
    ours = chunks(Review.objects.select_related("book"))
    with CaptureQueriesContext(connection) as our_queries:
        run_chunks(
            session(Memo(Publisher), Memo(Author)), ours, ["book__publisher", "book__author"]
        )
    for their_review, our_review in zip(flat(theirs), flat(ours), strict=True):
        their_book, our_book = their_review.book, our_review.book
        assert our_book._state.fields_cache["author"].pk == their_book.author.pk
        assert our_book._state.fields_cache["publisher"].pk == their_book.publisher.pk
    assert len(our_queries) <= len(their_queries)


def test_all_loads_the_table_once_across_chunks_and_calls() -> None:
    seed()
    memo = Memo(Publisher, all=True)
    first, second = chunks(Book.objects.all()), chunks(Book.objects.all())
    with tracing() as trace:
        run_chunks(session(memo), first, ["publisher"])
        run_chunks(session(memo), second, ["publisher"])
    assert len(first) > 1
    assert memo_queries(trace, Publisher) == 1
    assert trace.queries == 1
    assert all(b._state.fields_cache["publisher"] is memo.get(b.publisher_id) for b in second[-1])
    assert memo.loaded
    assert len(memo) == Publisher.objects.count()


def test_the_lru_bound_holds_and_evicted_keys_are_fetched_again() -> None:
    seed()
    memo = Memo(Author, size=3)
    run = session(memo)
    books = chunks(Book.objects.all())
    for chunk in books:
        with CaptureQueriesContext(connection) as captured:
            run_chunks(run, [chunk], ["author"])
        assert len(memo) <= 3
        # Each chunk needs more than 3 authors: it still gets all of them.
        assert {book.author_id for book in chunk} == {
            book._state.fields_cache["author"].pk for book in chunk
        }
        assert len({book.author_id for book in chunk}) > 3
        assert len(captured) == 1  # the evicted ones again
    held: list[Any] = list(memo._instances)
    again = list(Book.objects.filter(author_id__in=held))
    with CaptureQueriesContext(connection) as captured:
        run_chunks(run, [again], ["author"])
    assert len(captured) == 0
    assert all(b._state.fields_cache["author"] is memo.get(b.author_id) for b in again)


def test_author_and_translator_share_one_query() -> None:
    seed()
    books = list(Book.objects.order_by("pk"))
    django_books = list(Book.objects.order_by("pk"))
    with CaptureQueriesContext(connection) as django_queries:
        prefetch_related_objects(django_books, "author", "translator")
    assert len(django_queries) == 2
    with CaptureQueriesContext(connection) as our_queries:
        run_chunks(session(Memo(Author)), [books], ["author", "translator"])
    assert len(our_queries) == 1, [query["sql"] for query in our_queries.captured_queries]
    assert queries_from(our_queries, Author) == 1
    shared = 0
    for book in books:
        assert book._state.fields_cache["author"].pk == book.author_id
        if book.translator_id is not None:
            translator = book._state.fields_cache["translator"]
            assert translator.pk == book.translator_id
            for other in books:
                if other.author_id == book.translator_id:
                    assert other.author is translator  # one instance per row
                    shared += 1
    assert shared


def test_many_to_many_caches_are_djangos_querysets_in_djangos_order() -> None:
    seed()
    django_shelves = list(Shelf.objects.order_by("pk"))
    prefetch_related_objects(django_shelves, "genres")
    shelves = list(Shelf.objects.order_by("pk"))
    memo = Memo(Genre)
    run_chunks(session(memo), [shelves[:2], shelves[2:]], ["genres"])
    for django_shelf, shelf in zip(django_shelves, shelves, strict=True):
        expected = django_shelf._prefetched_objects_cache["genres"]  # type: ignore[attr-defined]
        got = shelf._prefetched_objects_cache["genres"]  # type: ignore[attr-defined]
        assert type(got) is type(expected)
        assert got._prefetch_done
        assert got._result_cache is not None
        assert pks(got) == pks(expected)  # Genre's ordering ("-name")
        assert str(got.query) == str(expected.query)
        assert all(genre is memo.get(genre.pk) for genre in got)
    # An unordered target: the order the rows were added (the join rows' order).
    books = list(Book.objects.order_by("pk"))
    run_chunks(session(Memo(Category)), [books], ["categories"])
    through = Book.categories.through.objects.order_by("pk")
    for book in books:
        added = [row.category_id for row in through if row.book_id == book.pk]
        assert pks(book.categories.all()) == added


def test_where_no_memo_applies_results_are_djangos() -> None:
    """A ``Prefetch`` queryset, reverse relations and unrelated memos: Django's path."""
    seed()
    lookups: list[Any] = [
        Prefetch("author", queryset=Author.objects.all()),
        "reviews",
        Prefetch("categories", queryset=Category.objects.order_by("name")),
        "publisher__books",
    ]
    django_books = list(Book.objects.order_by("pk"))
    with CaptureQueriesContext(connection) as django_queries:
        prefetch_related_objects(django_books, *lookups)
    books = list(Book.objects.order_by("pk"))
    memos = [Memo(Author), Memo(Category), Memo(Review), Memo(Genre)]
    caller = CallerContext.capture()
    with CaptureQueriesContext(connection) as our_queries:
        run = functools.partial(run_prefetch, memo=memos)
        bridge.run_sync(run, books, copy.deepcopy(lookups), caller)
    assert_same_prefetch(django_books, books, lookups)
    assert len(our_queries) == len(django_queries)


def test_memo_hits_are_traced() -> None:
    seed()
    books = list(Book.objects.order_by("pk"))
    memo = Memo(Author)
    run_chunks(session(memo), [books[:20]], ["author"])
    books = list(Book.objects.order_by("pk"))  # nothing cached yet
    with tracing() as trace:
        run_chunks(session(memo), [books], ["author"])
    (memo_step,) = [step for step in trace.steps if step.kind == "memo"]
    assert memo_step.key == "author"
    held = {book.author_id for book in books[:20]}
    assert memo_step.objects == len(held)
    assert memo_queries(trace, Author) == int(bool({b.author_id for b in books} - held))


def test_other_key_shapes_match_django(bookstore: Any) -> None:
    """A forward one-to-one (the target caches its parent back, as in Django), UUID
    primary keys, and a many-to-many whose join rows point at ``Tag.name``."""
    from tests.testapp import models as store

    lookups = ["book", "book__publisher", "book__tags"]
    django_profiles = list(store.BookProfile.objects.order_by("pk"))
    prefetch_related_objects(django_profiles, *lookups)
    profiles = list(store.BookProfile.objects.order_by("pk"))
    memos = (Memo(store.Book), Memo(store.Publisher), Memo(store.Tag))
    run_chunks(session(*memos), [profiles[:1], profiles[1:]], lookups)
    assert len(profiles) > 1
    for django_profile, profile in zip(django_profiles, profiles, strict=True):
        book, django_book = profile._state.fields_cache["book"], django_profile.book
        assert book.pk == django_book.pk
        assert book._state.fields_cache["profile"] is profile
        publisher = book._state.fields_cache["publisher"]
        assert (publisher and publisher.pk) == (django_book.publisher and django_book.publisher.pk)
        tags = book._prefetched_objects_cache["tags"]
        assert sorted(pks(tags)) == sorted(pks(django_book.tags.all()))
        rows = store.Tagging.objects.filter(book=book).order_by("pk")
        assert [tag.name for tag in tags] == [row.tag_id for row in rows]


def test_a_memo_queryset_shapes_what_it_fetches(bookstore: Any) -> None:
    """``select_related()`` and ``prefetch_related()`` of a memo's queryset apply to the
    instances it fetches, once: held instances keep them."""
    from tests.testapp import models as store

    memo = Memo(
        store.Author,
        queryset=store.Author.objects.select_related("location").prefetch_related("mentees"),
    )
    reviews = list(store.Review.all_objects.exclude(author=None).order_by("pk"))
    run = session(memo)
    with CaptureQueriesContext(connection) as captured:
        run_chunks(run, [reviews[:2], reviews[2:]], ["author"])
    authors = {review.author_id for review in reviews}
    for review in reviews:
        author = review._state.fields_cache["author"]
        assert "location" in author._state.fields_cache
        expected = pks(store.Author.objects.filter(mentor=author))
        assert sorted(pks(author._prefetched_objects_cache["mentees"])) == sorted(expected)
    held_first = {review.author_id for review in reviews[:2]}
    assert len(captured) == 2 * (1 + bool(authors - held_first))


def test_memo_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="Two memos of Author"):
        Session(CallerContext.capture(), [Memo(Author), Memo(Author)])
    with pytest.raises(ValueError, match="at least 1"):
        Memo(Author, size=0)
    with pytest.raises(ValueError, match="needs a queryset of Author"):
        Memo(Author, queryset=Book.objects.all())
    with pytest.raises(TypeError):
        Session(CallerContext.capture(), [Author])  # type: ignore[list-item]


def test_calls_that_pass_the_same_memo_share_it() -> None:
    """A worker processing batches: ``prefetch(..., memo=memo)`` per batch fetches each
    author once, and ``aprefetch`` and the streams take the same object."""
    from asgiref.sync import async_to_sync

    import async_prefetch

    seed()
    authors = Memo(Author)
    ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    with CaptureQueriesContext(connection) as first:
        async_prefetch.prefetch(Book.objects.filter(pk__in=ids[:20]), "author", memo=authors)
    held = len(authors)
    with CaptureQueriesContext(connection) as again:
        books = async_to_sync(async_prefetch.aprefetch)(
            Book.objects.filter(pk__in=ids[:20]), "author", memo=authors
        )
    assert len(first) == 2  # the books, then their authors
    assert len(again) == 1  # the books only: every author was held
    assert len(authors) == held
    assert all(book.author is authors.get(book.author_id) for book in books)
    streamed = list(
        async_prefetch.iterator(Book.objects.order_by("pk"), "author", chunk_size=7, memo=authors)
    )
    assert [book.author_id for book in streamed] == [
        b.author_id for b in Book.objects.order_by("pk")
    ]
    assert all(book.author is authors.get(book.author_id) for book in streamed)
