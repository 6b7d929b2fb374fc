"""Where a call runs: which calls the engine takes, from which caller, on which thread.

Shared by the public entry points (:mod:`.api`, :mod:`.streaming`): the engine takes
PostgreSQL databases and plain model rows; it runs on its own event-loop thread, or,
when the caller holds a transaction, on the caller's side with the caller's connections.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeAlias, TypeVar

from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import Model, Prefetch, QuerySet
from django.db.models.query import ModelIterable

from .runtime import bridge
from .runtime.session import CallerContext
from .runtime.trace import current_trace

M = TypeVar("M", bound=Model)
Lookup: TypeAlias = "str | Prefetch[Any]"

_warned_aliases: set[str] = set()


class FallbackWarning(RuntimeWarning):
    """Issued once per database alias that the engine hands back to Django."""


def engine_supports(alias: str) -> bool:
    vendor = connections[alias].vendor
    if vendor == "postgresql":
        return True
    if alias not in _warned_aliases:
        _warned_aliases.add(alias)
        warnings.warn(
            f"async_prefetch: database {alias!r} is {vendor}, not PostgreSQL; falling back to "
            "Django's own prefetch_related_objects (serial, no pool).",
            FallbackWarning,
            stacklevel=3,
        )
    return False


def evaluate(queryset: QuerySet[M]) -> list[M]:
    return list(queryset)


def engine_root(queryset: QuerySet[Any]) -> bool:
    """True when the engine can fetch the queryset's own rows (plain model rows)."""
    query = queryset.query
    return queryset._iterable_class is ModelIterable and not query.select_for_update


async def capture_async_caller() -> CallerContext:
    """The connections of the thread Django runs this coroutine's sync code on.

    Under ``async_to_sync`` (Django's async test cases, sync middleware) that is the
    outer thread, whose connection may hold an ``atomic`` block.
    """
    return await sync_to_async(CallerContext.capture, thread_sensitive=True)(current_trace())


def split_lookups(
    queryset: QuerySet[M], lookups: tuple[Lookup, ...], using: str | None
) -> tuple[QuerySet[M], list[Lookup]]:
    if using is not None:
        queryset = queryset.using(using)
    all_lookups = [*queryset._prefetch_related_lookups, *lookups]  # type: ignore[attr-defined]
    queryset = queryset._chain()  # type: ignore[attr-defined]
    queryset._prefetch_related_lookups = ()  # type: ignore[attr-defined]
    return queryset, all_lookups


async def run_async(caller: CallerContext, func: Any, *args: Any) -> Any:
    """Await ``func(*args, caller)`` on the engine thread, or, when the caller is inside
    ``atomic``, here, on the caller's own connections (only they see its rows)."""
    if caller.in_atomic():
        return await func(*args, caller.on_caller_connections())
    return await bridge.run_async(func, *args, caller)


def run_sync(caller: CallerContext, func: Any, *args: Any) -> Any:
    """:func:`run_async` for synchronous callers.

    Inside ``atomic`` the run goes on the engine's loop too, while this thread, which
    owns the transaction, runs the run's queries (``bridge.run_serving``).
    """
    if caller.in_atomic():
        return bridge.run_serving(func, *args, caller.on_caller_connections())
    return bridge.run_sync(func, *args, caller)
