"""The bulk-built querysets of ``_prefetched_objects_cache`` (``async_prefetch.cached_querysets``).

The engine builds the first parent's cached queryset with Django's related manager as a
template and derives every parent's from it. These tests prove that the derivation is
actually used where it applies (Django's manager path runs only for the template and for
the check on the second parent, which a plain default manager's related manager passes
once per template shape in a process), that it is not used where it cannot be exact, and that
derived querysets behave as Django's do when used afterwards: filtered, pickled,
deep-copied, independent of each other.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from django.db.models import Model, Q, QuerySet, prefetch_related_objects

import async_prefetch
from async_prefetch import _compat
from async_prefetch.hydration import cached_querysets, queryset_template
from async_prefetch.runtime.journal import Journal
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.differential import check_sync, fresh
from tests.testapp.models import Author, Book, Country, EBook, Location, Tag

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def manager_calls(monkeypatch: pytest.MonkeyPatch) -> list[Model]:
    """The parents whose cached queryset went through Django's related manager."""
    calls: list[Model] = []
    original = _compat.related_manager_queryset

    def counting(manager: Any) -> QuerySet[Any]:
        calls.append(manager.instance)
        return original(manager)

    monkeypatch.setattr(_compat, "related_manager_queryset", counting)
    return calls


# (root queryset, lookup): reverse FKs with a plain, a filtering and a to_field relation,
# and many-to-many in both directions, with and without a through model.
DERIVED = [
    pytest.param(Book.objects.order_by("pk"), "pages", id="reverse-fk"),
    pytest.param(Book.objects.order_by("pk"), "reviews", id="reverse-fk-filtering-manager"),
    pytest.param(Book.objects.order_by("pk"), "editions", id="reverse-fk-to-field"),
    pytest.param(Book.objects.order_by("pk"), "authors", id="m2m"),
    pytest.param(Book.objects.order_by("pk"), "tags", id="m2m-through-to-field"),
    pytest.param(Author.objects.order_by("pk"), "books", id="m2m-reverse"),
    pytest.param(Tag.objects.order_by("pk"), "books", id="m2m-reverse-through"),
    pytest.param(Location.objects.order_by("pk"), "authors", id="reverse-fk-from-managed"),
]


@pytest.mark.parametrize(("root", "lookup"), DERIVED)
def test_derived_for_all_but_the_first_parents(
    bookstore: Bookstore, manager_calls: list[Model], root: QuerySet[Any], lookup: str
) -> None:
    check_sync(root, [lookup])
    parents = fresh(root)
    assert len(parents) >= 3
    cached_querysets.forget_checks()
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(parents, lookup)
    # The first parent's queryset, and the second one's for the check.
    assert manager_calls == parents[:2]
    # The check holds for that template shape and manager: later calls skip it, unless
    # the manager filters (its query is cloned per parent, by a function made per call).
    again = fresh(root)
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(again, lookup)
    assert manager_calls == again[: 2 if lookup == "reviews" else 1]


def test_manager_with_prefetches_is_not_derived(
    bookstore: Bookstore, manager_calls: list[Model]
) -> None:
    """Location's default manager adds ``prefetch_related``: every parent goes through
    Django's manager, and the result still equals Django's."""
    root = Country.objects.order_by("pk")
    check_sync(root, ["locations"])
    parents = fresh(root)
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(parents, "locations")
    assert manager_calls == [parents[0], *parents]  # the template, then every parent


def test_deferred_key_loads_as_in_django(bookstore: Bookstore, manager_calls: list[Model]) -> None:
    """A deferred relation key costs a query per parent, as in Django (``check_sync``
    counts them); once loaded for matching rows, the querysets are derived."""
    root = Book.objects.order_by("pk").defer("isbn")
    check_sync(root, ["editions"])
    parents = fresh(root)
    cached_querysets.forget_checks()
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(parents, "editions")
    assert manager_calls == parents[:2]


def test_mixed_parent_classes(bookstore: Bookstore, manager_calls: list[Model]) -> None:
    """Books and an e-book (a subclass): the e-book takes Django's path, all equal Django's."""

    def source() -> list[Book]:
        books = list(Book.objects.order_by("pk"))
        return [*books[:2], EBook.objects.get(), *books[2:]]

    check_sync(source, ["pages"])
    parents = fresh(source)
    cached_querysets.forget_checks()
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(parents, "pages")
    assert manager_calls == parents[:3]


def _prefetched(lookup: str) -> tuple[list[Book], list[Book]]:
    expected = list(Book.objects.order_by("pk"))
    prefetch_related_objects(expected, lookup)
    got = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(got, lookup)
    return expected, got


@pytest.mark.parametrize("lookup", ["pages", "authors"])
def test_derived_querysets_behave_as_djangos(bookstore: Bookstore, lookup: str) -> None:
    expected, got = _prefetched(lookup)
    for theirs, ours in zip(expected, got, strict=True):
        mine: QuerySet[Any] = getattr(ours, lookup).all()
        django: QuerySet[Any] = getattr(theirs, lookup).all()
        assert mine is ours._prefetched_objects_cache[lookup]  # type: ignore[attr-defined]
        assert str(mine.query) == str(django.query)
        assert list(mine.filter(pk__gt=0).values_list("pk", flat=True)) == list(
            django.filter(pk__gt=0).values_list("pk", flat=True)
        )
        restored = pickle.loads(pickle.dumps(mine))
        assert [obj.pk for obj in restored] == [obj.pk for obj in django]
        assert str(restored.query) == str(django.query)
        assert str(copy.deepcopy(mine).query) == str(django.query)


def test_derived_querysets_share_no_state(bookstore: Bookstore) -> None:
    """Filtering one parent's cached queryset leaves every other one's query alone."""
    expected, got = _prefetched("pages")
    first: Any = got[0].pages.all()
    first.query.add_q(Q(number__gt=1))  # filter the first one's query in place
    first._hints["marker"] = True
    first._known_related_objects.clear()
    for theirs, ours in zip(expected[1:], got[1:], strict=True):
        mine: Any = ours.pages.all()
        assert "marker" not in mine._hints
        assert mine._known_related_objects
        assert str(mine.query) == str(theirs.pages.all().query)
    assert_same_prefetch(expected[1:], got[1:], ["pages"])
    assert "number" in str(first.query)


@pytest.fixture
def forgotten_checks() -> Iterator[None]:
    """The derivation checks made before the test, and during it, forgotten (a test that
    makes them fail must not leave its answers to later tests)."""
    cached_querysets.forget_checks()
    yield
    cached_querysets.forget_checks()


@pytest.mark.usefixtures("forgotten_checks")
def test_failed_check_falls_back_to_django(
    bookstore: Bookstore, manager_calls: list[Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the derived queryset for the second parent differs from Django's, every parent
    goes through Django's manager (and the caches still equal Django's)."""
    monkeypatch.setattr(cached_querysets, "_equivalent", lambda derived, made: False)
    root = Book.objects.order_by("pk")
    check_sync(root, ["pages"])
    parents = fresh(root)
    cached_querysets.forget_checks()
    manager_calls.clear()
    async_prefetch.prefetch_related_objects(parents, "pages")
    # The template, the second parent's check, then every parent.
    assert manager_calls == [parents[0], parents[1], *parents]


def test_template_state_decides_what_is_shared(bookstore: Bookstore) -> None:
    """The generated maker shares immutable attributes, gives each parent a fresh empty
    container, and refuses a template with mutable state or an attribute that is not
    an identifier (it is generated as an assignment to that name)."""
    book, other = Book.objects.order_by("pk")[:2]
    template: Any = _compat.related_manager_queryset(book.pages)
    template.marker = "shared"
    template.scratch = []
    parts = queryset_template.ParentParts(("id",), (("book", -1),), known_field=None)

    def factory() -> Any:
        return queryset_template.queryset_factory(template, Book, parts)

    make = factory()
    assert make is not None
    result = [object()]
    (made,) = make([other], [result], _unexpected_fallback)
    assert made.marker is template.marker
    assert made.scratch == []
    assert made.scratch is not template.scratch
    assert made._hints["instance"] is other
    assert made._deferred_filter == (False, (), {"book": other})
    assert made._known_related_objects == {}
    assert made._result_cache is result
    assert made._prefetch_done is True
    assert list(vars(made)) == list(vars(template))  # Django's attribute order

    template.scratch.append(1)  # mutable state every parent would share
    assert factory() is None
    del template.scratch
    template._result_cache = [other]  # an evaluated template: not a manager's fresh queryset
    assert factory() is None
    template._result_cache = None
    for name in ("not an identifier", "class", "__debug__", "\ufb01"):  # the last is NFKC "fi"
        setattr(template, name, 1)
        assert factory() is None, name
        delattr(template, name)
    assert factory() is not None


def _unexpected_fallback(parent: Model, result: Any) -> Any:
    raise AssertionError(f"fallback for {parent!r}")


def test_fallback_in_the_parents_order(bookstore: Bookstore) -> None:
    """A parent of another class, or with a ``None`` key, gets the fallback's queryset, in
    its place among the derived ones."""
    book, other, third = Book.objects.order_by("pk")[:3]
    template: Any = _compat.related_manager_queryset(book.pages)
    parts = queryset_template.ParentParts(("isbn",), (("book", -1),), known_field=None)
    make = queryset_template.queryset_factory(template, Book, parts)
    assert make is not None
    ebook = EBook.objects.get()
    other.isbn = None  # type: ignore[assignment]
    calls: list[Any] = []

    def fallback(parent: Model, result: Any) -> Any:
        calls.append(parent)
        return ("fallback", result)

    made = make([book, ebook, other, third], [1, 2, 3, 4], fallback)
    assert calls == [ebook, other]
    assert made[1] == ("fallback", 2)
    assert made[2] == ("fallback", 3)
    assert [made[0]._result_cache, made[3]._result_cache] == [1, 4]
    assert made[3]._hints["instance"] is third


def test_one_function_per_template_shape(bookstore: Bookstore) -> None:
    """Templates of one shape share one generated function, which holds no parent;
    values that compare equal but differ in type (``1``, ``True``) are different shapes."""
    book, other, third = Book.objects.order_by("pk")[:3]
    parts = queryset_template.ParentParts(("id",), (("book", -1),), known_field=None)
    first: Any = _compat.related_manager_queryset(book.pages)
    second: Any = _compat.related_manager_queryset(other.pages)
    make = queryset_template.queryset_factory(first, Book, parts)
    assert make is not None
    assert queryset_template.queryset_factory(second, Book, parts) is make
    held = [*make.__globals__.values(), *make.__globals__["_hints"].values()]
    assert not any(value is book or value is other for value in held)

    first.marker, second.marker = 1, True
    as_int = queryset_template.queryset_factory(first, Book, parts)
    as_bool = queryset_template.queryset_factory(second, Book, parts)
    assert as_int is not None
    assert as_bool is not None
    assert as_int is not as_bool
    (made_int,) = as_int([third], [[]], _unexpected_fallback)
    (made_bool,) = as_bool([third], [[]], _unexpected_fallback)
    assert type(made_int.marker) is int
    assert made_bool.marker is True
    assert made_int._hints == {"instance": third}

    class Unhashable(str):  # a scalar whose class defines __eq__ only: no __hash__
        def __eq__(self, other: object) -> bool:
            return str.__eq__(self, other)

    first.marker = Unhashable("x")
    unkept = queryset_template.queryset_factory(first, Book, parts)
    assert unkept is not None  # made for this template alone
    (made,) = unkept([third], [[]], _unexpected_fallback)
    assert made.marker is first.marker


@pytest.mark.usefixtures("forgotten_checks")
def test_a_manager_taking_more_from_the_parent_is_checked_every_call(
    bookstore: Bookstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A related manager of the project's own whose queryset takes a routing hint from the
    parent: the check that lets the parents' querysets be derived runs on every call, so
    a call whose first two parents agree does not decide for a later call's."""
    plain_class = Book.pages.related_manager_cls

    class TitleHinted(plain_class):  # type: ignore[misc, valid-type]
        def get_queryset(self) -> Any:
            queryset = super().get_queryset()
            queryset._add_hints(title=self.instance.title)
            return queryset

    monkeypatch.setitem(Book.pages.__dict__, "related_manager_cls", TitleHinted)
    books: list[Any] = list(Book.objects.order_by("pk"))
    first_again = Book.objects.get(pk=books[0].pk)
    # The first parent's title twice; then that title first again, and two others.
    calls = [[books[0], first_again], [Book.objects.get(pk=books[0].pk), *books[1:3]]]
    for parents in calls:
        made: list[Any] = cached_querysets.queryset_maker(parents, "pages", Journal())(
            parents, [[] for _ in parents]
        )
        assert [queryset._hints for queryset in made] == [
            parent.pages.get_queryset()._hints for parent in parents
        ]
