"""Structural signatures of fetched objects: what the demo and the bench compare.

:func:`signature` turns root objects and the relation paths they were fetched with into
nested primary keys, reading only the instances' caches; :func:`describe_difference` says
where two signatures first differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

from django.db import connections
from django.db.models import Model
from django.db.models.manager import BaseManager

__all__ = ["LazyQueryError", "Node", "describe_difference", "no_queries", "signature"]

Node: TypeAlias = tuple[Any, tuple[tuple[str, tuple[Any, ...]], ...]]
"""One object in a signature: ``(pk, ((relation, (child nodes...)), ...))``."""


class LazyQueryError(AssertionError):
    """A relation the signature reads was not prefetched: reading it sent a query."""


@contextlib.contextmanager
def no_queries() -> Iterator[None]:
    """Make every query on this thread's connections raise :class:`LazyQueryError`."""

    def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        raise LazyQueryError(f"relation not prefetched; reading it ran: {sql[:300]}")

    with contextlib.ExitStack() as stack:
        for conn in connections.all():
            stack.enter_context(conn.execute_wrapper(refuse))
        yield


def _related(obj: Any, name: str) -> list[Any]:
    value = getattr(obj, name)
    if value is None:
        return []
    if isinstance(value, Model):
        return [value]
    if isinstance(value, list):
        return value
    if isinstance(value, BaseManager):
        return list(value.all())
    raise TypeError(f"{type(obj).__name__}.{name} is a {type(value).__name__}, not a relation")


def _tree(paths: Sequence[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for part in path.split("__"):
            node = node.setdefault(part, {})
    return tree


def _node(obj: Any, tree: Mapping[str, Any], prefix: str, unordered: frozenset[str]) -> Node:
    relations = []
    for name, subtree in tree.items():
        path = prefix + name
        children = tuple(
            _node(child, subtree, path + "__", unordered) for child in _related(obj, name)
        )
        if path in unordered:
            children = tuple(sorted(children, key=repr))
        relations.append((name, children))
    return (obj.pk, tuple(relations))


def signature(
    roots: Sequence[Model], paths: Sequence[str], unordered: frozenset[str] = frozenset()
) -> list[Node]:
    """Primary keys of ``roots`` and, nested, of every object along ``paths``, in order.

    Reads only caches: a relation that was not prefetched raises :class:`LazyQueryError`
    instead of loading lazily (which would hide a missing cache).
    """
    tree = _tree(paths)
    with no_queries():
        return [_node(root, tree, "", unordered) for root in roots]


def describe_difference(expected: Sequence[Node], actual: Sequence[Node]) -> str:
    """A short, precise account of where two signatures first differ."""
    if len(expected) != len(actual):
        lines = [f"{len(expected)} roots expected, {len(actual)} fetched"]
    else:
        lines = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want == got:
            continue
        lines.append(f"first difference at root #{index} (pk {want[0]!r} / {got[0]!r}):")
        if want[0] == got[0]:
            for (name, want_children), (_, got_children) in zip(want[1], got[1], strict=True):
                if want_children != got_children:
                    lines.append(f"  {name}: expected {_short(want_children)}")
                    lines.append(f"  {name}: fetched  {_short(got_children)}")
        break
    return "\n".join(lines) or "signatures are equal"


def _short(value: object, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
