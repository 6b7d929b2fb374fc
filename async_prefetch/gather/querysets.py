"""``list(qs)`` for several querysets at once (:func:`agather`), or one (:func:`afetch_all`).

A plain model queryset (``ModelIterable``, no ``select_for_update()``, not evaluated yet,
Django's own ``_fetch_all()``) is a :class:`_ListCall`: ``list(qs)`` needs exactly its model
rows with its lookups, so that need is captured without running Django's method, and the
engine's answer is the result (one round, nothing replayed). Other querysets (``values()``,
``dates()``, an evaluated queryset whose lookups are pending, a subclass's own
``_fetch_all()``) run their ``_fetch_all()`` in rounds.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from django.db.models import QuerySet

from ..dispatch import engine_root
from .rounds import MethodCall, run_methods
from .script import RowsNeed, rows_need

__all__ = ["afetch_all", "agather"]

R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")


def _fetch_all(queryset: QuerySet[Any]) -> tuple[list[Any], bool]:
    """``list(queryset)``'s work: the result cache, filled and prefetched."""
    queryset._fetch_all()
    cache = queryset._result_cache
    assert cache is not None
    return cache, queryset._prefetch_done  # type: ignore[attr-defined]


class _ListCall(MethodCall):
    """``_fetch_all`` of a plain model queryset not evaluated yet: its one need, the
    queryset's rows with its lookups, is answered with the instances ``list(qs)`` gives,
    the lookups prefetched (see the module docstring)."""

    def __init__(self, queryset: QuerySet[Any]) -> None:
        super().__init__(queryset, _fetch_all)
        self._need: RowsNeed | None = None

    def attempt(self) -> Any:
        script = self.script
        script.position = 0
        if self._need is None:
            self._need = rows_need(self.queryset)
        instances: list[Any] = script.answer(self._need)
        # Django marks the prefetch done when it ran the queryset's lookups.
        done = self.queryset._prefetch_done or bool(self._need.lookups)  # type: ignore[attr-defined]
        return instances, done


def _call(queryset: QuerySet[Any]) -> MethodCall:
    kind = type(queryset)
    if (
        queryset._result_cache is None
        and kind._fetch_all is QuerySet._fetch_all
        and kind._prefetch_related_objects is QuerySet._prefetch_related_objects  # type: ignore[attr-defined]
        and engine_root(queryset)
    ):
        return _ListCall(queryset)
    return MethodCall(queryset, _fetch_all)  # a subclass's own _fetch_all runs, in rounds


async def afetch_all(queryset: QuerySet[Any]) -> list[Any]:
    """Fill ``queryset``'s result cache (and its prefetch caches) as Django's
    ``_fetch_all()`` does, the queries on the engine's pool; returns the cache."""
    if queryset._result_cache is not None and (
        queryset._prefetch_done or not queryset._prefetch_related_lookups  # type: ignore[attr-defined]
    ):
        cache: list[Any] = queryset._result_cache
        return cache
    ((cache, done),) = await run_methods([_call(queryset)])
    _store(queryset, cache, done)
    return cache


def _store(queryset: QuerySet[Any], cache: list[Any], done: bool) -> None:
    queryset._result_cache = cache
    queryset._prefetch_done = done  # type: ignore[attr-defined]


@overload
async def agather(
    q1: QuerySet[Any, R1], /, *, consistent: bool | None = ..., round_trips: int | None = ...
) -> tuple[list[R1]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    q3: QuerySet[Any, R3],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2], list[R3]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    q3: QuerySet[Any, R3],
    q4: QuerySet[Any, R4],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2], list[R3], list[R4]]: ...
@overload
async def agather(
    *querysets: QuerySet[Any, Any], consistent: bool | None = ..., round_trips: int | None = ...
) -> tuple[list[Any], ...]: ...


async def agather(
    *querysets: QuerySet[Any, Any], consistent: bool | None = None, round_trips: int | None = None
) -> tuple[list[Any], ...]:
    """Evaluate independent querysets at once: ``books, authors = await agather(
    Book.objects.prefetch_related("pages"), Author.objects.filter(...))``.

    Returns one list per queryset, what ``list(qs)`` returns for each, with the same
    prefetch caches; each queryset's result cache is filled as ``list(qs)`` fills it.
    The root queries run at once on the engine's pool, each queryset's
    ``prefetch_related()`` lookups as soon as its rows are in, all of them under one
    ``MAX_CONCURRENCY``. Django's errors that need no query are raised before any query
    is sent; otherwise the error is the one of the first failing queryset, in order (the
    others' queries are cancelled in the server or their results dropped, and no
    instance that existed before the call keeps a cache the call wrote). Inside
    ``atomic`` the queries run on the caller's connection, each stage's in one
    pipeline (one round trip). ``values()``
    and ``values_list()`` querysets run on the pool too (Django converts their rows).
    Querysets on another database vendor, and those whose evaluation needs Django's own
    connection (``select_for_update()``), are evaluated by Django on the caller's thread,
    in order.

    ``round_trips=1``: the queries of each stage (the root queries, then each level of
    prefetches) go in one pipeline on one pooled connection: one round trip per stage,
    the server running them one after another. ``consistent=True``: every query sees one
    database snapshot (one ``REPEATABLE READ`` transaction on that connection; default:
    the ``CONSISTENT`` setting); inside ``atomic`` it needs a ``REPEATABLE READ`` or
    ``SERIALIZABLE`` transaction (``TransactionManagementError``).

    Raises ``TypeError`` for an argument that is not a queryset, ``ValueError`` for a
    ``round_trips`` other than 1 or ``None``.
    """
    for queryset in querysets:
        if not isinstance(queryset, QuerySet):
            raise TypeError(
                f"agather() arguments must be querysets, not {type(queryset).__name__}."
            )
    unique = list({id(queryset): queryset for queryset in querysets}.values())
    todo = [
        queryset
        for queryset in unique
        if queryset._result_cache is None
        or (queryset._prefetch_related_lookups and not queryset._prefetch_done)  # type: ignore[attr-defined]
    ]
    if todo:
        results = await run_methods(
            [_call(queryset) for queryset in todo],
            check_first=len(todo) > 1,
            consistent=consistent,
            round_trips=round_trips,
        )
        for queryset, (cache, done) in zip(todo, results, strict=True):
            _store(queryset, cache, done)
    return tuple(list(queryset._result_cache or ()) for queryset in querysets)
