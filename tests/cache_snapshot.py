"""Deterministic, comparable snapshots of everything prefetching leaves on model instances.

:func:`snapshot` walks the graph that ``prefetch_related_objects`` (Django's or the engine's) left
behind on a list of instances, without ever touching the database: it reads ``__dict__``,
``_state`` and ``_prefetched_objects_cache`` directly. Per object it records

* model label, class, pk, ``_state.db`` / ``_state.adding`` (and, when Django 6.1 set them, the
  ``fetch_mode``'s class and the ``peers``, each named by its path in the graph);
* the value of every concrete field present in ``__dict__`` as ``type: repr`` (so that
  ``Decimal('1.50')`` differs from ``Decimal('1.5')`` and a UTC datetime from a Chicago one), or
  ``<deferred>`` when ``only()`` / ``defer()`` left it out;
* whether ``_prefetched_objects_cache`` exists, and for each of its keys the queryset's class,
  model, ``_prefetch_done``, database, SQL (what ``book.pages.all().filter(...)`` would build on)
  and the ordered list of cached instances (recursively);
* ``_state.fields_cache`` (name -> instance or ``None``, recursively), with ``is_parent`` when the
  cached object *is* the object the walk came from (reverse caches set by prefetching);
* ``to_attr`` attributes named by the lookups and any other non-field ``__dict__`` entry
  (annotations, ``_prefetch_related_val_*`` extra selects, computed ``cached_property`` values).

Each object is named by the path on which the walk (in a fixed order) first reached it, e.g.
``[0].authors[1].location``; an object reached a second time (a cycle, or the same Python object
under two parents) is written as ``{"ref": path}``, so object *identity* is part of the comparison,
not only equal primary keys. Paths rather than counters keep a failure diff local.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from django.db import models
from django.db.models import Prefetch, QuerySet

from async_prefetch._compat import HAS_FETCH_MODES

__all__ = [
    "assert_same_prefetch",
    "render",
    "snapshot",
    "to_attr_names",
]

Snap = dict[str, Any]
AnyPrefetch: TypeAlias = "Prefetch[Any, Any, Any]"

_MISSING = object()
_MAX_DIFF_LINES = 400


def to_attr_names(lookups: Iterable[str | AnyPrefetch]) -> set[str]:
    """Every ``to_attr`` named by ``lookups``, including nested querysets' own prefetches."""
    names: set[str] = set()
    for lookup in lookups:
        if isinstance(lookup, Prefetch):
            if lookup.to_attr:
                names.add(lookup.to_attr)
            queryset = lookup.queryset
            if queryset is not None:
                names |= to_attr_names(getattr(queryset, "_prefetch_related_lookups", ()))
    return names


def _value(value: Any) -> str:
    """A type-qualified repr: equal strings mean equal values *and* equal Python types."""
    return f"{type(value).__module__}.{type(value).__qualname__}: {value!r}"


def _sql(queryset: QuerySet[Any]) -> str:
    try:
        return str(queryset.query)
    except Exception as exc:  # EmptyResultSet and friends: still comparable
        return f"<{type(exc).__name__}: {exc}>"


class _Walker:
    def __init__(self, to_attrs: set[str]) -> None:
        self.to_attrs = to_attrs
        self.ids: dict[int, str] = {}
        # Keep every visited object alive so that ``id()`` values cannot be reused.
        self.keep: list[object] = []
        self.peers: list[Snap] = []

    def resolve_peers(self) -> None:
        """Name each peer by its path in the graph (identity), or by pk when not in it."""
        for snap in self.peers:
            snap["peers"] = [
                None
                if peer is None
                else self.ids.get(id(peer), f"<outside the graph> {_value(peer.pk)}")
                for peer in snap["peers"]
            ]

    def ref(self, obj: models.Model) -> Snap:
        return {"ref": self.ids[id(obj)], "model": obj._meta.label, "pk": _value(obj.pk)}

    def describe(self, value: Any, parent: object | None) -> str:
        """Name a referenced object without walking it: the parent, a visited path, or a pk."""
        if value is not None and value is parent:
            return "<the parent>"
        if isinstance(value, models.Model):
            where = self.ids.get(id(value), "<not visited yet>")
            return f"{value._meta.label} {_value(value.pk)} at {where}"
        return _value(value)

    def value(self, value: Any, parent: object | None, path: str) -> Any:
        """Snapshot an arbitrary attribute value (instances, lists of them, scalars)."""
        if value is None:
            return None
        if isinstance(value, models.Model):
            return self.node(value, parent, path)
        if isinstance(value, list | tuple):
            return [self.value(item, parent, f"{path}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, QuerySet):
            return self.queryset(value, parent, path)
        return _value(value)

    def queryset(self, queryset: QuerySet[Any], parent: object | None, path: str) -> Snap:
        result_cache = queryset._result_cache
        state: dict[str, Any] = vars(queryset)
        return {
            "queryset": f"{type(queryset).__module__}.{type(queryset).__qualname__}",
            "model": queryset.model._meta.label if queryset.model is not None else None,
            "prefetch_done": state.get("_prefetch_done"),
            "db": state.get("_db"),
            "sql": _sql(queryset),
            "prefetch_related_lookups": [
                lk.prefetch_to if isinstance(lk, Prefetch) else lk
                for lk in state.get("_prefetch_related_lookups", ())
            ],
            # What later ``.filter()`` / iteration of the cached queryset inherits.
            "details": {
                "iterable_class": getattr(state.get("_iterable_class"), "__qualname__", None),
                "sticky_filter": state.get("_sticky_filter"),
                "defer_next_filter": state.get("_defer_next_filter"),
                "hints": {
                    key: self.describe(value, parent)
                    for key, value in sorted(state.get("_hints", {}).items())
                },
                "known_related_objects": {
                    str(field): {
                        _value(key): self.describe(value, parent)
                        for key, value in sorted(objs.items(), key=lambda kv: repr(kv[0]))
                    }
                    for field, objs in sorted(
                        state.get("_known_related_objects", {}).items(), key=lambda kv: str(kv[0])
                    )
                },
            },
            "items": (
                None
                if result_cache is None
                else [
                    self.value(item, parent, f"{path}[{i}]") for i, item in enumerate(result_cache)
                ]
            ),
        }

    def node(self, obj: models.Model, parent: object | None, path: str) -> Snap:
        if id(obj) in self.ids:
            return self.ref(obj)
        self.ids[id(obj)] = path
        self.keep.append(obj)
        opts = obj._meta
        state = obj._state
        state_dict = vars(state)
        snap: Snap = {
            "id": self.ids[id(obj)],
            "model": opts.label,
            "class": type(obj).__qualname__,
            "pk": _value(obj.pk),
            "db": state.db,
            "adding": state.adding,
        }
        if "fetch_mode" in state_dict:  # Django 6.1; async_prefetch's modes on 5.2 too
            snap_mode = fetch_mode_name(state_dict["fetch_mode"])
            if snap_mode is not None:
                snap["fetch_mode"] = snap_mode
        if "peers" in state_dict:  # Django 6.1 FETCH_PEERS: resolved once the walk is done
            peers = [ref() if isinstance(ref, weakref.ref) else ref for ref in state_dict["peers"]]
            snap["peers"] = peers
            self.peers.append(snap)

        data = vars(obj)
        attnames = {f.attname for f in opts.concrete_fields}
        snap["fields"] = {
            attname: _value(data[attname]) if attname in data else "<deferred>"
            for attname in sorted(attnames)
        }

        cache = data.get("_prefetched_objects_cache", _MISSING)
        snap["has_prefetch_cache"] = cache is not _MISSING
        prefetched: Snap = {}
        if isinstance(cache, dict):
            for name in sorted(cache):
                entry = cache[name]
                prefetched[name] = (
                    self.queryset(entry, obj, f"{path}.{name}")
                    if isinstance(entry, QuerySet)
                    else {"not_a_queryset": self.value(entry, obj, f"{path}.{name}")}
                )
        elif cache is not _MISSING:
            prefetched["<not a dict>"] = _value(cache)
        snap["prefetched"] = prefetched
        # Insertion order, which code can see (list(obj._prefetched_objects_cache)): Django
        # writes sibling lookups' caches one after another, in lookup order.
        snap["cache_order"] = list(cache) if isinstance(cache, dict) else []

        fields_cache: Snap = {}
        for name, cached in sorted(state_dict.get("fields_cache", {}).items()):
            fields_cache[name] = {
                "is_parent": parent is not None and cached is parent,
                "value": self.value(cached, obj, f"{path}.{name}"),
            }
        snap["fields_cache"] = fields_cache
        snap["fields_cache_order"] = list(state_dict.get("fields_cache", {}))

        to_attr: Snap = {}
        attrs: Snap = {}
        for name in sorted(data):
            if name in attnames or name in ("_state", "_prefetched_objects_cache"):
                continue
            target = to_attr if name in self.to_attrs else attrs
            target[name] = self.value(data[name], obj, f"{path}.{name}")
        snap["to_attr"] = to_attr
        snap["to_attr_order"] = [name for name in data if name in self.to_attrs]
        snap["attrs"] = attrs
        return snap


def snapshot(instances: Sequence[models.Model], lookups: Iterable[str | AnyPrefetch] = ()) -> Snap:
    """Describe the prefetched graph hanging from ``instances`` (see the module docstring)."""
    walker = _Walker(to_attr_names(lookups))
    snap = {"instances": [walker.node(obj, None, f"[{i}]") for i, obj in enumerate(instances)]}
    walker.resolve_peers()
    return snap


def _referenced(value: Any, out: set[str]) -> set[str]:
    if isinstance(value, dict):
        if "ref" in value and len(value) == 3:
            out.add(value["ref"])
        for v in value.values():
            _referenced(v, out)
    elif isinstance(value, list):
        for v in value:
            _referenced(v, out)
    return out


class _Renderer:
    def __init__(self, snap: Snap) -> None:
        self.targets = _referenced(snap, set())
        self.out: list[str] = []

    def value(self, value: Any, key: str, indent: int) -> None:
        pad = "  " * indent
        if isinstance(value, dict) and "ref" in value and len(value) == 3:
            self.out.append(
                f"{pad}{key}-> same object as {value['ref']} ({value['model']} pk={value['pk']})"
            )
        elif isinstance(value, dict) and "id" in value and "fields" in value:
            self.node(value, key, indent)
        elif isinstance(value, dict) and "queryset" in value:
            self.out.append(
                f"{pad}{key}{value['queryset']} of {value['model']} "
                f"prefetch_done={value['prefetch_done']} db={value['db']}"
            )
            self.out.append(f"{pad}  sql: {value['sql']}")
            self.out.append(f"{pad}  prefetch_related_lookups: {value['prefetch_related_lookups']}")
            self.out.append(f"{pad}  details: {value['details']}")
            items = value["items"]
            if items is None:
                self.out.append(f"{pad}  (not evaluated)")
            else:
                self.out.append(f"{pad}  {len(items)} item(s):")
                for item in items:
                    self.value(item, "- ", indent + 2)
        elif isinstance(value, dict):
            self.out.append(f"{pad}{key}{{")
            for k, v in value.items():
                self.value(v, f"{k}: ", indent + 1)
            self.out.append(f"{pad}}}")
        elif isinstance(value, list):
            self.out.append(f"{pad}{key}[{len(value)} item(s)]")
            for item in value:
                self.value(item, "- ", indent + 1)
        else:
            self.out.append(f"{pad}{key}{value}")

    def node(self, node: Snap, key: str, indent: int) -> None:
        pad = "  " * indent
        label = f" (object {node['id']})" if node["id"] in self.targets else ""
        extra = "".join(f" {k}={node[k]}" for k in ("fetch_mode", "peers") if k in node)
        self.out.append(
            f"{pad}{key}{node['model']} pk={node['pk']}{label} class={node['class']} "
            f"db={node['db']} adding={node['adding']} "
            f"has_prefetch_cache={node['has_prefetch_cache']}{extra}"
        )
        for name, val in node["fields"].items():
            self.out.append(f"{pad}    field {name} = {val}")
        for order in ("cache_order", "fields_cache_order", "to_attr_order"):
            if len(node[order]) > 1:
                self.out.append(f"{pad}    {order} {node[order]}")
        for name, val in node["attrs"].items():
            self.value(val, f"attr {name} = ", indent + 2)
        for name, val in node["to_attr"].items():
            self.value(val, f"to_attr {name} = ", indent + 2)
        for name, entry in node["fields_cache"].items():
            flag = " (is the parent)" if entry["is_parent"] else ""
            self.value(entry["value"], f"fields_cache[{name!r}]{flag} = ", indent + 2)
        for name, entry in node["prefetched"].items():
            self.value(entry, f"prefetched[{name!r}] = ", indent + 2)


def render(snap: Snap) -> list[str]:
    """One line per fact, indented by depth: what the failure diff is made of."""
    renderer = _Renderer(snap)
    for node in snap["instances"]:
        renderer.value(node, "", 0)
    return renderer.out


def assert_same_prefetch(
    django_instances: Sequence[models.Model],
    engine_instances: Sequence[models.Model],
    lookups: Iterable[str | AnyPrefetch] = (),
    *,
    modes: bool = True,
) -> None:
    """Assert both lists carry the same prefetched graph; fail with a unified diff if not.

    ``modes=False`` compares an auto-prefetched graph with Django's explicit
    ``prefetch_related``: fetch modes, peers and the caches' key order left out (an
    auto-prefetched relation is fetched when first touched, in any order), and an empty
    prefetch cache counted as none (Django's loop gives one to every instance it walks;
    auto-prefetch only to the instances whose relation it fetched)."""
    lookups = list(lookups)
    expected = snapshot(django_instances, lookups)
    got = snapshot(engine_instances, lookups)
    if not modes:
        expected, got = _without_modes(expected), _without_modes(got)
    if expected == got:
        return
    diff = list(
        difflib.unified_diff(render(expected), render(got), "django", "engine", lineterm="", n=4)
    )
    if not diff:  # equal renderings of unequal structures: should not happen, say so
        diff = ["(snapshots differ but render identically)", repr(expected), repr(got)]
    if len(diff) > _MAX_DIFF_LINES:
        diff = [*diff[:_MAX_DIFF_LINES], f"... {len(diff) - _MAX_DIFF_LINES} more diff lines"]
    shown = ", ".join(lk.prefetch_to if isinstance(lk, Prefetch) else lk for lk in lookups)
    raise AssertionError(f"prefetched graphs differ for lookups [{shown}]:\n" + "\n".join(diff))


def fetch_mode_name(mode: Any) -> str | None:
    """The Django fetch mode ``mode`` behaves as, by class name (``None``: no mode, as
    on Django 5.2). The engine's :class:`~async_prefetch.access.modes.PrefetchMode` loads
    one instance's relation (``FetchOne``) or its peers' (``FetchPeers``) as Django's
    modes do; only its messages and learning differ."""
    from async_prefetch.access.modes import PrefetchMode

    if isinstance(mode, PrefetchMode):
        if mode.auto:
            return "FetchPeers"
        return "FetchOne" if HAS_FETCH_MODES else None
    return type(mode).__qualname__


# Left out of an auto-prefetched graph's comparison: its fetch modes and peers, and the order
# its caches gained their keys in (the order the relations were first touched).
_NOT_AUTO = ("fetch_mode", "peers", "cache_order", "fields_cache_order", "to_attr_order")


def _without_modes(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("has_prefetch_cache") and not value.get("prefetched"):
            value = {**value, "has_prefetch_cache": False}
        return {k: _without_modes(v) for k, v in value.items() if k not in _NOT_AUTO}
    if isinstance(value, list):
        return [_without_modes(v) for v in value]
    return value
