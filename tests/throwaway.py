"""An extra database alias on a throw-away server, for tests of the engine's pools."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connections

import async_prefetch
from async_prefetch.execution.pools import close_pools
from async_prefetch.runtime import bridge
from tests.testapp.models import Book


@contextmanager
def engine_alias(alias: str, database: dict[str, Any]) -> Iterator[str]:
    """``alias`` for ``database`` (only the engine's pool uses it); its pools closed after."""
    connections.settings[alias] = {**connections["default"].settings_dict, **database}
    try:
        yield alias
    finally:
        bridge.run_sync(close_pools)
        del connections[alias]
        del connections.settings[alias]


def page_numbers(alias: str) -> list[int]:
    """Page numbers of book 1 (an unsaved instance on ``alias``), prefetched by the engine."""
    book = Book(pk=1)
    book._state.db = alias
    book._state.adding = False
    async_prefetch.prefetch_related_objects([book], "pages")
    return [page.number for page in book.pages.all()]
