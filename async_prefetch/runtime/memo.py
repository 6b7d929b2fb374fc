"""Memos: related instances of one model, kept across the runs of a session or of calls.

A :class:`Memo` is an identity map (primary key -> instance) with an LRU bound, or with
``all=True`` the whole table, loaded once. Which levels a memo serves, and how, is
:mod:`.memo_level`'s.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, TypeAlias

from django.db.models import Model, QuerySet

__all__ = ["Memo", "MemoSpec", "memos_by_model"]

MemoSpec: TypeAlias = "Memo | Iterable[Memo] | None"
"""What a call or stream accepts as ``memo=``: one memo, several (one per model) or none."""


class Memo:
    """Instances of ``model`` by primary key, shared by every run that is given the memo.

    ``size`` bounds the instances kept: the least recently used are dropped first (a
    run keeps the instances it is linking until it is done with them, whatever the
    bound). With ``all=True`` the first run that needs the memo loads every row of
    ``queryset`` (default: the model's default manager) in one query; no instance is
    dropped, no further query is made for the model, and a key not loaded (a row added
    later, or one ``queryset`` excludes) is treated as a row that does not exist.

    ``queryset`` is what missing instances are fetched from (``select_related()``,
    ``only()``, its own ``prefetch_related()`` lookups, which run on the instances it
    fetches); by default the model's base manager, as Django's forward relations use.
    Rows it excludes are not found: a foreign key to one is ``None``, as for a dangling
    key in Django, and a many-to-many relation leaves it out.

    A memo serves one database: runs on another database do not consult it. Its
    methods may be called from several threads (each holds an internal lock briefly).
    """

    def __init__(
        self,
        model: type[Model],
        *,
        size: int = 10_000,
        all: bool = False,
        queryset: QuerySet[Any] | None = None,
    ) -> None:
        if not (isinstance(model, type) and issubclass(model, Model)):
            raise TypeError(f"Memo() needs a model class, not {model!r}.")
        if size < 1:
            raise ValueError("A memo's size must be at least 1.")
        if queryset is not None and queryset.model is not model:
            raise ValueError(
                f"A memo of {model.__name__} needs a queryset of {model.__name__}, "
                f"not of {queryset.model.__name__}."
            )
        if queryset is not None and queryset.query.is_sliced:
            raise ValueError("A memo's queryset cannot be sliced: it is filtered by key.")
        self.model = model
        self.size = size
        self.all = all
        self._queryset = queryset
        self._instances: OrderedDict[Hashable, Model] = OrderedDict()
        self._lock = threading.Lock()
        self._loaded = False
        self._alias: str | None = None

    def __repr__(self) -> str:
        bound = "all" if self.all else f"size={self.size}"
        return f"<Memo {self.model.__name__} {bound}: {len(self)} held>"

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, pk: object) -> bool:
        return pk in self._instances

    @property
    def loaded(self) -> bool:
        """True once an ``all=True`` memo holds the whole table."""
        return self._loaded

    def get(self, pk: Hashable) -> Model | None:
        """The instance held for ``pk`` (now the most recently used), or ``None``."""
        return self.get_many([pk]).get(pk)

    def get_many(self, pks: Iterable[Hashable]) -> dict[Hashable, Model]:
        """The instances held for ``pks``, by key; each becomes the most recently used."""
        found: dict[Hashable, Model] = {}
        with self._lock:
            instances = self._instances
            for pk in pks:
                instance = instances.get(pk)
                if instance is not None:
                    found[pk] = instance
                    if not self.all:  # a whole table is never evicted: no recency to keep
                        instances.move_to_end(pk)
        return found

    def add(self, instances: Iterable[Model]) -> None:
        """Hold ``instances`` (replacing any held for the same keys), dropping the least
        recently used beyond ``size`` (unless ``all``)."""
        with self._lock:
            held = self._instances
            for instance in instances:
                held[instance.pk] = instance
                held.move_to_end(instance.pk)
            if not self.all:
                while len(held) > self.size:
                    held.popitem(last=False)

    def load(self, instances: Iterable[Model]) -> None:
        """Hold exactly ``instances``: the whole table of an ``all=True`` memo."""
        with self._lock:
            self._instances = OrderedDict((instance.pk, instance) for instance in instances)
            self._loaded = True

    def clear(self) -> None:
        """Drop every instance and the database binding (an ``all=True`` memo loads again
        on next use)."""
        with self._lock:
            self._instances = OrderedDict()
            self._loaded = False
            self._alias = None  # the next use binds a database again

    def serves(self, alias: str) -> bool:
        """Whether runs on database ``alias`` use this memo (the first one used binds it)."""
        with self._lock:
            if self._alias is None:
                self._alias = alias
            return self._alias == alias

    def fetch_queryset(self, alias: str) -> QuerySet[Any]:
        """The queryset missing instances come from, on ``alias``."""
        if self._queryset is not None:
            return self._queryset.using(alias)
        manager = self.model._default_manager if self.all else self.model._base_manager
        return manager.db_manager(alias).all()


def memos_by_model(memo: Memo | Iterable[Memo] | None) -> dict[type[Model], Memo]:
    """``memo=`` as a mapping: model -> its memo. Raises ``ValueError`` for two memos of
    one model and ``TypeError`` for anything that is not a memo."""
    if memo is None:
        return {}
    memos = [memo] if isinstance(memo, Memo) else list(memo)
    by_model: dict[type[Model], Memo] = {}
    for item in memos:
        if not isinstance(item, Memo):
            raise TypeError(f"memo= takes Memo objects, not {item!r}.")
        if item.model in by_model:
            raise ValueError(f"Two memos of {item.model.__name__}: give one memo per model.")
        by_model[item.model] = item
    return by_model
