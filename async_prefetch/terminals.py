"""Django's async queryset methods with their queries on the engine's pool.

Django's ``aget()``, ``afirst()``, ``acount()``, ... run the synchronous method through
``sync_to_async(thread_sensitive=True)``: one thread for all of them, so
``asyncio.gather(Book.objects.aget(pk=1), Book.objects.aget(pk=2))`` sends one query after
the other. The methods of :class:`PoolQuerySetMixin` run Django's own synchronous method
with its queries on the engine's pool instead (:func:`.gather.run_methods`), so such
calls query at the same time, on connections of their own::

    class Book(models.Model):
        objects = PoolManager()                        # or PoolQuerySet.as_manager()

    first, second = await asyncio.gather(Book.objects.aget(pk=1), Book.objects.aget(pk=2))

The results and exceptions are Django's (``DoesNotExist``, ``MultipleObjectsReturned`` and
their messages), the queryset's ``prefetch_related()`` lookups run concurrently as
:func:`~async_prefetch.aprefetch` runs them, and queries are reported to the caller's
connection (``connection.queries``, ``execute_wrappers``) as Django reports them. Inside
``atomic`` the queries go through the caller's own connection (pipelined), so the
transaction's rows are seen; with a database that is not PostgreSQL the methods are
Django's. :func:`install_pool_terminals` gives every queryset these methods.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models import QuerySet

from . import patching, streaming
from .dispatch import capture_async_caller, engine_root, engine_supports
from .gather import MethodCall, afetch_all, run_methods

__all__ = [
    "TERMINALS",
    "PoolManager",
    "PoolQuerySet",
    "PoolQuerySetMixin",
    "install_pool_terminals",
    "pool_terminals_installed",
    "uninstall_pool_terminals",
]

#: The methods :class:`PoolQuerySetMixin` provides (and :func:`install_pool_terminals` sets).
TERMINALS = (
    "aget",
    "afirst",
    "alast",
    "acount",
    "aexists",
    "aaggregate",
    "ain_bulk",
    "aiterator",
    "__aiter__",
)


async def _call(queryset: QuerySet[Any], method: Any) -> Any:
    (result,) = await run_methods([MethodCall(queryset, method)])
    return result


if TYPE_CHECKING:
    _Base = QuerySet[Any, Any]
else:
    _Base = object


class PoolQuerySetMixin(_Base):
    """A ``QuerySet`` mixin whose async terminal methods query on the engine's pool.

    ``aget``, ``afirst``, ``alast``, ``acount``, ``aexists``, ``aaggregate``,
    ``ain_bulk``, ``aiterator`` and ``async for`` take Django's arguments and return
    (or raise) what Django's methods return (raise). Put it before ``QuerySet`` (or
    your queryset class) in the bases; see the module docstring.
    """

    async def aget(self, *args: Any, **kwargs: Any) -> Any:
        return await _call(self, lambda queryset: queryset.get(*args, **kwargs))

    async def afirst(self) -> Any:
        return await _call(self, lambda queryset: queryset.first())

    async def alast(self) -> Any:
        return await _call(self, lambda queryset: queryset.last())

    async def acount(self) -> int:
        count: int = await _call(self, lambda queryset: queryset.count())
        return count

    async def aexists(self) -> bool:
        exists: bool = await _call(self, lambda queryset: queryset.exists())
        return exists

    async def aaggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = await _call(
            self, lambda queryset: queryset.aggregate(*args, **kwargs)
        )
        return result

    async def ain_bulk(
        self, id_list: Iterable[Any] | None = None, *, field_name: str = "pk"
    ) -> dict[Any, Any]:
        ids = None if id_list is None else list(id_list)  # may be read twice
        result: dict[Any, Any] = await _call(
            self, lambda queryset: queryset.in_bulk(ids, field_name=field_name)
        )
        return result

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for obj in queryset``: fills the result cache as Django does, with the
        queries on the pool."""

        async def generator() -> AsyncIterator[Any]:
            for obj in await afetch_all(self):
                yield obj

        return generator()

    async def aiterator(self, chunk_size: int = streaming.DEFAULT_CHUNK_SIZE) -> AsyncIterator[Any]:
        """Django's ``aiterator()``: the rows read in chunks on a pooled connection, each
        chunk's ``prefetch_related()`` lookups prefetched, the next chunk read meanwhile
        (:func:`~async_prefetch.aiterator`). Inside ``atomic``, on another database or
        for rows that are not model instances, Django's own ``aiterator()``."""
        if chunk_size <= 0:
            raise ValueError("Chunk size must be strictly positive.")
        caller = await capture_async_caller()
        rows: Any  # an async generator
        if engine_supports(self.db) and engine_root(self) and not caller.in_atomic():
            rows = streaming.aiterator(self, chunk_size=chunk_size)
        else:
            # Django's own (neither this module's nor install()'s, which would come back here)
            rows = patching._django_aiterator(self, chunk_size)
        async with contextlib.aclosing(rows):
            async for obj in rows:
                yield obj


class PoolQuerySet(PoolQuerySetMixin, QuerySet[Any, Any]):
    """``QuerySet`` with :class:`PoolQuerySetMixin`'s methods."""


class PoolManager(models.Manager.from_queryset(PoolQuerySet)):  # type: ignore[misc]
    """A manager whose querysets are :class:`PoolQuerySet`."""


_lock = threading.Lock()
_saved: dict[str, Any] = {}


def install_pool_terminals() -> None:
    """Give every ``QuerySet`` :class:`PoolQuerySetMixin`'s methods (also those of
    querysets whose class overrides none of them). Idempotent; undone by
    :func:`uninstall_pool_terminals`."""
    with _lock:
        if _saved:
            return
        for name in TERMINALS:
            _saved[name] = QuerySet.__dict__[name]
            setattr(QuerySet, name, PoolQuerySetMixin.__dict__[name])


def uninstall_pool_terminals() -> None:
    """Put back the methods :func:`install_pool_terminals` replaced (a method replaced
    since by someone else, e.g. ``uninstall()`` restoring Django's ``aiterator``, stays)."""
    with _lock:
        while _saved:
            name, original = _saved.popitem()
            if QuerySet.__dict__.get(name) is PoolQuerySetMixin.__dict__[name]:
                setattr(QuerySet, name, original)


def pool_terminals_installed() -> bool:
    """True between :func:`install_pool_terminals` and :func:`uninstall_pool_terminals`."""
    return bool(_saved)
