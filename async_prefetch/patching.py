"""Route Django's own prefetching through the engine (``install()``) and back (``uninstall()``)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from django.db.models import QuerySet
from django.db.models import query as django_query

from . import api, streaming

#: Django's own ``QuerySet`` iterators, captured before ``install()`` replaces them.
_django_iterator = QuerySet.iterator
_django_aiterator = QuerySet.aiterator


def _iterator(self: QuerySet[Any], chunk_size: int | None = None) -> Any:
    """``QuerySet.iterator()``: with ``prefetch_related()`` lookups, a stream whose next
    chunk is read and prefetched while the loop works on this one; else Django's."""
    if not self._prefetch_related_lookups or chunk_size is None or chunk_size <= 0:  # type: ignore[attr-defined]
        return _django_iterator(self, chunk_size)  # Django's result, or Django's error
    return streaming.iterator(self, chunk_size=chunk_size)


def _aiterator(self: QuerySet[Any], chunk_size: int = streaming.DEFAULT_CHUNK_SIZE) -> Any:
    """``QuerySet.aiterator()``: as :func:`_iterator`, for ``async for``."""
    if not self._prefetch_related_lookups or chunk_size <= 0:  # type: ignore[attr-defined]
        return _django_aiterator(self, chunk_size)
    return streaming.aiterator(self, chunk_size=chunk_size)


_lock = threading.Lock()
_patched: list[tuple[Any, str, Any]] = []


def _targets() -> list[tuple[Any, str, Any, Any]]:
    """(module, name, Django's function, replacement) for every module holding a reference."""
    originals = {
        "prefetch_related_objects": (
            api.django_prefetch_related_objects,
            api.prefetch_related_objects,
        ),
        "aprefetch_related_objects": (
            django_query.aprefetch_related_objects,
            api.aprefetch_related_objects,
        ),
    }
    targets: list[tuple[Any, str, Any, Any]] = [
        (QuerySet, "iterator", _django_iterator, _iterator),
        (QuerySet, "aiterator", _django_aiterator, _aiterator),
    ]
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("django."):
            continue
        for name, (original, replacement) in originals.items():
            if getattr(module, name, None) is original:
                targets.append((module, name, original, replacement))
    return targets


def install(*, pool_terminals: bool = False) -> None:
    """Make every ``prefetch_related``, ``prefetch_related_objects`` and
    ``aprefetch_related_objects`` (and Django 6.1's fetch modes) run on the engine, and
    ``QuerySet.iterator()`` / ``aiterator()`` with prefetches stream (:mod:`.streaming`).
    ``pool_terminals``: also give every queryset the pool's ``aget``, ``acount``, ...
    (:func:`~async_prefetch.install_pool_terminals`). Idempotent; undone by
    :func:`uninstall`.
    """
    with _lock:
        if not _patched:
            for module, name, original, replacement in _targets():
                setattr(module, name, replacement)
                _patched.append((module, name, original))
    if pool_terminals:
        from .terminals import install_pool_terminals

        install_pool_terminals()


def uninstall() -> None:
    """Restore Django's own functions everywhere :func:`install` replaced them (and
    the pool terminals, if installed)."""
    from .terminals import uninstall_pool_terminals

    uninstall_pool_terminals()
    with _lock:
        while _patched:
            module, name, original = _patched.pop()
            setattr(module, name, original)


def is_installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return bool(_patched)
