"""Learned plans: lookups a call site's code reached lazily, added to its next calls.

``aprefetch(qs, ..., learn=True)`` (or ``prefetch``) keys a :class:`LearnedPlan` by its
call site (file and line) or by ``key=``. When code later reaches a relation that was
not prefetched on an instance that call returned, wherever that happens (a template
rendered in a thread, a serializer), the mode of that instance notes the lookup path
here; the site's next calls add the noted lookups to their plan, so they run up front
and concurrently. Bounded (:data:`MAX_DEPTH` steps per lookup, :data:`MAX_LOOKUPS` per
site, :data:`MAX_SITES` sites); a lookup that does not resolve to relations of the
queryset's model, or that a lookup of the call already covers, is not added. Results
are unchanged: only caches are filled earlier. :func:`forget_learned` resets.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from django.db.models import Model, Prefetch
from django.db.models.constants import LOOKUP_SEP

__all__ = ["MAX_DEPTH", "MAX_LOOKUPS", "MAX_SITES", "LearnedPlan", "forget_learned", "plan_for"]

MAX_DEPTH = 4
"""Steps in one learned lookup (``a__b__c__d``)."""
MAX_LOOKUPS = 16
"""Learned lookups per call site."""
MAX_SITES = 1024
"""Call sites remembered (least recently used ones are forgotten)."""


class LearnedPlan:
    """The lookups one call site's code reached lazily, in first-seen order."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self._lookups: dict[str, None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<LearnedPlan {self.key!r}: {list(self._lookups)}>"

    @property
    def lookups(self) -> list[str]:
        return list(self._lookups)

    def note(self, lookup: str) -> None:
        """Remember ``lookup`` (a path of relation names from the call's roots)."""
        if lookup in self._lookups or lookup.count(LOOKUP_SEP) >= MAX_DEPTH:
            return
        with self._lock:
            if len(self._lookups) < MAX_LOOKUPS:
                self._lookups[lookup] = None

    def lookups_for(self, model: type[Model], explicit: Sequence[Any]) -> list[str]:
        """The learned lookups to add to a call on ``model`` instances whose own lookups
        are ``explicit``: those that resolve to relations and are not covered already."""
        covered = {_prefetch_to(lookup) for lookup in explicit}
        added = []
        for lookup in self.lookups:
            if lookup in covered or not _resolves(model, lookup):
                continue
            added.append(lookup)
        return added


def _prefetch_to(lookup: Any) -> str:
    return lookup.prefetch_to if isinstance(lookup, Prefetch) else str(lookup)


def _resolves(model: type[Model], lookup: str) -> bool:
    """True when every step of ``lookup`` is a relation descriptor of the model reached so
    far (a generic foreign key ends the walk: its model varies)."""
    from ..relations import is_relation, related_model_of

    current: type[Model] | None = model
    for step in lookup.split(LOOKUP_SEP):
        if current is None:
            return False
        descriptor = getattr(current, step, None)
        if descriptor is None or not is_relation(descriptor):
            return False
        current = related_model_of(descriptor)
    return True


_plans: OrderedDict[Hashable, LearnedPlan] = OrderedDict()
_plans_lock = threading.Lock()


def plan_for(key: Hashable) -> LearnedPlan:
    """The learned plan of call site ``key`` (made on first use)."""
    with _plans_lock:
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = LearnedPlan(key)
            while len(_plans) > MAX_SITES:
                _plans.popitem(last=False)
        else:
            _plans.move_to_end(key)
        return plan


def forget_learned(key: Hashable | None = None) -> None:
    """Forget what call site ``key`` learned (every site's, without ``key``)."""
    with _plans_lock:
        if key is None:
            _plans.clear()
        else:
            _plans.pop(key, None)
