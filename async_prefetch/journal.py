"""Undo log for the instances a prefetch run did not create.

The engine writes caches as it goes (later levels must see earlier levels' writes,
as in Django). Instances that existed before the run are snapshotted the first time
the run touches them, so a failure or cancellation can put them back exactly as they
were: no half-filled caches.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model

_MISSING = object()


class Journal:
    """Snapshots of pre-existing instances, restorable on failure."""

    __slots__ = ("_created", "_snapshots")

    def __init__(self) -> None:
        self._created: set[int] = set()
        self._snapshots: dict[int, tuple[Any, dict[str, Any], Any, Any]] = {}

    def mark_created(self, instances: list[Model]) -> None:
        """Record instances built by this run: they need no snapshot."""
        self._created.update(map(id, instances))

    def touch(self, obj: Any) -> None:
        """Snapshot ``obj`` before its first write in this run, unless this run built it."""
        key = id(obj)
        if key in self._created or key in self._snapshots:
            return
        state = obj.__dict__
        fields_cache = getattr(state.get("_state"), "fields_cache", None)
        prefetched = state.get("_prefetched_objects_cache", _MISSING)
        self._snapshots[key] = (
            obj,
            dict(state),
            dict(fields_cache) if fields_cache is not None else _MISSING,
            dict(prefetched) if isinstance(prefetched, dict) else _MISSING,
        )

    def rollback(self) -> None:
        """Restore every snapshotted instance's ``__dict__``, fields cache and prefetch cache."""
        for obj, state, fields_cache, prefetched in self._snapshots.values():
            obj.__dict__.clear()
            obj.__dict__.update(state)
            if fields_cache is not _MISSING:
                obj._state.fields_cache = fields_cache
            if prefetched is not _MISSING:
                obj.__dict__["_prefetched_objects_cache"] = prefetched
        self._snapshots.clear()
