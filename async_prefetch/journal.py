"""Undo log for the instances a prefetch run did not create.

The engine writes caches as it goes (later levels must see earlier levels' writes,
as in Django). Instances that existed before the run are recorded the first time the
run touches them, so a failure or cancellation can put them back exactly as they
were: no half-filled caches.

Most levels only add entries to an instance's prefetch cache or fields cache, so only
those two dicts are copied (nothing when they are empty), with the number of attributes:
attributes a run adds otherwise (a walked ``cached_property``, a deferred field a key
function loads) come after those in ``__dict__`` and are removed. Levels that ``setattr``
(``to_attr``, descriptors) also record the instance's whole ``__dict__`` first.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from django.db.models import Model

_MISSING: Any = object()
_PREFETCHED = "_prefetched_objects_cache"

# A record: [instance, prefetch cache, its items, fields cache, its items, number of
# attributes, __dict__ copy].
_STATE = 6


def _items(cache: Any) -> Any:
    """What to put back into ``cache`` (a dict) on rollback; ``None`` if not a dict."""
    if not isinstance(cache, dict):
        return None
    return dict(cache) if cache else ()


class Journal:
    """Records of pre-existing instances, restorable on failure."""

    __slots__ = ("_created", "_records")

    def __init__(self) -> None:
        self._created: set[int] = set()
        self._records: dict[int, list[Any]] = {}

    def mark_created(self, instances: list[Model]) -> None:
        """Record instances built by this run: they need no record."""
        self._created.update(map(id, instances))

    def touch(self, obj: Any) -> list[Any] | None:
        """Record ``obj``'s prefetch cache and fields cache before this run first writes
        to them, unless this run built ``obj``. Returns the record (``None`` if built)."""
        key = id(obj)
        record = self._records.get(key)
        if record is not None or key in self._created:
            return record
        prefetched = getattr(obj, _PREFETCHED, _MISSING)
        fields_cache = getattr(getattr(obj, "_state", None), "fields_cache", None)
        attrs = getattr(obj, "__dict__", None)  # a class's is a read-only mappingproxy
        attributes = len(attrs) if type(attrs) is dict else None
        record = [
            obj,
            prefetched,
            _items(prefetched),
            fields_cache,
            _items(fields_cache),
            attributes,
            None,  # the __dict__ copy, made by touch_attributes()
        ]
        self._records[key] = record
        return record

    def touch_attributes(self, obj: Any) -> None:
        """:meth:`touch`, and record all of ``obj``'s attributes before this run first
        sets one of them."""
        record = self.touch(obj)
        if record is not None and record[_STATE] is None:
            record[_STATE] = dict(obj.__dict__)

    def rollback(self) -> None:
        """Put every recorded instance back as it was; the cache dicts keep their identity."""
        for record in self._records.values():
            obj, prefetched, prefetched_items, fields_cache, fields_items, attributes, state = (
                record
            )
            if state is not None:
                obj.__dict__.clear()
                obj.__dict__.update(state)
            if attributes is not None:  # attributes added since: in insertion order, last
                attrs = obj.__dict__
                for name in list(attrs)[attributes:]:
                    del attrs[name]
            if fields_items is not None:
                fields_cache.clear()
                fields_cache.update(fields_items)
                obj._state.fields_cache = fields_cache
            if prefetched is _MISSING:
                with suppress(AttributeError, TypeError):
                    delattr(obj, _PREFETCHED)
            else:
                if prefetched_items is not None:
                    prefetched.clear()
                    prefetched.update(prefetched_items)
                setattr(obj, _PREFETCHED, prefetched)
        self._records.clear()
