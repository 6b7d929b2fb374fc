"""What every executor shares: the protocol, rows in batches, Django's error classes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import psycopg
from django.db import utils as django_db_utils
from django.db.models.sql.constants import GET_ITERATOR_CHUNK_SIZE

from ..sql.compiler import CompiledQuery

Rows = list[tuple[Any, ...]]


RowConsumer = Callable[[Rows], Awaitable[None]]


#: Rows converted from a result per batch: as many as Django's iterator reads at once.
BATCH_ROWS = GET_ITERATOR_CHUNK_SIZE

Limiter = anyio.Semaphore
"""At most so many queries of a call at once (:func:`new_limiter`)."""


def new_limiter(queries: int) -> Limiter:
    """A call's limit of ``queries`` at once: first come, first served; taking a free
    slot does not yield to the event loop (it still raises a pending cancellation), so a
    query that need not wait is sent in the same scheduling step that asked for it."""
    return anyio.Semaphore(queries, fast_acquire=True)


_DJANGO_ERRORS = (
    django_db_utils.DataError,
    django_db_utils.OperationalError,
    django_db_utils.IntegrityError,
    django_db_utils.InternalError,
    django_db_utils.ProgrammingError,
    django_db_utils.NotSupportedError,
    django_db_utils.DatabaseError,
    django_db_utils.InterfaceError,
    django_db_utils.Error,
)


def as_django_error(exc: psycopg.Error) -> Exception:
    """The ``django.db.utils`` exception Django's error wrapper would raise for ``exc``
    (raise it ``from exc``). Django's ``DatabaseErrorWrapper`` is not used because it
    marks its connection as errored: the failing connection here is a pooled one."""
    for django_type in _DJANGO_ERRORS:
        if isinstance(exc, getattr(psycopg, django_type.__name__)):
            return django_type(*exc.args)
    return exc


class Executor(Protocol):
    """Runs one compiled query and awaits ``consume`` on its rows, in order, in one or
    more batches (none for an empty result); returns when every row has been consumed."""

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None: ...


class Scope(Protocol):
    """Where an executor leaves what it holds until its call ends (a pooled connection):
    ``closer()`` is awaited then, also when the call fails or is cancelled."""

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None: ...
