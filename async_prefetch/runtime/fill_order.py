"""Parents' caches written in Django's order, whatever order their queries finish in.

Django runs sibling lookups one after another, so a parent's ``_prefetched_objects_cache``
(and its fields cache, and ``to_attr`` attributes) gain their keys in lookup order. The
engine's sibling queries finish in any order; a level whose rows are in holds its writes to
the parents while a sibling that Django runs before it has not written yet (its children
start meanwhile: they need only its objects). Dicts keep insertion order, and code can see
it (``list(obj._prefetched_objects_cache)``), so the order is Django's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from ..planning.plan import Level

Fill = Callable[[], Awaitable[None]]


class FillOrder:
    """The fills held back, per level, until their earlier siblings have written."""

    def __init__(self) -> None:
        self._held: dict[Level, Fill] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def held(self) -> Collection[Level]:
        """The levels whose fill waits."""
        return self._held.keys()

    def must_wait(self, level: Level, siblings: Iterable[Level], done: Mapping[Level, Any]) -> bool:
        """Whether a sibling Django runs before ``level`` is still to write: not ``done``
        (its objects not in), or done with its fill held."""
        return any(
            other is not level
            and other.order < level.order
            and (other not in done or other in self._held)
            for other in siblings
        )

    def hold(self, level: Level, fill: Fill) -> None:
        self._held[level] = fill

    def next_ready(
        self, siblings_of: Callable[[Level], Iterable[Level]], done: Mapping[Level, Any]
    ) -> Fill | None:
        """Take the first held fill (in Django's order) whose turn has come."""
        for level in sorted(self._held, key=lambda held: held.order):
            if not self.must_wait(level, siblings_of(level), done):
                return self._held.pop(level)
        return None
