"""async_prefetch: Django's ``prefetch_related``, with independent queries run concurrently.

Public API: :func:`aprefetch`, :func:`aprefetch_related_objects`, :func:`prefetch`,
:func:`prefetch_related_objects`, :func:`install`, :func:`uninstall`, :func:`aclose`,
:class:`Memo`.
Importing this package does not import Django models; the functions load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "Memo",
    "RunTrace",
    "aclose",
    "aiterator",
    "aprefetch",
    "aprefetch_related_objects",
    "install",
    "iterator",
    "prefetch",
    "prefetch_related_objects",
    "tracing",
    "uninstall",
]

if TYPE_CHECKING:
    from .api import (
        aclose,
        aprefetch,
        aprefetch_related_objects,
        prefetch,
        prefetch_related_objects,
    )
    from .dispatch import FallbackWarning
    from .patching import install, uninstall
    from .runtime.memo import Memo
    from .runtime.trace import RunTrace, tracing
    from .streaming import aiterator, iterator

_LAZY = {
    "FallbackWarning": "dispatch",
    "aclose": "api",
    "aprefetch": "api",
    "aprefetch_related_objects": "api",
    "prefetch": "api",
    "prefetch_related_objects": "api",
    "install": "patching",
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
