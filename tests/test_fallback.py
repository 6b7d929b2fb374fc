"""Databases other than PostgreSQL get Django's own prefetch, with a one-time warning."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

import async_prefetch
from async_prefetch import api, dispatch
from tests.testapp.models import Book

ALIAS = "sqlite_fallback"


@pytest.fixture
def sqlite_alias() -> Iterator[str]:
    connections.settings[ALIAS] = {
        **connections["default"].settings_dict,
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": ":memory:",
    }
    try:
        yield ALIAS
    finally:
        del connections[ALIAS]
        del connections.settings[ALIAS]
        dispatch._warned_aliases.discard(ALIAS)


def test_non_postgresql_alias_falls_back_to_django_with_one_warning(
    sqlite_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(api, "django_prefetch_related_objects", lambda *args: calls.append(args))
    books = [Book(pk=1), Book(pk=2)]
    for book in books:
        book._state.db = sqlite_alias

    with pytest.warns(async_prefetch.FallbackWarning, match="sqlite"):
        async_prefetch.prefetch_related_objects(books, "pages")
    assert calls == [(books, "pages")]

    with warnings.catch_warnings(record=True) as later:  # once per alias
        warnings.simplefilter("always")
        async_prefetch.prefetch_related_objects(books, "authors")
    assert not [w for w in later if issubclass(w.category, async_prefetch.FallbackWarning)]
    assert calls[-1] == (books, "authors")
