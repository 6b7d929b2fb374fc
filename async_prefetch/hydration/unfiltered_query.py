"""An unfiltered ``Query`` that creates its containers only when something uses it.

Every queryset in ``_prefetched_objects_cache`` holds a query, and almost nobody reads
it: iterating, counting or indexing a prefetched manager uses the result cache. Django
still builds a full ``Query`` per parent (alias maps, a ``WhereNode``, annotation and
extra dicts): about ten containers per parent and relation, which the cyclic garbage
collector then walks again and again.

:class:`UnfilteredQuery` holds only the model and scalar attributes. The first access to
any other attribute (filtering the cached manager, chaining, compiling, cloning,
pickling, copying) runs ``Query.__init__``'s assignments for what is missing and turns
the object into a plain :class:`~django.db.models.sql.Query`, so Django never sees
anything but ``Query(model)`` with the same state.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model
from django.db.models.sql import Query


class UnfilteredQuery(Query):
    """``Query(model, alias_cols)`` whose container attributes are made on first use."""

    def __init__(self, model: type[Model], alias_cols: bool = True) -> None:
        # Query.__init__ is deliberately not called: materialise() does its work later.
        self.model = model
        self.alias_cols = alias_cols

    def materialise(self) -> Query:
        """Give this query every attribute ``Query.__init__`` sets and make it a plain
        ``Query``; attributes already assigned are kept. Returns ``self``."""
        own = self.__dict__
        for key, value in vars(Query(self.model, alias_cols=self.alias_cols)).items():
            if key not in own:
                setattr(self, key, value)
        self.__class__ = Query  # type: ignore[assignment]
        return self

    def __getattr__(self, name: str) -> Any:
        # Called only for attributes this object lacks: a container Query.__init__
        # would have made, or a genuinely missing one (AttributeError after materialising).
        if name in ("model", "alias_cols") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.materialise(), name)

    def clone(self) -> Query:
        return self.materialise().clone()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle and copy see a plain Query.
        return self.materialise().__reduce_ex__(protocol)

    def __getstate__(self) -> Any:
        # For serialisers that call it directly: the state of a plain Query.
        return self.materialise().__getstate__()
