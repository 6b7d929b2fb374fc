"""The wrappers :mod:`.hooks` puts on Django's to-one descriptors (Django 5.2) and on
Django 6.1's own fetch modes, so that a lazy load of a to-one relation reaches the
instance's :class:`~.modes.PrefetchMode` or, without one, the lazy-load listeners.

Each ``*_get``/``*_fetch`` factory takes the code it wraps and returns the wrapper;
installing and removing them is :mod:`.hooks`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import Model
from django.db.models.query_utils import DeferredAttribute

from . import events
from .modes import PrefetchMode, attribute_name, live_peers

__all__ = [
    "django_fetch",
    "forward_has_value",
    "generic_has_value",
    "reverse_has_value",
    "to_one_get",
]


# -- Django 5.2: to-one descriptors call the mode -----------------------------------------


def to_one_get(has_value: Callable[[Any, Model], bool]) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def __get__(self: Any, instance: Model | None, cls: type | None = None) -> Any:
            if instance is None:
                return original(self, instance, cls)
            mode = getattr(instance._state, "fetch_mode", None)
            if (mode is None and not events.has_listeners()) or self.is_cached(instance):
                return original(self, instance, cls)
            if not has_value(self, instance):
                return original(self, instance, cls)
            name = attribute_name(type(instance), self)
            if name is None:
                return original(self, instance, cls)
            if not isinstance(mode, PrefetchMode):
                events.emit(events.LazyLoad(instance, name, None, None, 1, False))
                return original(self, instance, cls)
            mode.on_miss(instance, name, many=False, missing=lambda p: not self.is_cached(p))
            related = original(self, instance, cls)
            mode.adopt(related, name)
            return related

        return __get__

    return make


def forward_has_value(descriptor: Any, instance: Model) -> bool:
    return None not in descriptor.field.get_local_related_value(instance)


def reverse_has_value(descriptor: Any, instance: Model) -> bool:
    return instance.pk is not None


def generic_has_value(descriptor: Any, instance: Model) -> bool:
    ct_field = descriptor.model._meta.get_field(descriptor.ct_field)
    return getattr(instance, ct_field.attname, None) is not None


# -- Django 6.1: Django's own fetch modes report lazy loads -------------------------------


def django_fetch(*, peers: bool) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def fetch(self: Any, fetcher: Any, instance: Model) -> None:
            if events.has_listeners() and not isinstance(fetcher, DeferredAttribute):
                name = attribute_name(type(instance), fetcher)
                if name is not None:
                    count = len(live_peers(instance)) if peers else 1
                    events.emit(events.LazyLoad(instance, name, None, None, count, False))
            original(self, fetcher, instance)

        return fetch

    return make
