"""A ``Prefetch`` queryset's own ``prefetch_related()`` owns its paths, as in Django.

Django pushes the lookups of a fetched queryset on top of its stack: they run right after
the lookup that fetched it, before the explicit lookups that come after, and so they decide
what a path they share with those is (its attribute, its ``to_attr``, its queryset).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db.models import Prefetch

from tests.conftest import Bookstore
from tests.differential import check_async, check_sync
from tests.testapp.models import Author, Book, Page


def nested(to_attr: bool) -> list[Any]:
    pages = Prefetch(
        "pages",
        queryset=Page.objects.filter(number__gt=1),
        to_attr="pages_lst" if to_attr else None,
    )
    books = Prefetch(
        "books",
        queryset=Book.objects.prefetch_related(pages),
        to_attr="books_lst" if to_attr else None,
    )
    outer = "books_lst" if to_attr else "books"
    inner = "pages_lst" if to_attr else "pages"
    return [books, f"{outer}__{inner}__book__publisher"]


CASES = {
    # Django: 4 queries; the engine planned the explicit path first and raised
    # "Cannot find 'pages_lst' on Book object".
    "to_attr": nested(to_attr=True),
    # The engine raised a false "'books__pages' lookup was already seen with a
    # different queryset".
    "no-to_attr": nested(to_attr=False),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("lookups", list(CASES.values()), ids=list(CASES))
def test_inner_lookups_run_before_later_explicit_ones(
    bookstore: Bookstore, lookups: list[Any]
) -> None:
    check_sync(Author.objects.order_by("pk"), lookups)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("lookups", list(CASES.values()), ids=list(CASES))
async def test_inner_lookups_run_before_later_explicit_ones_async(
    bookstore: Bookstore, lookups: list[Any]
) -> None:
    await check_async(Author.objects.order_by("pk"), lookups)
