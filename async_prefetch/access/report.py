"""The N+1 report: lazy loads and prefetches never read, per block or per request.

``with prefetch_report() as report:`` records, for the code that runs in the block (in
its context: the thread or task that entered it, and what it starts with
``sync_to_async`` or ``asyncio`` tasks, which inherit the context):

- *lazy loads*: relations reached without a prefetch, grouped by model, relation and
  the code location of the access (the first frame outside Django, asgiref and this
  library, plus the template line when a template did it); a group whose loads fetched
  one instance at a time for at least ``threshold`` instances is an N+1;
- *prefetches never read*: levels that ``prefetch_related`` (Django's or the engine's)
  filled in the block, and that no code read afterwards in the block;
- the lookups to add (from the N+1s) and to remove (from the unread prefetches).

At the end of the block it is logged on the ``async_prefetch.report`` logger (a warning
when there is an N+1, info otherwise, nothing when the report is empty), and with
``raise_on_n_plus_one=True`` an N+1 raises :class:`NPlusOneError` (unless the block is
already raising). :mod:`.middleware` does the same per request.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.db.models.constants import LOOKUP_SEP

from . import events, sites
from .hooks import watch_caches
from .modes import mode_of
from .read_hooks import reads_watched

__all__ = [
    "LazyLoadGroup",
    "NPlusOneError",
    "PrefetchReport",
    "UnreadPrefetch",
    "prefetch_report",
]

logger = logging.getLogger("async_prefetch.report")

#: Instances a report remembers for the unread-prefetch check; beyond, levels filled
#: later are not checked (they are never reported as unread).
MAX_TRACKED_INSTANCES = 200_000


class NPlusOneError(Exception):
    """Raised at the end of a ``prefetch_report(raise_on_n_plus_one=True)`` block (or a
    request, with the middleware's ``RAISE`` setting) that loaded a relation one
    instance at a time. The message is the report; ``report`` is the report itself."""

    def __init__(self, report: PrefetchReport) -> None:
        super().__init__(report.describe())
        self.report = report


@dataclass
class LazyLoadGroup:
    """The lazy loads of one relation of one model from one code location.

    ``loads``: how many accesses loaded it (one query each when ``peers`` is 1);
    ``instances``: on how many distinct instances; ``peers``: the most instances one load
    fetched the relation for (more than 1: an auto-prefetch or Django's ``FETCH_PEERS``,
    one query for all of them); ``lookup``: the prefetch lookup that would have loaded it
    (a path from the roots of the engine call that built the instances, else the
    relation's name on ``model``); ``origin``: that engine call's site, when known.
    """

    model: str
    relation: str
    where: str | None
    lookup: str
    origin: str | None
    many: bool
    loads: int = 0
    instances: int = 0
    peers: int = 1
    _seen: dict[int, weakref.ref[Any]] = field(default_factory=dict, repr=False, compare=False)

    def is_n_plus_one(self, threshold: int) -> bool:
        """One instance at a time, for at least ``threshold`` instances."""
        return self.peers == 1 and self.instances >= threshold

    def suggestion(self) -> str:
        """Where to add :attr:`lookup`."""
        if self.origin is not None:
            return f'add "{self.lookup}" to the prefetch call at {self.origin}'
        how = "prefetch_related" if self.many else "select_related or prefetch_related"
        return f'add "{self.lookup}" ({how}) to the query that loads these {self.model} instances'


@dataclass
class UnreadPrefetch:
    """A prefetch level filled in the block that code never read: ``lookup`` (its path
    from the roots of the prefetch that filled it) on ``model`` instances, filled at
    ``where`` (the engine call's site, or the code that evaluated the queryset) for
    ``instances`` parents, over ``fills`` prefetches."""

    model: str
    lookup: str
    where: str | None
    instances: int = 0
    fills: int = 0


class PrefetchReport:
    """What one block or request loaded lazily and prefetched in vain.

    Filled while the block runs (from any thread or task in its context) and complete
    when it ends; :attr:`unread` and :attr:`lookups_to_remove` are computed at the end.
    """

    def __init__(
        self, *, name: str | None = None, threshold: int = 2, raise_on_n_plus_one: bool = False
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1.")
        self.name = name
        self.threshold = threshold
        self.raise_on_n_plus_one = raise_on_n_plus_one
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, str, str | None, str, str | None], LazyLoadGroup] = {}
        self._levels: dict[tuple[str, str, str | None], _Level] = {}
        self._tracked: dict[tuple[int, str], tuple[weakref.ref[Any], list[_Level]]] = {}
        self._unread: list[UnreadPrefetch] | None = None

    # -- results ----------------------------------------------------------------------

    @property
    def lazy_loads(self) -> list[LazyLoadGroup]:
        """Every group of lazy loads, the most loads first."""
        with self._lock:
            groups = list(self._groups.values())
        return sorted(groups, key=lambda g: (-g.loads, g.model, g.relation))

    @property
    def n_plus_one(self) -> list[LazyLoadGroup]:
        """The groups that loaded one instance at a time for ``threshold`` instances or more."""
        return [group for group in self.lazy_loads if group.is_n_plus_one(self.threshold)]

    @property
    def unread(self) -> list[UnreadPrefetch]:
        """The prefetch levels filled in the block and never read in it (only the
        shortest such path of a lookup: its deeper levels are unread as well), by site
        and lookup. Empty until the block ends."""
        return list(self._unread or ())

    @property
    def lookups_to_add(self) -> list[str]:
        """The lookups of the N+1 groups, without repeats."""
        return list(dict.fromkeys(group.lookup for group in self.n_plus_one))

    @property
    def lookups_to_remove(self) -> list[str]:
        """The lookups of the unread prefetches, without repeats."""
        return list(dict.fromkeys(unread.lookup for unread in self.unread))

    def __bool__(self) -> bool:
        return bool(self.n_plus_one or self._unread)

    def __repr__(self) -> str:
        return (
            f"<PrefetchReport {self.name or ''}: {len(self.n_plus_one)} N+1, "
            f"{len(self.unread)} unread prefetches>"
        )

    def describe(self) -> str:
        """The report as text, one finding a line."""
        n_plus_one = self.n_plus_one
        unread = self.unread
        title = f"prefetch report{f' ({self.name})' if self.name else ''}"
        lines = [f"{title}: {len(n_plus_one)} N+1, {len(unread)} prefetches never read"]
        for group in n_plus_one:
            kind = "to-many" if group.many else "to-one"
            lines.append(
                f"  N+1: {group.model}.{group.relation} ({kind}) loaded one instance at a "
                f"time for {group.instances} instances ({group.loads} queries) at "
                f"{group.where or 'an unknown location'}: {group.suggestion()}"
            )
        for level in unread:
            lines.append(
                f'  never read: "{level.lookup}" prefetched on {level.instances} '
                f"{level.model} instances at {level.where or 'an unknown location'}: "
                "remove it"
            )
        if n_plus_one:
            lines.append(f"  lookups to add: {', '.join(self.lookups_to_add)}")
        if unread:
            lines.append(f"  lookups to remove: {', '.join(self.lookups_to_remove)}")
        return "\n".join(lines)

    __str__ = describe

    # -- listeners (any thread in the block's context) ---------------------------------

    def _lazy_load(self, event: events.LazyLoad, where: str | None) -> None:
        instance = event.instance
        mode = mode_of(instance)
        origin = mode.where if mode is not None else None
        model = type(instance).__name__
        key = (model, event.name, where, event.lookup, origin)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = LazyLoadGroup(
                    model, event.name, where, event.lookup, origin, event.many
                )
            group.loads += 1
            group.peers = max(group.peers, event.peers)
            seen = group._seen.get(id(instance))
            if seen is None or seen() is not instance:  # ids of dead instances are reused
                group._seen[id(instance)] = weakref.ref(instance)
                group.instances += 1

    def _filled(self, instances: Sequence[Any], path: str, name: str, site: str | None) -> None:
        by_model: dict[type, list[Any]] = {}
        for obj in instances:
            by_model.setdefault(type(obj), []).append(obj)
        for model, objs in by_model.items():
            if not reads_watched(objs[0], name):
                continue
            where = site if site is not None else _fill_site(objs[0])
            key = (model.__name__, path, where)
            with self._lock:
                level = self._levels.get(key)
                if level is None:
                    level = self._levels[key] = _Level(model.__name__, path, where)
                level.fills += 1
                level.instances += len(objs)
                if len(self._tracked) + len(objs) > MAX_TRACKED_INSTANCES:
                    level.untracked = True
                    continue
                for obj in objs:
                    entry = self._tracked.get((id(obj), name))
                    if entry is None or entry[0]() is not obj:
                        self._tracked[(id(obj), name)] = (weakref.ref(obj), [level])
                    else:
                        entry[1].append(level)

    def _read(self, instance: Any, name: str) -> None:
        entry = self._tracked.get((id(instance), name))
        if entry is not None and entry[0]() is instance:
            for level in entry[1]:
                level.read = True

    def _finish(self) -> None:
        with self._lock:
            levels = list(self._levels.values())
            self._tracked.clear()
        unread_keys = {
            (level.model, level.path, level.where)
            for level in levels
            if not level.read and not level.untracked
        }
        unread = []
        for level in levels:
            if (level.model, level.path, level.where) not in unread_keys:
                continue
            parent = level.path.rpartition(LOOKUP_SEP)[0]
            if parent and any(key[1] == parent and key[2] == level.where for key in unread_keys):
                continue  # its parent level is unread: report the shorter lookup
            unread.append(
                UnreadPrefetch(level.model, level.path, level.where, level.instances, level.fills)
            )
        unread.sort(key=lambda u: (u.where or "", u.lookup, u.model))
        self._unread = unread


@dataclass(eq=False)
class _Level:
    model: str
    path: str
    where: str | None
    instances: int = 0
    fills: int = 0
    read: bool = False
    untracked: bool = False


# -- the active reports of a context ---------------------------------------------------

_active: ContextVar[tuple[PrefetchReport, ...]] = ContextVar("async_prefetch_reports", default=())
_open_lock = threading.Lock()
_open = 0
_unsubscribe: list[Any] = []


def _on_lazy_load(event: events.LazyLoad) -> None:
    reports = _active.get()
    if reports:
        where = sites.location()
        for report in reports:
            report._lazy_load(event, where)


class _CacheListener:
    def filled(self, instances: Sequence[Any], path: str, name: str, where: str | None) -> None:
        for report in _active.get():
            report._filled(instances, path, name, where)

    def read(self, instance: Any, name: str) -> None:
        for report in _active.get():
            report._read(instance, name)


def _listen() -> None:
    global _open
    with _open_lock:
        _open += 1
        if _open == 1:
            _unsubscribe.append(events.subscribe(_on_lazy_load))
            _unsubscribe.append(watch_caches(_CacheListener()))


def _unlisten() -> None:
    global _open
    with _open_lock:
        _open -= 1
        if _open == 0:
            while _unsubscribe:
                _unsubscribe.pop()()


@contextmanager
def prefetch_report(
    *,
    raise_on_n_plus_one: bool = False,
    threshold: int = 2,
    name: str | None = None,
    log: bool = True,
) -> Iterator[PrefetchReport]:
    """Record the lazy loads and unread prefetches of the code run in the block.

    ``threshold``: how many instances loaded one at a time make an N+1 (2, as
    django-zeal). ``raise_on_n_plus_one``: raise :class:`NPlusOneError` at the end of
    the block when there is one (not when the block raises). ``log``: log the report
    on ``async_prefetch.report`` at the end. ``name`` is shown in the report (the
    middleware gives the request's method and path). Reports nest: an inner block's
    events reach the outer report too.
    """
    report = PrefetchReport(name=name, threshold=threshold, raise_on_n_plus_one=raise_on_n_plus_one)
    _listen()
    token = _active.set((*_active.get(), report))
    failed = False
    try:
        yield report
    except BaseException:
        failed = True
        raise
    finally:
        _active.reset(token)
        _unlisten()
        report._finish()
        if log:
            _log(report)
    if raise_on_n_plus_one and not failed and report.n_plus_one:
        raise NPlusOneError(report)


def _log(report: PrefetchReport) -> None:
    if report.n_plus_one:
        level = logging.WARNING
    elif report:
        level = logging.INFO
    else:
        return
    if logger.isEnabledFor(level):
        logger.log(level, "%s", report.describe(), extra={"prefetch_report": report})


def _fill_site(instance: Any) -> str | None:
    """Where a prefetch level was filled: the engine call's site (from the instances'
    mode), else the application code running the prefetch."""
    mode = mode_of(instance)
    if mode is not None and mode.where is not None:
        return mode.where
    return sites.location()
