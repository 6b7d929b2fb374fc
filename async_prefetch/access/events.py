"""Lazy loads, as they happen: a small listener registry.

A *lazy load* is code reaching a relation that was not prefetched (``book.author``,
``list(book.pages.all())``), which then costs a query. The access hooks and the fetch
modes emit one :class:`LazyLoad` per such access, before its query runs; listeners (the
learned plans, the N+1 report) must be cheap and must not raise.

A second registry (:class:`CacheListener`) is told when prefetch caches are filled and
when code reads a relation: what the N+1 report needs to find prefetches never read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "CacheListener",
    "LazyLoad",
    "emit",
    "emit_filled",
    "emit_read",
    "has_cache_listeners",
    "has_listeners",
    "subscribe",
    "subscribe_caches",
]


def join_lookup(path: str | None, name: str) -> str:
    """The lookup reaching relation ``name`` of the instances at ``path`` (none: the roots)."""
    return f"{path}__{name}" if path else name


@dataclass(frozen=True, slots=True)
class LazyLoad:
    """One access to a relation that was not loaded.

    ``name`` is the attribute (a prefetch lookup step); ``path`` the lookup path from the
    roots of the call that built ``instance`` (``""`` for the roots themselves, ``None``
    when no engine call built it); ``where`` that call's site (``"views.py:42"``);
    ``peers`` how many instances the access loads the relation for (1: just this one,
    the N+1 pattern; more: auto-prefetch); ``many`` true for a to-many relation.
    """

    instance: Any
    name: str
    path: str | None
    where: str | None
    peers: int
    many: bool

    @property
    def lookup(self) -> str:
        """The prefetch lookup that would have loaded it with the call's roots."""
        return join_lookup(self.path, self.name)


L = TypeVar("L")


class _Registry(Generic[L]):
    """Listeners, swapped as a whole tuple under a lock: emitters iterate a snapshot."""

    __slots__ = ("listeners",)

    def __init__(self) -> None:
        self.listeners: tuple[L, ...] = ()

    def subscribe(self, listener: L) -> Callable[[], None]:
        with _lock:
            self.listeners = (*self.listeners, listener)

        def unsubscribe() -> None:
            with _lock:
                remaining = list(self.listeners)
                if listener in remaining:
                    remaining.remove(listener)
                self.listeners = tuple(remaining)

        return unsubscribe


_lock = threading.Lock()
_lazy_loads: _Registry[Callable[[LazyLoad], None]] = _Registry()


def subscribe(listener: Callable[[LazyLoad], None]) -> Callable[[], None]:
    """Call ``listener`` for every lazy load from now on; returns the unsubscribe function."""
    return _lazy_loads.subscribe(listener)


def has_listeners() -> bool:
    return bool(_lazy_loads.listeners)


def emit(event: LazyLoad) -> None:
    """Hand ``event`` to every listener (a snapshot of them: subscribing meanwhile is safe)."""
    for listener in _lazy_loads.listeners:
        listener(event)


# -- prefetched caches: filled and read (the N+1 report) --------------------------------


class CacheListener(Protocol):
    """Told when prefetch caches are filled and when code reads them.

    Called on the thread that fills or reads, in its context; must be cheap, thread-safe
    and must not raise.
    """

    def filled(self, instances: Sequence[Any], path: str, name: str, where: str | None) -> None:
        """``instances`` (a prefetch level's parents) got their cache of relation
        ``name`` filled; ``path`` is the level's lookup path from the call's roots;
        ``where`` the prefetch call's site when the filler knows it (``None``: the
        listener looks for it)."""

    def read(self, instance: Any, name: str) -> None:
        """Code read relation ``name`` of ``instance`` (a cached value or a lazy load)."""


_caches: _Registry[CacheListener] = _Registry()


def subscribe_caches(listener: CacheListener) -> Callable[[], None]:
    """Tell ``listener`` about cache fills and reads from now on; returns the
    unsubscribe function. Reads of to-one relations are only seen while
    :func:`async_prefetch.access.hooks.watch_caches` has installed its read hooks (it
    subscribes through this function)."""
    return _caches.subscribe(listener)


def has_cache_listeners() -> bool:
    return bool(_caches.listeners)


def emit_filled(
    instances: Sequence[Any], path: str, name: str, *, where: str | None = None
) -> None:
    """Report a filled prefetch level: ``instances`` got their cache of relation
    ``name`` (a lookup step, not a ``to_attr``) at lookup path ``path``. Called by
    Django's ``prefetch_one_level`` hook, and by the engine after it filled a level's
    caches, in the caller's context (the engine's tasks and threads inherit it);
    ``where`` is the prefetch call's site."""
    if instances:
        for listener in _caches.listeners:
            listener.filled(instances, path, name, where)


def emit_read(instance: Any, name: str) -> None:
    """Report a read of relation ``name`` on ``instance``."""
    for listener in _caches.listeners:
        listener.read(instance, name)
