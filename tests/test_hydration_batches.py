"""Per-batch fast paths of hydration and key reading, checked against the per-object ones.

Instances are built a batch at a time by generated code (``fast_batch_from_db``), foreign
key values are read from instances' ``__dict__`` (``field_values``), primary keys checked
at once (``_pks_set``), and a memo level's many-to-many values grouped without a call per
instance (``MemoLevel.values``). Each must give exactly what the per-object path gives.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import F, Model
from django.test.utils import CaptureQueriesContext

from async_prefetch import _compat
from async_prefetch.hydration import rows
from async_prefetch.relations import base, parents
from async_prefetch.runtime.memo_level import MemoLevel
from async_prefetch.sql.compiler import compile_queryset
from tests.conftest import Bookstore
from tests.testapp.models import Book, Country, Page, Review

pytestmark = pytest.mark.django_db(transaction=True)


def _fetched(queryset: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    compiled = compile_queryset(queryset)
    assert compiled.sql is not None
    with connection.cursor() as cursor:
        cursor.execute(compiled.sql, compiled.params)
        return compiled, cursor.fetchall()


def _state(obj: Model) -> dict[str, Any]:
    return {"adding": obj._state.adding, "db": obj._state.db}


@pytest.mark.parametrize(
    "queryset",
    [
        pytest.param(lambda: Page.objects.order_by("pk"), id="foreign-key"),
        pytest.param(lambda: Country.objects.order_by("pk"), id="plain-fields"),
        pytest.param(lambda: Book.objects.order_by("pk").only("title"), id="deferred"),
        pytest.param(lambda: Page.objects.order_by("pk").only("book"), id="deferred-with-key"),
        pytest.param(
            lambda: Page.objects.annotate(twice=F("number") * 2).order_by("pk"), id="annotation"
        ),
        pytest.param(
            lambda: Page.objects.extra(select={"_before": "1 + 1"}).order_by("pk"),
            id="extra-select-first",  # as a many-to-many's source key: fields start later
        ),
    ],
)
def test_batch_builds_what_each_row_builds(
    bookstore: Bookstore, queryset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled, fetched = _fetched(queryset())
    assert fetched
    original = rows.fast_batch_from_db
    made: list[Any] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(rows, "fast_batch_from_db", recorded)
    fast = rows.row_builder(compiled)(fetched)
    assert made, "the batch path was not taken"
    assert made[0] is not None
    monkeypatch.setattr(rows, "fast_batch_from_db", lambda *args, **kwargs: None)
    slow = rows.row_builder(compiled)(fetched)
    assert [type(obj) for obj in fast] == [type(obj) for obj in slow]
    for ours, theirs in zip(fast, slow, strict=True):
        assert list(vars(ours)) == list(vars(theirs))  # same attributes, same order
        assert {k: v for k, v in vars(ours).items() if k != "_state"} == {
            k: v for k, v in vars(theirs).items() if k != "_state"
        }
        assert _state(ours) == _state(theirs)
        assert type(ours._state) is type(theirs._state)
        assert ours._state is not theirs._state


def test_rows_converted_as_results_iter(
    bookstore: Bookstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converters looked up once per query convert every batch as ``results_iter`` does;
    a compiler with its own ``results_iter`` keeps it."""
    book = Book.objects.order_by("pk")[0]
    Review.objects.create(book=book, stars=3, data={"a": [1, 2]})
    Review.objects.create(book=book, stars=4, data={"b": None})
    compiled, fetched = _fetched(Review.all_objects.order_by("pk"))
    compiler: Any = compiled.compiler
    assert compiler.get_converters([s[0] for s in compiler.select])  # JSON: converted
    looked_up: list[Any] = []
    get_converters = compiler.get_converters

    def counted(fields: Any) -> Any:
        looked_up.append(fields)
        return get_converters(fields)

    monkeypatch.setattr(compiler, "get_converters", counted)
    convert = _compat.rows_converter(compiler)
    batches = [fetched[:1], fetched[1:]]
    got = [list(map(tuple, convert(batch))) for batch in batches]
    assert len(looked_up) == 1
    expected = [list(map(tuple, compiler.results_iter(results=(batch,)))) for batch in batches]
    assert got == expected
    assert {"a": [1, 2]} in [row[-1] for batch in got for row in batch]

    class OwnResults(type(compiler)):  # type: ignore[misc]
        def results_iter(self, *args: Any, **kwargs: Any) -> Any:
            return [("own",)]

    compiler.__class__ = OwnResults
    assert list(_compat.rows_converter(compiler)(fetched)) == [("own",)]


def test_batch_builder_is_generated_where_it_applies() -> None:
    init_list = [f.attname for f in Page._meta.concrete_fields]
    path = rows.fast_path(Page, init_list, None)
    assert path is not None
    assert rows.fast_batch_from_db(path, init_list) is not None
    assert rows.fast_batch_from_db(path, []) is None
    assert rows.fast_path(Page, ["id", "no such field"], None) is None  # not plain


def test_field_values_reads_loaded_and_loads_deferred(bookstore: Bookstore) -> None:
    pages = list(Page.objects.order_by("pk"))
    expected = [page.book_id for page in pages]
    with CaptureQueriesContext(connection) as ctx:
        assert base.field_values(Page, "book_id", pages) == expected
    assert not ctx.captured_queries
    deferred = list(Page.objects.order_by("pk").defer("book"))
    deferred[1] = pages[1]  # one loaded among deferred ones
    with CaptureQueriesContext(connection) as ctx:
        assert base.field_values(Page, "book_id", deferred) == expected
    assert len(ctx.captured_queries) == len(pages) - 1  # one per deferred value, as Django


def test_pks_set_as_django(bookstore: Bookstore) -> None:
    books: list[Model] = list(Book.objects.order_by("pk"))
    assert parents._pks_set(books)
    books[2].pk = None
    assert not parents._pks_set(books)
    assert not parents._pks_set([Book(title="unsaved")])


def test_memo_values_skip_rows_gone_and_keep_first_use_order() -> None:
    a, b, c = object(), object(), object()
    level: Any = MemoLevel.__new__(MemoLevel)
    level.found = {1: a, 2: b, 3: c}
    level.needed = [10, 11, 12, 13]
    level.targets = {10: [2, 1], 11: [], 12: [3, 9, 2]}  # 9: a row gone since
    values, linked = level.values()
    assert values == [[b, a], [], [c, b], []]
    assert linked == [b, a, c]
