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
further hooks are in place (:func:`_apply_read_hooks`): the to-one descriptors report
each read (:func:`.events.emit_read`), and Django's ``prefetch_one_level`` each level it
filled (:func:`.events.emit_filled`); a related manager's ``get_queryset()`` reports
reads of its prefetched result. With nobody watching, the descriptors are exactly as
without the read hooks: a plain attribute read costs nothing more.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any
from weakref import ref as weak_ref

from django.apps import apps
from django.core.signals import setting_changed
from django.db.models import Model, QuerySet
from django.db.models import query as django_query
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields import related_descriptors
from django.db.models.query import ModelIterable
from django.db.models.query_utils import DeferredAttribute

from .. import _compat
from . import events
from .modes import AUTO, Peers, PrefetchMode, attribute_name, default_mode, state_mode

__all__ = [
    "auto_enabled",
    "ensure_installed",
    "reads_watched",
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
            _to_one_get(_forward_has_value),
        )
        _patch(
            related_descriptors.ReverseOneToOneDescriptor,
            "__get__",
            _to_one_get(_reverse_has_value),
        )
        if apps.is_installed("django.contrib.contenttypes"):
            from django.contrib.contenttypes.fields import GenericForeignKey

            _patch(GenericForeignKey, "__get__", _to_one_get(_generic_has_value))
        _reapply_read_hooks()  # the report's read hooks stay outermost
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

            _patch(fetch_modes.FetchOne, "fetch", _django_fetch(peers=False))
            _patch(fetch_modes.FetchPeers, "fetch", _django_fetch(peers=True))
        _reapply_read_hooks()
        _installed = True
        _read_auto_setting()
        setting_changed.connect(_read_auto_setting, dispatch_uid="async_prefetch.auto")


def uninstall() -> None:
    """Restore every function the hooks replaced (tests)."""
    global _installed, _to_one_installed
    with _lock:
        _remove_read_hooks()
        while _patched:
            owner, name, original = _patched.pop()
            setattr(owner, name, original)
        if _watchers:
            _apply_read_hooks()  # an open report keeps seeing reads
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
        cache = instance.__dict__.get("_prefetched_objects_cache")
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


# -- Django 5.2: to-one descriptors call the mode -----------------------------------------


def _to_one_get(has_value: Callable[[Any, Model], bool]) -> Callable[[Any], Any]:
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


def _forward_has_value(descriptor: Any, instance: Model) -> bool:
    return None not in descriptor.field.get_local_related_value(instance)


def _reverse_has_value(descriptor: Any, instance: Model) -> bool:
    return instance.pk is not None


def _generic_has_value(descriptor: Any, instance: Model) -> bool:
    ct_field = descriptor.model._meta.get_field(descriptor.ct_field)
    return getattr(instance, ct_field.attname, None) is not None


# -- Django 6.1: Django's own fetch modes report lazy loads -------------------------------


def _django_fetch(*, peers: bool) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def fetch(self: Any, fetcher: Any, instance: Model) -> None:
            if events.has_listeners() and not isinstance(fetcher, DeferredAttribute):
                name = attribute_name(type(instance), fetcher)
                if name is not None:
                    count = 1
                    if peers:
                        refs = getattr(instance._state, "peers", ())
                        count = max(1, sum(1 for ref in refs if ref() is not None))
                    events.emit(events.LazyLoad(instance, name, None, None, count, False))
            original(self, fetcher, instance)

        return fetch

    return make


# -- reads and fills of prefetch caches, while someone watches ----------------------------

_watchers = 0
_read_patched: list[tuple[Any, str, Any, Any]] = []  # owner, name, below, ours
#: Code that reads relations to prefetch them (Django's and the engine's walks): not
#: the application reading what was prefetched.
_walk_codes: frozenset[Any] = frozenset()


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
            _apply_read_hooks()
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
                _remove_read_hooks()
        unsubscribe()

    return unwatch


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


def _apply_read_hooks() -> None:
    """Wrap the current code of each read target (under ``_lock``)."""
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


def _remove_read_hooks() -> None:
    """Put back what each read hook wrapped, where it is still in place (under ``_lock``)."""
    while _read_patched:
        owner, name, below, ours = _read_patched.pop()
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if current is ours:
            setattr(owner, name, below)


def _reapply_read_hooks() -> None:
    """Keep the read hooks outermost after other patches (under ``_lock``)."""
    if _read_patched:
        _remove_read_hooks()
        _apply_read_hooks()


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
