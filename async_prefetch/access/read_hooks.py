"""The read hooks of the N+1 report: in place only while someone watches the caches.

The to-one descriptors report each read (:func:`.events.emit_read`) and Django's
``prefetch_one_level`` each level it filled (:func:`.events.emit_filled`). :func:`apply`,
:func:`remove` and :func:`reapply` are called by :mod:`.hooks` under its patch lock;
with nobody watching, the descriptors are exactly as without these hooks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.db.models import Model
from django.db.models import query as django_query
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields import related_descriptors

from .. import _compat
from . import events
from .modes import attribute_name

__all__ = ["apply", "reads_watched", "reapply", "remove"]

_read_patched: list[tuple[Any, str, Any, Any]] = []  # owner, name, below, ours
#: Code that reads relations to prefetch them (Django's and the engine's walks): not
#: the application reading what was prefetched.
_walk_codes: frozenset[Any] = frozenset()


def _read_targets() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    targets: list[tuple[Any, str, Callable[[Any], Any]]] = [
        (related_descriptors.ForwardManyToOneDescriptor, "__get__", _read_get),
        (related_descriptors.ReverseOneToOneDescriptor, "__get__", _read_get),
        (django_query, "prefetch_one_level", _filled_level),
    ]
    generic = _generic_descriptor_class()
    if generic is not None:
        targets.append((generic, "__get__", _read_get))
    return targets


def _generic_descriptor_class() -> type | None:
    if not apps.is_installed("django.contrib.contenttypes"):
        return None
    from django.contrib.contenttypes import fields

    return getattr(fields, "GenericForeignKeyDescriptor", fields.GenericForeignKey)


def apply() -> None:
    """Wrap the current code of each read target (under the hooks' patch lock)."""
    global _walk_codes
    if _read_patched:
        return
    from ..hydration import caches  # the engine's walk (imported late: import cycles)

    _walk_codes = frozenset(
        {
            django_query.prefetch_one_level.__code__,
            _django_prefetch_related_objects.__code__,
            django_query.get_prefetcher.__code__,
            caches.traverse.__code__,
        }
    )
    for owner, name, make in _read_targets():
        below = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        ours = make(below)
        functools.update_wrapper(ours, below)
        setattr(owner, name, ours)
        _read_patched.append((owner, name, below, ours))


def remove() -> None:
    """Put back what each read hook wrapped, where it is still in place (under the patch lock)."""
    while _read_patched:
        owner, name, below, ours = _read_patched.pop()
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if current is ours:
            setattr(owner, name, below)


def reapply() -> None:
    """Keep the read hooks outermost after other patches (under the patch lock)."""
    if _read_patched:
        remove()
        apply()


#: Django's own, whatever ``install()`` later puts in ``django.db.models.query``.
_django_prefetch_related_objects = django_query.prefetch_related_objects


def _read_get(original: Any) -> Any:
    def __get__(self: Any, instance: Model | None, cls: type | None = None) -> Any:
        if instance is None:
            return original(self, instance, cls)
        try:
            return original(self, instance, cls)
        finally:
            if sys._getframe(1).f_code not in _walk_codes:
                name = attribute_name(type(instance), self)
                if name is not None:
                    events.emit_read(instance, name)

    return __get__


def _filled_level(original: Any) -> Any:
    def prefetch_one_level(instances: Any, prefetcher: Any, lookup: Any, level: int) -> Any:
        result = original(instances, prefetcher, lookup, level)
        if events.has_cache_listeners() and not lookup.get_current_to_attr(level)[1]:
            path = LOOKUP_SEP.join(lookup.prefetch_to.split(LOOKUP_SEP)[: level + 1])
            name = lookup.prefetch_through.split(LOOKUP_SEP)[level]
            events.emit_filled(instances, path, name)
        return result

    return prefetch_one_level


_reads_watched: dict[tuple[type, str], bool] = {}


def reads_watched(instance: Model, name: str) -> bool:
    """True when reads of relation ``name`` on instances like ``instance`` reach the
    cache listeners: a to-one relation (forward, reverse one-to-one, generic foreign
    key) or Django's own related manager; not a ``to_attr`` attribute, a property or a
    third-party manager."""
    key = (type(instance), name)
    known = _reads_watched.get(key)
    if known is None:
        descriptor = getattr(type(instance), name, None)
        generic = _generic_descriptor_class()
        if isinstance(
            descriptor,
            (
                related_descriptors.ForwardManyToOneDescriptor,
                related_descriptors.ReverseOneToOneDescriptor,
            ),
        ) or (generic is not None and isinstance(descriptor, generic)):
            known = True
        elif isinstance(descriptor, related_descriptors.ReverseManyToOneDescriptor):
            known = _compat.is_djangos_related_manager(getattr(instance, name))
        else:
            known = False
        _reads_watched[key] = known
    return known
