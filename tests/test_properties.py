"""Property-based differential test: random bookstores, random lookup sets, Django vs engine.

Each example truncates the test app's tables, bulk-inserts a small random bookstore (nullable
links left empty at random, hidden reviews, MTI children, generic comments on two content
types), draws a root queryset and a list of lookups from a catalogue of valid paths and
``Prefetch`` objects (with and without querysets, ``to_attr``, nested, duplicated, in any order),
and runs them through Django's ``prefetch_related_objects`` and the engine's sync API.

* Django succeeds -> the engine succeeds with an equal snapshot and the same number of queries.
* Django raises (e.g. a ``Prefetch`` queryset after a lookup through the same path, or a path
  through a ``to_attr`` that is not there) -> the engine raises the same exception type with the
  same message; when Django raised before any query, the engine must not send one either (when
  Django needed rows to decide, a concurrent engine may already have sent other lookups'
  queries, so counts are not compared).
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeAlias

import pytest
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS, connection
from django.db.models import Count, Model, Prefetch, QuerySet, prefetch_related_objects
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import async_prefetch
from async_prefetch.execution.pools import get_pool
from async_prefetch.runtime import bridge
from tests.cache_snapshot import assert_same_prefetch
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

Lookup: TypeAlias = "str | Prefetch[Any, Any, Any]"
MakeLookup = Callable[[], Lookup]

MAX_EXAMPLES = 200

# --------------------------------------------------------------------------------------------
# Random bookstores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookSpec:
    publisher: int | None
    price_cents: int
    published: datetime.date | None
    ebook: bool


@dataclass(frozen=True)
class ReviewSpec:
    book: int
    author: int | None
    stars: int
    hidden: bool
    created_minutes: int | None
    data: dict[str, Any]


@dataclass(frozen=True)
class Store:
    countries: int
    locations: list[int | None]
    authors: list[tuple[int | None, int | None]]  # (location, mentor)
    publishers: list[uuid.UUID]
    tags: int
    books: list[BookSpec]
    book_authors: list[tuple[int, int]]
    taggings: list[tuple[int, int, int]]  # (book, tag, weight)
    pages: list[tuple[int, int]]  # (book, number)
    reviews: list[ReviewSpec]
    profiles: list[int]
    editions: list[tuple[int, int]]  # (book, year)
    comments: list[tuple[str, int]]  # ("book" | "author", index)


def _maybe(draw: st.DrawFn, size: int) -> int | None:
    if size == 0:
        return None
    value: int | None = draw(st.none() | st.integers(0, size - 1))
    return value


@st.composite
def stores(draw: st.DrawFn) -> Store:
    countries = draw(st.integers(0, 2))
    locations = [_maybe(draw, countries) for _ in range(draw(st.integers(0, 3)))]
    n_authors = draw(st.integers(0, 5))
    authors = [(_maybe(draw, len(locations)), _maybe(draw, i)) for i in range(n_authors)]
    publishers = draw(st.lists(st.uuids(version=4), max_size=3, unique=True))
    tags = draw(st.integers(0, 4))
    books = [
        BookSpec(
            publisher=_maybe(draw, len(publishers)),
            price_cents=draw(st.integers(0, 99_999)),
            published=draw(
                st.none() | st.dates(datetime.date(1990, 1, 1), datetime.date(2030, 1, 1))
            ),
            ebook=draw(st.booleans()),
        )
        for _ in range(draw(st.integers(1, 6)))
    ]
    n_books = len(books)

    def pairs(n_right: int) -> list[tuple[int, int]]:
        if n_right == 0:
            return []
        return sorted(
            draw(
                st.sets(
                    st.tuples(st.integers(0, n_books - 1), st.integers(0, n_right - 1)),
                    max_size=8,
                )
            )
        )

    book_authors = pairs(n_authors)
    taggings = [(b, t, draw(st.integers(0, 9))) for b, t in pairs(tags)]
    pages = draw(st.lists(st.tuples(st.integers(0, n_books - 1), st.integers(1, 4)), max_size=10))
    reviews = [
        ReviewSpec(
            book=draw(st.integers(0, n_books - 1)),
            author=_maybe(draw, n_authors),
            stars=draw(st.integers(1, 5)),
            hidden=draw(st.booleans()),
            created_minutes=draw(st.none() | st.integers(0, 2_000_000)),
            data=draw(
                st.dictionaries(
                    st.sampled_from(["a", "b", "source"]),
                    st.none()
                    | st.integers(-5, 5)
                    # PostgreSQL's jsonb rejects \u0000
                    | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3),
                    max_size=2,
                )
            ),
        )
        for _ in range(draw(st.integers(0, 8)))
    ]
    profiles = sorted(draw(st.sets(st.integers(0, n_books - 1))))
    editions = draw(
        st.lists(st.tuples(st.integers(0, n_books - 1), st.integers(1990, 2030)), max_size=5)
    )
    comment_targets = [("book", i) for i in range(n_books)] + [
        ("author", i) for i in range(n_authors)
    ]
    comments = draw(st.lists(st.sampled_from(comment_targets), max_size=5))
    return Store(
        countries=countries,
        locations=locations,
        authors=authors,
        publishers=publishers,
        tags=tags,
        books=books,
        book_authors=book_authors,
        taggings=taggings,
        pages=pages,
        reviews=reviews,
        profiles=profiles,
        editions=editions,
        comments=comments,
    )


def truncate_tables() -> None:
    tables = [
        model._meta.db_table
        for model in apps.get_app_config("testapp").get_models(include_auto_created=True)
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE {} RESTART IDENTITY CASCADE".format(", ".join(f'"{t}"' for t in tables))
        )


def build(store: Store) -> None:
    """Insert ``store`` into freshly truncated tables (bulk inserts; EBooks one by one)."""
    truncate_tables()
    countries = Country.objects.bulk_create(
        [Country(name=f"Country {i}") for i in range(store.countries)]
    )
    locations = Location.objects.bulk_create(
        [
            Location(name=f"Location {i}", country=None if c is None else countries[c])
            for i, c in enumerate(store.locations)
        ]
    )
    authors = Author.objects.bulk_create(
        [
            Author(
                name=f"Author {i}",
                email=f"a{i}@example.com",
                location=None if loc is None else locations[loc],
            )
            for i, (loc, _) in enumerate(store.authors)
        ]
    )
    mentored = []
    for author, (_, mentor) in zip(authors, store.authors, strict=True):
        if mentor is not None:
            author.mentor = authors[mentor]
            mentored.append(author)
    if mentored:
        Author.objects.bulk_update(mentored, ["mentor"])
    publishers = Publisher.objects.bulk_create(
        [Publisher(id=pk, name=f"Publisher {i}") for i, pk in enumerate(store.publishers)]
    )
    tags = Tag.objects.bulk_create([Tag(name=f"tag{i}") for i in range(store.tags)])

    def fields(i: int, spec: BookSpec) -> dict[str, Any]:
        return {
            "title": f"Book {i}",
            "isbn": f"isbn-{i}",
            "publisher": None if spec.publisher is None else publishers[spec.publisher],
            "published": spec.published,
            "price": Decimal(spec.price_cents) / 100,
        }

    plain = Book.objects.bulk_create(
        [Book(**fields(i, spec)) for i, spec in enumerate(store.books) if not spec.ebook]
    )
    plain_iter = iter(plain)
    books: list[Book] = []
    for i, spec in enumerate(store.books):
        if spec.ebook:
            books.append(EBook.objects.create(file_format="pdf", **fields(i, spec)))
        else:
            books.append(next(plain_iter))
    through = Book.authors.through
    through.objects.bulk_create(
        [through(book_id=books[b].pk, author_id=authors[a].pk) for b, a in store.book_authors]
    )
    Tagging.objects.bulk_create(
        [Tagging(book=books[b], tag=tags[t], weight=w) for b, t, w in store.taggings]
    )
    Page.objects.bulk_create([Page(book=books[b], number=n, text=f"p{n}") for b, n in store.pages])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    Review.all_objects.bulk_create(
        [
            Review(
                book=books[r.book],
                author=None if r.author is None else authors[r.author],
                stars=r.stars,
                hidden=r.hidden,
                created=(
                    None
                    if r.created_minutes is None
                    else start + datetime.timedelta(minutes=r.created_minutes)
                ),
                data=r.data,
            )
            for r in store.reviews
        ]
    )
    BookProfile.objects.bulk_create(
        [BookProfile(book=books[b], summary=f"s{b}") for b in store.profiles]
    )
    Edition.objects.bulk_create([Edition(book=books[b], year=y) for b, y in store.editions])
    book_ct = ContentType.objects.get_for_model(Book)
    author_ct = ContentType.objects.get_for_model(Author)
    Comment.objects.bulk_create(
        [
            Comment(
                content_type=book_ct if kind == "book" else author_ct,
                object_id=(books if kind == "book" else authors)[i].pk,
                text=f"on {kind} {i}",
            )
            for kind, i in store.comments
        ]
    )


# --------------------------------------------------------------------------------------------
# Random lookups
# --------------------------------------------------------------------------------------------


def _p(lookup: str, queryset: Callable[[], QuerySet[Any]] | None = None, **kw: Any) -> MakeLookup:
    def make() -> Lookup:
        return Prefetch(lookup, queryset=None if queryset is None else queryset(), **kw)

    make.__name__ = f"Prefetch({lookup!r}, qs={queryset is not None}, {kw})"
    return make


def _s(lookup: str) -> MakeLookup:
    def make() -> Lookup:
        return lookup

    make.__name__ = repr(lookup)
    return make


BOOK_CATALOGUE: list[MakeLookup] = [
    *map(
        _s,
        [
            "publisher",
            "publisher__books",
            "publisher_prop__books",
            "authors",
            "authors__location__country",
            "authors__books",
            "authors__mentor",
            "authors__mentees__books",
            "author_list__location",
            "pages",
            "pages__book",
            "reviews",
            "reviews__author",
            "tags",
            "tags__books",
            "taggings__tag",
            "profile",
            "profile__book",
            "editions",
            "editions__book",
            "comments",
            "comments__content_object",
            "ebook",
            "ebook__authors",
            "all_reviews__author__location",
            "author_objs__books",
        ],
    ),
    _p("pages", lambda: Page.objects.order_by("-number"), to_attr="pages_desc"),
    _p("pages", lambda: Page.objects.order_by("-number")[:1], to_attr="last_page"),
    _p("pages", lambda: Page.objects.filter(number__gt=1)),
    _p("reviews", lambda: Review.all_objects.select_related("author"), to_attr="all_reviews"),
    _p("authors", lambda: Author.objects.annotate(nb=Count("books")).order_by("-nb", "pk")),
    _p("authors", lambda: Author.objects.prefetch_related("location"), to_attr="author_objs"),
    _p("authors__books", lambda: Book.objects.only("title", "publisher")),
    _p("publisher", lambda: Publisher.objects.all(), to_attr="pub"),
    _p("tags", lambda: Tag.objects.order_by("-name")),
    _p("comments", lambda: Comment.objects.order_by("-pk"), to_attr="cmts"),
    _p("authors__location", lambda: Location.objects.select_related("country")),
    _p("profile", to_attr="prof"),
]

AUTHOR_CATALOGUE: list[MakeLookup] = [
    *map(
        _s,
        [
            "location",
            "location__country",
            "location__authors",
            "mentor",
            "mentor__mentor",
            "mentees",
            "mentees__books",
            "books",
            "books__pages",
            "books__publisher",
            "reviews__book",
        ],
    ),
    _p("books", lambda: Book.objects.order_by("-price", "pk"), to_attr="books_by_price"),
    _p("mentees", lambda: Author.objects.prefetch_related("books")),
    _p("reviews", lambda: Review.all_objects.order_by("-stars", "pk")),
]

COUNTRY_CATALOGUE: list[MakeLookup] = [
    *map(
        _s, ["locations", "locations__country", "locations__authors", "locations__authors__books"]
    ),
    _p("locations", lambda: Location.objects.order_by("-name")),
]

COMMENT_CATALOGUE: list[MakeLookup] = [
    *map(_s, ["content_object", "content_type", "content_object__comments"]),
]

PUBLISHER_CATALOGUE: list[MakeLookup] = [
    *map(_s, ["books", "books__authors", "books__ebook", "books__publisher"]),
    _p("books", lambda: Book.objects.filter(price__gte=100), to_attr="pricey"),
]

ROOTS: list[tuple[str, Callable[[], QuerySet[Any]], list[MakeLookup]]] = [
    ("books", lambda: Book.objects.order_by("pk"), BOOK_CATALOGUE),
    ("books+publisher", lambda: Book.objects.select_related("publisher"), BOOK_CATALOGUE),
    ("ebooks", lambda: EBook.objects.order_by("-pk"), BOOK_CATALOGUE),
    ("authors", lambda: Author.objects.order_by("pk"), AUTHOR_CATALOGUE),
    ("countries", lambda: Country.objects.order_by("pk"), COUNTRY_CATALOGUE),
    ("comments", lambda: Comment.objects.order_by("pk"), COMMENT_CATALOGUE),
    ("publishers", lambda: Publisher.objects.order_by("name"), PUBLISHER_CATALOGUE),
]


@dataclass(frozen=True)
class Scenario:
    root: str
    queryset: Callable[[], QuerySet[Any]]
    lookups: list[MakeLookup]
    via_queryset: bool  # prefetch(qs, ...) instead of prefetch_related_objects(list, ...)

    def __repr__(self) -> str:
        names = ", ".join(m.__name__ for m in self.lookups)
        api = "prefetch(qs)" if self.via_queryset else "prefetch_related_objects"
        return f"Scenario({self.root}, {api}, [{names}])"


def _first_segment(make: MakeLookup) -> str:
    lookup = make()
    path = lookup.prefetch_through if isinstance(lookup, Prefetch) else lookup
    return path.split("__")[0]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A root and up to 6 lookups, biased towards lookups sharing a first step.

    Lookups through the same relation (plain, nested, with a queryset, with a ``to_attr``)
    are what interact in Django's loop (done_queries, already-fetched instances, "already
    seen" errors), so most examples draw from one to three relations' entries only; an entry
    may also be repeated.
    """
    root, queryset, catalogue = draw(st.sampled_from(ROOTS))
    groups: dict[str, list[MakeLookup]] = {}
    for make in catalogue:
        groups.setdefault(_first_segment(make), []).append(make)
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(sorted(groups)), min_size=1, max_size=3))
        pool = [make for name in chosen for make in groups[name]]
    else:
        pool = catalogue
    lookups = draw(st.lists(st.sampled_from(pool), max_size=6))
    repeat: bool = draw(st.booleans())
    if lookups and repeat:
        lookups.insert(draw(st.integers(0, len(lookups))), draw(st.sampled_from(lookups)))
    return Scenario(root, queryset, lookups, draw(st.booleans()))


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


def warm_content_types() -> None:
    ContentType.objects.clear_cache()
    ContentType.objects.get_for_models(*apps.get_app_config("testapp").get_models())


def run(
    prefetcher: Callable[..., Any], queryset: QuerySet[Any], lookups: Sequence[Lookup]
) -> tuple[list[Model], BaseException | None, list[str]]:
    """Fresh instances, prefetched by ``prefetcher``; returns (instances, error, queries)."""
    warm_content_types()
    objs = list(queryset)
    error: BaseException | None = None
    with CaptureQueriesContext(connection) as ctx:
        try:
            prefetcher(objs, *copy.deepcopy(list(lookups)))
        except Exception as exc:
            error = exc
    return objs, error, [q["sql"] for q in ctx.captured_queries]


def run_queryset(
    api: Callable[..., Any], queryset: QuerySet[Any], lookups: Sequence[Lookup]
) -> tuple[list[Model], BaseException | None, list[str]]:
    """``api(queryset, *lookups)`` evaluating the queryset itself; queries include the root."""
    warm_content_types()
    objs: list[Model] = []
    error: BaseException | None = None
    with CaptureQueriesContext(connection) as ctx:
        try:
            objs = list(api(queryset, *copy.deepcopy(list(lookups))))
        except Exception as exc:
            error = exc
    return objs, error, [q["sql"] for q in ctx.captured_queries]


def _django_queryset(queryset: QuerySet[Any], *lookups: Lookup) -> list[Any]:
    return list(queryset.prefetch_related(*lookups))


@pytest.fixture
def full_pool(transactional_db: None) -> None:
    """Open every pooled connection before Hypothesis draws anything.

    psycopg_pool draws from the global ``random`` (an expiry jitter) whenever it opens a
    connection, on the engine's thread; Hypothesis reports any change of that state during
    a draw as the strategy's own use (``HypothesisDeprecationWarning``). A pool at its
    maximum size opens no more connections while none is lost.
    """

    async def check_out_all() -> None:
        pool = await get_pool(DEFAULT_DB_ALIAS)
        held = [await pool.getconn() for _ in range(pool.max_size)]
        for conn in held:
            await pool.putconn(conn)

    bridge.run_sync(check_out_all)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("full_pool")
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(store=stores(), scenario=scenarios())
def test_engine_matches_django(store: Store, scenario: Scenario) -> None:
    build(store)
    lookups = [make() for make in scenario.lookups]
    if scenario.via_queryset:
        expected, d_err, d_sql = run_queryset(_django_queryset, scenario.queryset(), lookups)
        got, e_err, e_sql = run_queryset(async_prefetch.prefetch, scenario.queryset(), lookups)
    else:
        expected, d_err, d_sql = run(prefetch_related_objects, scenario.queryset(), lookups)
        got, e_err, e_sql = run(
            async_prefetch.prefetch_related_objects, scenario.queryset(), lookups
        )

    event(f"root={scenario.root}")
    event(f"django: {type(d_err).__name__ if d_err else 'ok'}")
    if d_err is not None:
        assert e_err is not None, f"Django raised {d_err!r}, the engine did not"
        assert (type(e_err), str(e_err)) == (type(d_err), str(d_err)), (
            f"engine raised {e_err!r}, Django {d_err!r}"
        )
        if not d_sql:  # decidable without rows: the engine must not query either
            assert e_sql == [], f"engine sent {len(e_sql)} queries before raising, Django none"
        return
    if e_err is not None:
        raise AssertionError(f"engine raised {e_err!r}, Django did not") from e_err
    assert_same_prefetch(expected, got, lookups)
    assert len(e_sql) == len(d_sql), (
        f"query count: django {len(d_sql)}, engine {len(e_sql)}\n"
        + "\n".join(["django:", *d_sql, "engine:", *e_sql])
    )
