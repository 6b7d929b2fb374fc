"""Undo log of one prefetch call's own writes to instances it did not create.

The engine fills caches as it goes (later levels must see earlier levels' writes, as in
Django). Each write to an instance that existed before the call (a prefetch cache entry,
a fields cache entry, a ``to_attr`` attribute) is recorded as *(instance, mapping, key,
old value, new value)*. On failure or cancellation :meth:`Journal.rollback` puts back the
old value of every write whose new value is still in place, newest first, and leaves
alone what another call wrote since: calls that share instances (``asyncio.gather`` of
two prefetches, threads sharing cached objects) never undo each other's work.

Nothing is ever deleted that another call may hold. An instance keeps the (possibly
empty) ``_prefetched_objects_cache`` dict a call gave it, as after Django's own
``prefetch_related_objects``. A call that finds an instance's relation already fetched
and walks on, relying on it, pins that instance in every other call in flight: their
rollbacks leave its caches in place. What Django itself stores while a call reads an
instance (a walked ``cached_property``, a deferred field a key function loads) is data,
not a prefetch cache, and stays. Instances the call built itself are not recorded:
nobody else can reach them before they are linked into a recorded cache.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, ClassVar

from django.db.models import Model

_MISSING: Any = object()


class Journal:
    """The writes of one call, restorable on failure."""

    __slots__ = ("_created", "_owners", "_owners_seen", "_pinned", "_writes")

    #: Journals of calls in flight (between :meth:`open` and :meth:`close`), any thread.
    _in_flight: ClassVar[set[Journal]] = set()

    def __init__(self) -> None:
        self._created: set[int] = set()
        self._pinned: set[int] = set()  # ids of instances other calls rely on
        self._writes: list[tuple[int, Any, str, Any, Any]] = []
        # Ids of the instances written so far (of the first _owners_seen writes), made
        # only when another call walks on while this one is in flight.
        self._owners: set[int] = set()
        self._owners_seen = 0

    def open(self) -> None:
        """Mark the call in flight: other calls may pin its writes from now on."""
        Journal._in_flight.add(self)

    def close(self) -> None:
        """Mark the call finished (after success or :meth:`rollback`)."""
        Journal._in_flight.discard(self)

    def rely_on(self, objs: list[Any]) -> None:
        """This call walks on through caches of ``objs`` that it did not write: pin, in
        every other call in flight that wrote to some of them, those instances; its
        rollback then leaves them in place."""
        others = [j for j in list(Journal._in_flight) if j is not self and j._writes]
        if others:
            ids = set(map(id, objs))
            for journal in others:
                journal._pinned |= ids & journal._written()

    def _written(self) -> set[int]:
        """Ids of the instances this call has written to."""
        writes = self._writes
        if self._owners_seen < len(writes):
            self._owners.update(write[0] for write in writes[self._owners_seen :])
            self._owners_seen = len(writes)
        return self._owners

    def mark_created(self, instances: list[Model]) -> None:
        """Record instances built by this call: writes to them need no record."""
        self._created.update(map(id, instances))

    def set_item(self, owner: Any, mapping: MutableMapping[str, Any], key: str, value: Any) -> None:
        """``mapping[key] = value``, recorded unless this call built ``owner`` (the instance
        ``mapping`` belongs to)."""
        if id(owner) not in self._created:
            self._writes.append((id(owner), mapping, key, mapping.get(key, _MISSING), value))
        mapping[key] = value

    def set_items(
        self,
        owners: list[Any],
        mappings: list[MutableMapping[str, Any]],
        key: str,
        values: list[Any],
    ) -> None:
        """:meth:`set_item` for many instances at once (one key, one value each)."""
        created = self._created
        writes = self._writes
        for owner, mapping, value in zip(owners, mappings, values, strict=True):
            if (owner_id := id(owner)) not in created:
                writes.append((owner_id, mapping, key, mapping.get(key, _MISSING), value))
            mapping[key] = value

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, recorded unless this call built ``obj``.

        ``setattr`` may go through a descriptor or a property that changes other
        attributes or the fields cache too: every entry of ``obj.__dict__`` and of its
        fields cache that the assignment changed is recorded.
        """
        if id(obj) in self._created:
            setattr(obj, name, value)
            return
        attrs = getattr(obj, "__dict__", None)
        if type(attrs) is not dict:  # a class's: a read-only mappingproxy
            self._writes.append(
                (id(obj), _Attributes(obj), name, vars(obj).get(name, _MISSING), value)
            )
            setattr(obj, name, value)
            return
        state = attrs.get("_state")
        fields_cache = getattr(state, "fields_cache", None)
        mappings: list[dict[str, Any]] = [attrs]
        if type(fields_cache) is dict:
            mappings.append(fields_cache)
        before = [dict(mapping) for mapping in mappings]
        setattr(obj, name, value)
        for mapping, old in zip(mappings, before, strict=True):
            for key in old.keys() | mapping.keys():
                old_value, new_value = old.get(key, _MISSING), mapping.get(key, _MISSING)
                if old_value is not new_value:
                    self._writes.append((id(obj), mapping, key, old_value, new_value))

    def rollback(self) -> None:
        """Undo this call's writes that are still in place and not pinned, newest first."""
        writes, self._writes = self._writes, []
        pinned = self._pinned
        for owner_id, mapping, key, old, new in reversed(writes):
            if owner_id in pinned or mapping.get(key, _MISSING) is not new:
                continue  # relied on, or replaced since (another call, the caller's code)
            if old is _MISSING:
                del mapping[key]
            else:
                mapping[key] = old


class _Attributes:
    """An object's attributes as a mapping, for objects whose ``__dict__`` is read-only."""

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def get(self, key: str, default: Any) -> Any:
        return vars(self._obj).get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self._obj, key, value)

    def __delitem__(self, key: str) -> None:
        delattr(self._obj, key)
