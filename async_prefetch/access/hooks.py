"""The only place that patches Django's descriptors and iterables for :mod:`.modes`.

Installed once, on first use of the engine or of :func:`~async_prefetch.autoprefetch`
(:func:`ensure_installed`), for the process; :func:`uninstall` restores Django's code.

On every supported Django:

- ``ReverseManyToOneDescriptor.__get__`` (reverse foreign keys, many-to-many, generic
  relations): the related manager of an instance with a
  :class:`~.modes.PrefetchMode` (or while someone listens to lazy loads) marks the plain
  queryset its ``get_queryset()`` returns; ``QuerySet._fetch_all`` lets the mode see the
  first evaluation of such a queryset (``list(book.pages.all())``), which auto-prefetch
  answers from the caches it fills for all peers. Any queryset derived from it
  (``.filter()``, ``.order_by()``) is a new query, not a lazy load of the relation.
- ``ModelIterable.__iter__``: inside ``autoprefetch()`` blocks (or with
  ``ASYNC_PREFETCH["AUTO"]``) the instances a queryset with Django's default mode
  builds get the auto mode and their peers.

On Django 5.2 only, the part of 6.1's fetch modes the modes need: ``QuerySet._clone``
keeps a queryset's ``_fetch_mode``; ``ModelIterable`` gives it and the peers to the
instances; the to-one descriptors (forward foreign key and one-to-one, reverse
one-to-one, generic foreign key) call the mode on a miss, before their own query.

On Django 6.1, Django's own ``FetchOne.fetch`` and ``FetchPeers.fetch`` report the lazy
load (:class:`~.events.LazyLoad`) while someone listens, as the 5.2 descriptors do.

While someone watches the caches (:func:`watch_caches`, the N+1 report), and only then,
further hooks are in place (:mod:`.read_hooks`): the to-one descriptors report
each read (:func:`.events.emit_read`), and Django's ``prefetch_one_level`` each level it
filled (:func:`.events.emit_filled`); a related manager's ``get_queryset()`` reports
reads of its prefetched result. With nobody watching, the descriptors are exactly as
without the read hooks: a plain attribute read costs nothing more.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any
from weakref import ref as weak_ref

from django.apps import apps
from django.core.signals import setting_changed
from django.db.models import Model, QuerySet
from django.db.models.fields import related_descriptors
from django.db.models.query import ModelIterable

from .. import _compat
from . import events, read_hooks, to_one
from .modes import AUTO, Peers, PrefetchMode, attribute_name, default_mode, state_mode

__all__ = [
    "auto_enabled",
    "ensure_installed",
    "uninstall",
    "watch_caches",
]

_lock = threading.RLock()  # _install() reads AUTO, which may install the to-one hooks
_patched: list[tuple[Any, str, Any]] = []
_installed = False

#: Set inside ``with autoprefetch():`` blocks.
auto_block: ContextVar[bool] = ContextVar("async_prefetch_auto_block", default=False)
#: ``ASYNC_PREFETCH["AUTO"]``: read when the hooks are installed, and again whenever
#: the setting changes (``override_settings``).
_auto_setting = False


def auto_enabled() -> bool:
    """True when querysets evaluated here should auto-prefetch (a block or the setting)."""
    return _auto_setting or auto_block.get()


def _read_auto_setting(**kwargs: Any) -> None:
    global _auto_setting
    if kwargs and kwargs.get("setting") != "ASYNC_PREFETCH":
        return
    from ..config import read_config

    config, _ = read_config()
    _auto_setting = config is not None and config.auto
    if _auto_setting:
        ensure_installed(to_one=True)


def ensure_installed(*, to_one: bool = False) -> None:
    """Install the hooks if they are not (cheap when they are); idempotent, thread-safe.

    ``to_one``: also Django 5.2's to-one descriptor hooks, which cost every read of a
    foreign key a Python call; they are installed only once something needs them (an
    instance with a mode, a report listening). Django 6.1 calls the modes itself.
    """
    if not _installed:
        _install()
    if to_one and not _to_one_installed and not _compat.HAS_FETCH_MODES:
        _install_to_one()


_to_one_installed = False


def _install_to_one() -> None:
    global _to_one_installed
    with _lock:
        if _to_one_installed:
            return
        _patch(
            related_descriptors.ForwardManyToOneDescriptor,
            "__get__",
            to_one.to_one_get(to_one.forward_has_value),
        )
        _patch(
            related_descriptors.ReverseOneToOneDescriptor,
            "__get__",
            to_one.to_one_get(to_one.reverse_has_value),
        )
        if apps.is_installed("django.contrib.contenttypes"):
            from django.contrib.contenttypes.fields import GenericForeignKey

            _patch(GenericForeignKey, "__get__", to_one.to_one_get(to_one.generic_has_value))
        read_hooks.reapply()  # the report's read hooks stay outermost
        _to_one_installed = True


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _patch(related_descriptors.ReverseManyToOneDescriptor, "__get__", _many_get)
        _patch(QuerySet, "_fetch_all", _fetch_all)
        _patch(ModelIterable, "__iter__", _model_iter)
        if not _compat.HAS_FETCH_MODES:
            _patch(QuerySet, "_clone", _clone)
        else:
            from django.db.models import fetch_modes

            _patch(fetch_modes.FetchOne, "fetch", to_one.django_fetch(peers=False))
            _patch(fetch_modes.FetchPeers, "fetch", to_one.django_fetch(peers=True))
        read_hooks.reapply()
        _installed = True
        _read_auto_setting()
        setting_changed.connect(_read_auto_setting, dispatch_uid="async_prefetch.auto")


def uninstall() -> None:
    """Restore every function the hooks replaced (tests)."""
    global _installed, _to_one_installed
    with _lock:
        read_hooks.remove()
        while _patched:
            owner, name, original = _patched.pop()
            setattr(owner, name, original)
        if _watchers:
            read_hooks.apply()  # an open report keeps seeing reads
        _installed = _to_one_installed = False


def _patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = owner.__dict__[name]
    replacement = make(original)
    functools.update_wrapper(replacement, original)
    setattr(owner, name, replacement)
    _patched.append((owner, name, original))


# -- to-many: the related manager's plain queryset -------------------------------------


def _many_get(original: Any) -> Any:
    def __get__(self: Any, instance: Model | None, cls: type | None = None) -> Any:
        manager = original(self, instance, cls)
        if instance is None:
            return manager
        mode = state_mode(instance._state)
        if not isinstance(mode, PrefetchMode):
            if not events.has_listeners():
                return manager
            mode = None
        relation = _relation_of(self, type(instance), type(manager), manager)
        if relation is None:
            return manager
        name, cache_name = relation
        cache = getattr(instance, "_prefetched_objects_cache", None)
        if cache is not None and cache_name in cache and not events.has_cache_listeners():
            return manager  # prefetched: nothing to watch (the common case, kept cheap)
        manager.get_queryset = functools.partial(_watched_queryset, manager, name, mode)
        return manager

    return __get__


#: (descriptor id, model, manager class) -> (lookup name, prefetch cache key), or None for
#: a manager that is not one of Django's own (it is not watched).
_relations: dict[tuple[int, type, type], tuple[str, str] | None] = {}


def _relation_of(
    descriptor: Any, model: type, manager_class: type, manager: Any
) -> tuple[str, str] | None:
    key = (id(descriptor), model, manager_class)
    try:
        return _relations[key]
    except KeyError:
        pass
    relation = None
    if _compat.is_djangos_related_manager(manager):
        name = attribute_name(model, descriptor)
        if name is not None:
            relation = (name, _compat.prefetch_cache_name(manager))
    _relations[key] = relation
    return relation


def _watched_queryset(manager: Any, name: str, mode: PrefetchMode | None) -> QuerySet[Any]:
    """The manager's ``get_queryset()``; when it is not the prefetched result, marked so
    that its first evaluation as is counts as a lazy load of relation ``name``; when it
    is, a read of the prefetched relation (for the cache listeners)."""
    queryset: QuerySet[Any] = type(manager).get_queryset(manager)
    if queryset._result_cache is None:
        # The instance weakly: the queryset may end up in that instance's own prefetch
        # cache (Django's prefetch_one_level uses get_queryset()), a cycle otherwise.
        marker = (weak_ref(manager.instance), type(manager), name, mode)
        queryset._lazy_relation = marker  # type: ignore[attr-defined]
    elif events.has_cache_listeners():
        events.emit_read(manager.instance, name)
    return queryset


def _fetch_all(original: Any) -> Any:
    def _fetch_all(self: QuerySet[Any]) -> None:
        if self._result_cache is None:
            watched = self.__dict__.pop("_lazy_relation", None)
            if watched is not None and _load_relation(self, *watched):
                return
        original(self)

    return _fetch_all


def _load_relation(
    queryset: Any,
    instance_ref: weakref.ref[Model],
    manager_class: type,
    name: str,
    mode: PrefetchMode | None,
) -> bool:
    """``queryset`` is the plain queryset of ``instance``'s related manager (of
    ``manager_class``) being evaluated: tell the mode (which may fill the caches of all
    peers, or refuse in an event loop). True when the result was then served from the
    instance's prefetch cache."""
    instance = instance_ref()
    if instance is None:  # the queryset outlived its instance: a plain query
        return False
    manager = manager_class(instance)
    if mode is None:
        if events.has_listeners():
            events.emit(events.LazyLoad(instance, name, None, None, 1, True))
        return False
    cache_name = _compat.prefetch_cache_name(manager)
    mode.on_miss(
        instance,
        name,
        many=True,
        missing=lambda peer: cache_name not in getattr(peer, "_prefetched_objects_cache", ()),
    )
    cached = type(manager).get_queryset(manager)
    if cached._result_cache is None:  # nobody to fetch with: Django's own query
        mode.adopt_queryset(queryset, name)
        return False
    queryset._result_cache = list(cached._result_cache)
    queryset._prefetch_done = True
    if events.has_cache_listeners():
        events.emit_read(instance, name)  # the caches auto-prefetch filled for the peers
    return True


# -- peers and modes of the instances a queryset builds ----------------------------------


def _model_iter(original: Any) -> Any:
    has_fetch_modes = _compat.HAS_FETCH_MODES

    def __iter__(self: Any) -> Iterator[Model]:
        mode = self.queryset.__dict__.get("_fetch_mode")
        if not isinstance(mode, PrefetchMode):
            if not (default_mode(mode) and auto_enabled()):
                yield from original(self)  # Django's own mode (or none, on 5.2)
                return
            mode = AUTO
        if not mode.track_peers:
            if has_fetch_modes and self.queryset._fetch_mode is mode:
                yield from original(self)  # Django 6.1 gives the instances the mode
                return
            for obj in original(self):
                state = obj._state
                if default_mode(state_mode(state)):
                    state.fetch_mode = mode
                yield obj
            return
        # Peers: the instances of the result, or of each iterator() chunk (built before
        # the chunk's first instance is handed out, so each one's peers are all there).
        size = self.chunk_size if self.chunked_fetch else None
        rows = original(self)
        while chunk := list(itertools.islice(rows, size)):
            peers = Peers(weak_ref(obj) for obj in chunk)
            for obj in chunk:
                state = obj._state
                current = state_mode(state)
                if current is mode or default_mode(current):
                    state.fetch_mode = mode
                    state.peers = peers
            yield from chunk
            if size is None:
                return

    return __iter__


def _clone(original: Any) -> Any:
    def _clone(self: QuerySet[Any]) -> QuerySet[Any]:
        clone = original(self)
        mode = self.__dict__.get("_fetch_mode")
        if mode is not None:
            clone._fetch_mode = mode
        return clone  # type: ignore[no-any-return]

    return _clone


# -- reads and fills of prefetch caches, while someone watches ----------------------------

_watchers = 0


def watch_caches(listener: events.CacheListener) -> Callable[[], None]:
    """Subscribe ``listener`` to cache fills and reads (:func:`.events.subscribe_caches`)
    and put the read hooks in place while at least one such watcher is subscribed.
    Returns the function that unsubscribes it (and removes the hooks after the last)."""
    global _watchers
    ensure_installed(to_one=True)  # 5.2: lazy loads of to-one relations reported too
    unsubscribe = events.subscribe_caches(listener)
    with _lock:
        _watchers += 1
        if _watchers == 1:
            read_hooks.apply()
    done = False

    def unwatch() -> None:
        global _watchers
        nonlocal done
        with _lock:
            if done:
                return
            done = True
            _watchers -= 1
            if _watchers == 0:
                read_hooks.remove()
        unsubscribe()

    return unwatch
