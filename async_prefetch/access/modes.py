"""Fetch modes: what an instance does when code reaches a relation that was not loaded.

Django 6.1 keeps a fetch mode on each instance (``instance._state.fetch_mode``: fetch
the one instance's relation, fetch it for its *peers*, or raise) and calls
``mode.fetch(descriptor, instance)`` on a miss. :class:`PrefetchMode` is such a mode; the
engine puts one on every instance it builds, with the call it came from (its site, and
the lookup path from that call's roots). On Django 5.2, which has no fetch modes,
:mod:`.hooks` keeps the same attributes on ``_state`` and calls the same methods.

A miss on an instance with a :class:`PrefetchMode`:

1. is reported (:mod:`.events`) and, for a call with ``learn=True``, remembered for the
   call site's next call (:mod:`.learn`);
2. in an event loop, raises :class:`LazyLoadInAsyncContext` naming the lookup to add
   (Django would raise a bare ``SynchronousOnlyOperation`` from inside the query);
3. with ``auto`` (:func:`~async_prefetch.autoprefetch`), fetches the relation through the
   engine for every live peer still missing it, in one query per relation (as Django
   6.1's ``FETCH_PEERS`` does for to-one relations), else loads it for this instance
   alone, as Django does.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core.exceptions import SynchronousOnlyOperation
from django.db.models import Model
from django.db.models.base import ModelState
from django.db.models.query_utils import DeferredAttribute

from .. import _compat
from . import events

if TYPE_CHECKING:
    from .learn import LearnedPlan

_FetchModeBase: Any = object  # Django 5.2: the same protocol, called by .hooks only
FETCH_ONE: Any = None
if _compat.HAS_FETCH_MODES:
    from django.db.models import fetch_modes

    _FetchModeBase = fetch_modes.FetchMode
    FETCH_ONE = fetch_modes.FETCH_ONE

__all__ = [
    "AUTO",
    "DEFAULT_MODE",
    "LazyLoadInAsyncContext",
    "ModelStateWithMode",
    "Origin",
    "Peers",
    "PrefetchMode",
    "attribute_name",
    "default_mode",
    "live_peers",
    "mode_of",
    "state_mode",
]

#: The fetch mode of an instance nobody gave one: Django 6.1's ``FETCH_ONE``; ``None`` on 5.2.
DEFAULT_MODE: Any = FETCH_ONE


class LazyLoadInAsyncContext(SynchronousOnlyOperation):
    """A relation that was not prefetched was reached in an event loop, where a query
    cannot run. The message names the relation, the lookup to add and where."""


@dataclass(eq=False)
class Origin:
    """The call a group of instances came from: its site for messages (``where``,
    ``"views.py:42"``) and, with ``learn=True``, the plan it teaches."""

    where: str | None
    learned: LearnedPlan | None = None
    function: str = "aprefetch"


class PrefetchMode(_FetchModeBase):  # type: ignore[misc]
    """The fetch mode of the instances one engine call built at lookup path ``path``.

    Instances with the same mode object share its call and path, not their peers (those
    are the instances of one query: ``instance._state.peers``, weak references, as
    Django 6.1 keeps them). Thread-safe: the mode itself is immutable once made; its
    children are made on demand under a lock.
    """

    __slots__ = ("_children", "_lock", "auto", "origin", "path")

    auto: bool
    origin: Origin | None
    path: str

    def __init__(self, *, auto: bool, origin: Origin | None = None, path: str = "") -> None:
        self.auto = auto
        self.origin = origin
        self.path = path
        self._children: dict[str, PrefetchMode] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PrefetchMode auto={self.auto} path={self.path!r} where={self.where!r}>"

    def __reduce__(self) -> Any:
        # A pickled instance (a cache backend) keeps the behaviour, not the call.
        return (_restore_mode, (self.auto,))

    @property
    def track_peers(self) -> bool:  # Django 6.1 reads this to record peers
        return self.auto

    @property
    def where(self) -> str | None:
        """The site of the call that built the instances, when known."""
        return self.origin.where if self.origin is not None else None

    def lookup(self, name: str) -> str:
        """The lookup path from the call's roots to relation ``name`` of these instances."""
        return events.join_lookup(self.path, name)

    def child(self, name: str) -> PrefetchMode:
        """The mode of the instances reached from these through relation ``name``."""
        mode = self._children.get(name)
        if mode is None:
            with self._lock:
                mode = self._children.get(name)
                if mode is None:
                    mode = self._children[name] = PrefetchMode(
                        auto=self.auto, origin=self.origin, path=self.lookup(name)
                    )
        return mode

    # -- Django 6.1's protocol ------------------------------------------------------

    def fetch(self, fetcher: Any, instance: Model) -> None:
        """Load what ``fetcher`` (a to-one descriptor, or a deferred field) misses on
        ``instance``, as Django's fetch modes do; called by Django 6.1's descriptors."""
        if isinstance(fetcher, DeferredAttribute):
            self._fetch_field(fetcher, instance)
            return
        name = attribute_name(type(instance), fetcher)
        if name is None:  # a descriptor we cannot name: Django's own behaviour
            self._refuse_in_event_loop(instance, getattr(fetcher.field, "name", "?"))
            fetcher.fetch_one(instance)
            return
        self.on_miss(instance, name, many=False, missing=lambda peer: not _is_cached(fetcher, peer))
        if not _is_cached(fetcher, instance):
            fetcher.fetch_one(instance)
            self.adopt(_cached_value(fetcher, instance), name)

    def _fetch_field(self, fetcher: DeferredAttribute, instance: Model) -> None:
        self._refuse_in_event_loop(instance, fetcher.field.attname, field=True)
        peers = live_peers(instance) if self.auto else []
        if len(peers) > 1:
            fetcher.fetch_many(peers)
        else:
            fetcher.fetch_one(instance)

    # -- shared by Django 6.1's protocol and the 5.2 hooks ---------------------------

    def on_miss(
        self, instance: Model, name: str, *, many: bool, missing: Callable[[Model], bool]
    ) -> None:
        """``name`` was not loaded on ``instance`` and code reached it: report and learn
        it, refuse in an event loop, and with ``auto`` fetch it for the live peers that
        are ``missing`` it (the caches are then filled; the caller reads them, or loads
        just this instance's when no other peer lacks it)."""
        peers = (
            [peer for peer in live_peers(instance) if peer is instance or missing(peer)]
            if self.auto
            else []
        )
        origin = self.origin
        if origin is not None and origin.learned is not None:
            origin.learned.note(self.lookup(name))
        if events.has_listeners():
            events.emit(
                events.LazyLoad(instance, name, self.path, self.where, max(len(peers), 1), many)
            )
        self._refuse_in_event_loop(instance, name)
        if len(peers) > 1:
            from ..api import prefetch_related_objects  # the engine; imports Django's ORM

            prefetch_related_objects(peers, name)

    def adopt(self, related: Any, name: str) -> None:
        """Give an instance loaded lazily through ``name`` the mode of that path (Django
        6.1 gives it this instance's own mode; 5.2 none)."""
        if isinstance(related, Model):
            current = state_mode(related._state)
            if current is None or current is self or current is DEFAULT_MODE:
                related._state.fetch_mode = self.child(name)

    def adopt_queryset(self, queryset: Any, name: str) -> None:
        """Make the instances ``queryset`` (a lazily loaded to-many relation) builds
        carry the mode of that path."""
        queryset._fetch_mode = self.child(name)

    def _refuse_in_event_loop(self, instance: Model, name: str, *, field: bool = False) -> None:
        if not _in_event_loop():
            return
        model = type(instance).__name__
        if field:
            raise LazyLoadInAsyncContext(
                f"{model}.{name} is a deferred field and was not loaded; a query cannot "
                "run in an event loop: drop it from defer()/only(), or read it with "
                "await instance.arefresh_from_db(fields=[...])."
            )
        lookup = self.lookup(name)
        origin = self.origin
        if origin is not None and origin.where is not None:
            where = f"{origin.function}(...) at {origin.where}"
        elif origin is not None:
            where = f"{origin.function}(...)"
        else:
            where = "prefetch_related(...) or aprefetch(...)"
        raise LazyLoadInAsyncContext(
            f"{model}.{name} was not prefetched, and a query cannot run in an event "
            f'loop: add "{lookup}" to {where}.'
        )


class Peers(list):  # type: ignore[type-arg]
    """The weak references to the instances of one result (``_state.peers``). Pickles
    as an empty list: a weak reference cannot be pickled, and an unpickled instance has
    no peers (Django 6.1 drops them from a pickled state; 5.2 knows nothing of them)."""

    __slots__ = ()

    def __reduce__(self) -> Any:
        return (Peers, ())


def _restore_mode(auto: bool) -> Any:
    return AUTO if auto else DEFAULT_MODE


#: The mode of auto-prefetching instances built outside an engine call.
AUTO = PrefetchMode(auto=True)


def mode_of(instance: Model) -> PrefetchMode | None:
    """``instance``'s :class:`PrefetchMode`, if it has one (never creates Django's default)."""
    mode = state_mode(instance._state)
    return mode if isinstance(mode, PrefetchMode) else None


def state_mode(state: Any) -> Any:
    """The fetch mode kept on a ``ModelState``, ``None`` when none was set (never makes
    Django 6.1's default appear, as reading ``state.fetch_mode`` would)."""
    if _compat.HAS_FETCH_MODES:
        return state.__dict__.get("fetch_mode")
    return getattr(state, "fetch_mode", None)  # a ModelStateWithMode slot, or the dict


class ModelStateWithMode(ModelState):
    """Django 5.2: the state of the instances the engine builds with a fetch mode. The
    mode lives in a slot: a ModelState whose ``__dict__`` got keys in another order than
    Django's own states would lose CPython's shared-key storage (a dict object per
    instance, each tracked by the garbage collector). Auto-prefetching instances (opt-in)
    keep their peers in the dict."""

    __slots__ = ("fetch_mode",)


def default_mode(mode: Any) -> bool:
    """True for the mode of an instance nobody chose one for (Django's default)."""
    return mode is None or mode is DEFAULT_MODE


#: (model, id of descriptor) -> attribute name (descriptors are class attributes: they
#: live as long as their model, so their ids are stable).
_names: dict[tuple[type, int], str | None] = {}


def attribute_name(model: type, descriptor: Any) -> str | None:
    """The attribute of ``model`` (or a base) that holds ``descriptor``: the prefetch
    lookup step for it. ``None`` when none does."""
    key = (model, id(descriptor))
    try:
        return _names[key]
    except KeyError:
        pass
    name = None
    for klass in model.__mro__:
        for attr, value in vars(klass).items():
            if value is descriptor:
                name = attr
                break
        if name is not None:
            break
    _names[key] = name
    return name


def _is_cached(fetcher: Any, instance: Model) -> bool:
    is_cached = getattr(fetcher, "is_cached", None) or fetcher.field.is_cached
    return bool(is_cached(instance))


def _cached_value(fetcher: Any, instance: Model) -> Any:
    cache = getattr(fetcher, "related", None) or fetcher.field  # reverse one-to-one: the rel
    return cache.get_cached_value(instance, default=None)


def live_peers(instance: Model) -> list[Model]:
    """The instances of ``instance``'s query that are still alive (itself included)."""
    refs: Iterable[weakref.ref[Model]] = getattr(instance._state, "peers", ())
    peers = [peer for ref in refs if (peer := ref()) is not None]
    return peers if peers else [instance]


def _in_event_loop() -> bool:
    """True where Django's ``async_unsafe`` would refuse a query: a running event loop in
    this thread, unless ``DJANGO_ALLOW_ASYNC_UNSAFE`` is set."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return not os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
