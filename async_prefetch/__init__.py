"""async_prefetch: Django's ``prefetch_related``, with independent queries run concurrently.

Public API: :func:`aprefetch`, :func:`aprefetch_related_objects`, :func:`prefetch`,
:func:`prefetch_related_objects`, :func:`install`, :func:`uninstall`, :func:`aclose`,
:class:`Memo`, :func:`autoprefetch`, :func:`forget_learned`, :func:`agather`,
:func:`prefetch_report`, the pool terminals (:class:`PoolQuerySet`, ...).
Importing this package does not import Django models; the functions load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "LazyLoadGroup",
    "LazyLoadInAsyncContext",
    "Memo",
    "NPlusOneError",
    "PoolManager",
    "PoolQuerySet",
    "PoolQuerySetMixin",
    "PrefetchReport",
    "PrefetchReportMiddleware",
    "RunTrace",
    "UnreadPrefetch",
    "aclose",
    "agather",
    "aiterator",
    "aprefetch",
    "aprefetch_related_objects",
    "autoprefetch",
    "forget_learned",
    "install",
    "install_pool_terminals",
    "iterator",
    "prefetch",
    "prefetch_related_objects",
    "prefetch_report",
    "tracing",
    "uninstall",
    "uninstall_pool_terminals",
]

if TYPE_CHECKING:
    from .access.auto import autoprefetch
    from .access.learn import forget_learned
    from .access.middleware import PrefetchReportMiddleware
    from .access.modes import LazyLoadInAsyncContext
    from .access.report import (
        LazyLoadGroup,
        NPlusOneError,
        PrefetchReport,
        UnreadPrefetch,
        prefetch_report,
    )
    from .api import (
        aclose,
        aprefetch,
        aprefetch_related_objects,
        prefetch,
        prefetch_related_objects,
    )
    from .dispatch import FallbackWarning
    from .gather import agather
    from .patching import install, uninstall
    from .runtime.memo import Memo
    from .runtime.trace import RunTrace, tracing
    from .streaming import aiterator, iterator
    from .terminals import (
        PoolManager,
        PoolQuerySet,
        PoolQuerySetMixin,
        install_pool_terminals,
        uninstall_pool_terminals,
    )

_LAZY = {
    "agather": "gather",
    "PoolQuerySet": "terminals",
    "PoolQuerySetMixin": "terminals",
    "PoolManager": "terminals",
    "install_pool_terminals": "terminals",
    "uninstall_pool_terminals": "terminals",
    "prefetch_report": "access.report",
    "PrefetchReport": "access.report",
    "NPlusOneError": "access.report",
    "LazyLoadGroup": "access.report",
    "UnreadPrefetch": "access.report",
    "PrefetchReportMiddleware": "access.middleware",
    "FallbackWarning": "dispatch",
    "aclose": "api",
    "aprefetch": "api",
    "aprefetch_related_objects": "api",
    "prefetch": "api",
    "prefetch_related_objects": "api",
    "install": "patching",
    "autoprefetch": "access.auto",
    "forget_learned": "access.learn",
    "LazyLoadInAsyncContext": "access.modes",
    "aiterator": "streaming",
    "iterator": "streaming",
    "uninstall": "patching",
    "Memo": "runtime.memo",
    "tracing": "runtime.trace",
    "RunTrace": "runtime.trace",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'async_prefetch' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"async_prefetch.{module}"), name)
