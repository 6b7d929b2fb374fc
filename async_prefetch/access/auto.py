"""``autoprefetch``: instances that fetch a relation for all their peers on first access."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from django.db.models import Model, QuerySet

from .. import _compat
from .hooks import auto_block, auto_enabled, ensure_installed
from .learn import LearnedPlan
from .modes import Origin, PrefetchMode, default_mode
from .sites import call_site

__all__ = ["autoprefetch", "mode_for_call"]

M = TypeVar("M", bound=Model)


@overload
def autoprefetch(queryset: QuerySet[M], /) -> QuerySet[M]: ...
@overload
def autoprefetch() -> Any: ...  # a context manager
def autoprefetch(queryset: QuerySet[M] | None = None, /) -> Any:
    """``autoprefetch(qs)``: a copy of ``qs`` whose instances auto-prefetch;
    ``with autoprefetch():``: every queryset evaluated in the block does.

    An auto-prefetching instance that reaches a relation that was not loaded (a to-one
    relation, a generic foreign key, or the plain ``.all()`` of a to-many relation) has
    the engine fetch it at once for every live peer (the instances the same query, or
    the same ``iterator()`` chunk, produced) that lacks it, filling the caches
    ``prefetch_related`` fills; the instances fetched so are peers of each other and
    auto-prefetch too. One query per relation instead of one per instance, never more
    queries than without it; results as with an explicit ``prefetch_related``. A
    queryset whose fetch mode was chosen (Django 6.1's ``fetch_mode()``) keeps it.
    In an event loop the access raises (a query cannot run there) with the lookup to add.
    """
    ensure_installed(to_one=True)
    if queryset is None:
        return _block()
    mode = PrefetchMode(auto=True, origin=Origin(call_site(), function="prefetch_related"))
    if _compat.HAS_FETCH_MODES:
        return queryset.fetch_mode(mode)
    clone: QuerySet[M] = queryset._chain()  # type: ignore[attr-defined]
    clone._fetch_mode = mode  # type: ignore[attr-defined]
    return clone


@contextmanager
def _block() -> Iterator[None]:
    token = auto_block.set(True)
    try:
        yield
    finally:
        auto_block.reset(token)


def mode_for_call(
    current: Any, *, where: str | None, learned: LearnedPlan | None, function: str
) -> PrefetchMode | None:
    """The mode for the instances an engine call builds from a queryset whose mode is
    ``current``: the call's own (its site, its learned plan), auto-prefetching when the
    queryset or the context asks for it. ``None`` when the queryset chose another mode
    (Django 6.1's ``FETCH_PEERS``, ``FETCH_RAISE``): that one is kept."""
    if isinstance(current, PrefetchMode):
        auto = current.auto
    elif default_mode(current):
        auto = auto_enabled()
    else:
        return None
    return PrefetchMode(auto=auto, origin=Origin(where, learned, function))
