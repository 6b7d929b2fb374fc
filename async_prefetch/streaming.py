"""Big querysets chunk by chunk, each chunk prefetched, the next one fetched meanwhile.

``async for book in aiterator(Book.objects.all(), "authors", "pages", chunk_size=2000)``
reads the root rows in chunks on a pooled connection (a server-side cursor, or a streamed
result where ``DISABLE_SERVER_SIDE_CURSORS`` is set), prefetches each chunk's lookups
concurrently as :func:`~async_prefetch.aprefetch` does, and while the loop body works on
one chunk the next one is already being read and prefetched (``read_ahead`` chunks at
most). :func:`iterator` is the same for synchronous code.

Each chunk's caches are those Django's ``iterator(chunk_size=...)`` with
``prefetch_related()`` fills. Leaving the loop early (``break``, an exception, a
cancellation, or the iterator being closed or garbage-collected) stops the read-ahead in
the server, closes the cursor and returns the connection. Inside ``atomic`` (the
transaction's rows are only visible on the caller's connection), with another database
or with non-model rows, chunks come from Django's own iterator and are prefetched one after
another by the engine, without read-ahead.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from typing import Any, TypeVar

from django.core.exceptions import SynchronousOnlyOperation
from django.db.models import Model, QuerySet

from . import api
from .dispatch import Lookup, capture_async_caller, engine_root, engine_supports, split_lookups
from .runtime import bridge
from .runtime.memo import MemoSpec
from .runtime.session import CallerContext
from .runtime.stream import Stream

__all__ = ["DEFAULT_CHUNK_SIZE", "aiterator", "iterator"]

M = TypeVar("M", bound=Model)

#: Django's default for ``QuerySet.aiterator()``.
DEFAULT_CHUNK_SIZE = 2000


def aiterator(
    queryset: QuerySet[M],
    *lookups: Lookup,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    read_ahead: int = 1,
    memo: MemoSpec = None,
    consistent: bool | None = None,
) -> AsyncGenerator[M]:
    """An async iterator over ``queryset``'s instances, each chunk of ``chunk_size`` with
    ``lookups`` (and the queryset's own ``prefetch_related()`` lookups) prefetched, up to
    ``read_ahead`` chunks fetched ahead of the loop. ``memo``: see :class:`~async_prefetch.Memo`.
    ``consistent``: the root rows and every chunk's prefetches see one database snapshot
    (default: the ``CONSISTENT`` setting).

    Raises ``ValueError`` at once for a ``chunk_size`` below 1 or a negative ``read_ahead``.
    """
    _check(chunk_size, read_ahead)
    return _aiterate(queryset, lookups, chunk_size, read_ahead, memo, consistent)


def iterator(
    queryset: QuerySet[M],
    *lookups: Lookup,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    read_ahead: int = 1,
    memo: MemoSpec = None,
    consistent: bool | None = None,
) -> Generator[M]:
    """:func:`aiterator` for synchronous code: the engine reads and prefetches on its own
    thread while the caller's loop body runs."""
    _check(chunk_size, read_ahead)
    return _iterate(queryset, lookups, chunk_size, read_ahead, memo, consistent)


def _check(chunk_size: int, read_ahead: int) -> None:
    if chunk_size < 1:
        raise ValueError("Chunk size must be strictly positive.")
    if read_ahead < 0:
        raise ValueError("read_ahead must be zero or more.")


async def _aiterate(
    queryset: QuerySet[M],
    lookups: tuple[Lookup, ...],
    chunk_size: int,
    read_ahead: int,
    memo: MemoSpec,
    consistent: bool | None,
) -> AsyncGenerator[M]:
    queryset, all_lookups = split_lookups(queryset, lookups, None)
    caller = (await capture_async_caller()).with_options(consistent=consistent)
    if not _streamable(queryset, caller):
        async for chunk in _django_chunks_async(queryset, chunk_size):
            await api.aprefetch_related_objects(chunk, *all_lookups)
            for obj in chunk:
                yield obj
        return
    stream = Stream(
        queryset, all_lookups, caller, chunk_size=chunk_size, read_ahead=read_ahead, memo=memo
    )
    await bridge.run_async(stream.open)
    bridge.start_soon(stream.produce)
    next_chunk: Callable[[], Awaitable[list[Any] | None]] = stream.next_chunk
    try:
        while (rows := await bridge.run_async(next_chunk)) is not None:
            for instance in rows:
                yield instance
            del instance  # a chunk is never empty
            _let_go(rows)  # not held while the next chunk is asked for (and read)
    finally:
        await bridge.run_async(stream.aclose)


def _iterate(
    queryset: QuerySet[M],
    lookups: tuple[Lookup, ...],
    chunk_size: int,
    read_ahead: int,
    memo: MemoSpec,
    consistent: bool | None,
) -> Generator[M]:
    queryset, all_lookups = split_lookups(queryset, lookups, None)
    caller = CallerContext.capture().with_options(consistent=consistent)
    if not _streamable(queryset, caller):
        for chunk in _chunks(queryset.iterator(chunk_size), chunk_size):
            api.prefetch_related_objects(chunk, *all_lookups)
            yield from chunk
        return
    stream = Stream(
        queryset, all_lookups, caller, chunk_size=chunk_size, read_ahead=read_ahead, memo=memo
    )
    bridge.run_sync(stream.open)
    bridge.start_soon(stream.produce)
    next_chunk: Callable[[], Awaitable[list[Any] | None]] = stream.next_chunk
    try:
        while (rows := bridge.run_sync(next_chunk)) is not None:
            yield from rows
            _let_go(rows)  # not held while the next chunk is asked for (and read)
    finally:
        _close(stream)


#: Whether :func:`_let_go` may read reference counts: exact on CPython with the GIL before
#: 3.14 (from 3.14 the interpreter may skip the count of a reference it borrows).
_EXACT_REFCOUNTS = (
    sys.implementation.name == "cpython"
    and sys.version_info < (3, 14)
    and getattr(sys, "_is_gil_enabled", lambda: True)()
)


def _let_go(chunk: list[Any]) -> None:
    """Empty ``chunk``, a chunk the loop is done with, freeing now the instances that
    nothing else holds, instead of at the next full garbage collection. The list itself is
    emptied, so what else still refers to it (the chunk's run, in cycles of its own until
    a collection) no longer holds its instances.

    Each to-many cache Django fills is a queryset whose ``_hints`` hold its instance, so
    an instance with prefetched to-many relations is in a reference cycle and outlives
    the loop's last reference until the collector's oldest generation is collected
    (chunks live long enough to be promoted there): a stream would hold chunks the loop
    let go beside the ones it works on. An instance is freed here only when the reference
    counts prove that nothing but the chunk and those hints hold it (no weak reference
    either) and that its ``__dict__``, its prefetch cache, the querysets in it and their
    hints are held only along that cycle: nothing can reach it any more, so removing the
    instance from its querysets' hints (which frees all of them) is seen by no one. Any
    other instance (the loop kept it, or a queryset, a manager or its caches; a reverse
    relation's objects point back to it; a weak reference) is left untouched, for the
    collector, as before.
    """
    if not _EXACT_REFCOUNTS:
        chunk.clear()
        return
    count = sys.getrefcount
    weak_count = weakref.getweakrefcount
    probe = object()
    one = count(probe)  # an object held by one local variable (what count() adds included)
    del probe
    while chunk:
        instance = chunk.pop()
        state = getattr(instance, "__dict__", None)
        cache = state.get("_prefetched_objects_cache") if state is not None else None
        if type(cache) is not dict or count(cache) != one + 1 or count(state) != one + 1:
            continue  # held by its instance (or __dict__) and this variable: nothing else
        cycle = 0  # querysets whose hints hold the instance
        for queryset in cache.values():
            hints = getattr(queryset, "_hints", None)
            if (
                count(queryset) != one + 1
                or type(hints) is not dict
                or count(hints) != one + 1
                or weak_count(queryset)
            ):
                break
            if hints.get("instance") is instance:
                cycle += 1
        else:
            if cycle and count(instance) == one + cycle and not weak_count(instance):
                for queryset in cache.values():
                    hints = queryset._hints
                    if hints.get("instance") is instance:
                        del hints["instance"]
                del hints, queryset
        # Freed here, with its caches, when the cycle was its last holder.


def _close(stream: Stream) -> None:
    """Close ``stream`` and wait for it, or, where this thread runs an event loop (a
    garbage collection there finalised the generator), only start closing it."""
    try:
        bridge.run_sync(stream.aclose)
    except SynchronousOnlyOperation:
        bridge.start_soon(stream.aclose)


def _streamable(queryset: QuerySet[Any], caller: CallerContext) -> bool:
    """Whether the engine reads the rows itself (with read-ahead)."""
    return engine_supports(queryset.db) and engine_root(queryset) and not caller.in_atomic()


def _chunks(objs: Iterable[M], size: int) -> Iterator[list[M]]:
    chunk: list[M] = []
    for obj in objs:
        chunk.append(obj)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _django_chunks_async(queryset: QuerySet[M], size: int) -> AsyncIterator[list[M]]:
    """Django's own ``aiterator()`` rows in lists of ``size`` (on the caller's connection)."""
    chunk: list[M] = []
    async for obj in queryset.aiterator(size):
        chunk.append(obj)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
